r"""The importance sampling alone: 'exact' top-k against 'sampled' threshold selection.

  PYTHONPATH=. python bench/points.py --rows 100 --size 256

`points.importance_points` as the objective calls it (112x112 points, 3x oversampled
candidates, 75% most uncertain kept) on `--rows` random [size/4, size/4] logit maps (the
train step at 256x256, batch 2, 10 supervised layers, 50 mask rows per image runs 1000
rows), each selection jitted and timed in the same process (median of `--steps`), wall
clock and process CPU seconds (all threads; steadier on a shared machine). The first
selection is the reference of the ratio.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from dataseg.objective import points  # pylint: disable=wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rows", type=int, default=100)
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--selections", default="exact,sampled")
  args = parser.parse_args()
  hw = args.size // 4
  maps = jax.device_put(np.random.default_rng(0).normal(size=(args.rows, hw, hw)).astype(
      np.float32))
  rng = jax.random.PRNGKey(0)
  print(f"# importance_points: {args.rows} rows of {hw}x{hw}, 112x112 points, jax "
        f"{jax.__version__} on {jax.default_backend()} ({os.cpu_count()} cores), load "
        f"average {os.getloadavg()[0]:.1f}", flush=True)
  base = None
  for selection in args.selections.split(","):
    fn = jax.jit(lambda r, m, s=selection: points.importance_points(r, m, 112 * 112,
                                                                     selection=s))
    jax.block_until_ready(fn(rng, maps))
    wall, cpu = [], []
    for _ in range(args.steps):
      w, c = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(rng, maps))
      wall.append(time.perf_counter() - w)
      cpu.append(time.process_time() - c)
    w, c = float(np.median(wall)), float(np.median(cpu))
    base = base or (w, c)
    print(f"selection={selection}: {w:.3f} s wall, {c:.3f} s CPU; vs {args.selections.split(',')[0]}: "
          f"{w / base[0]:.2f} wall, {c / base[1]:.2f} CPU", flush=True)


if __name__ == "__main__":
  main()
