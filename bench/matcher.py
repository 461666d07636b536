"""Times the in-graph JAX matcher against scipy on the host.

  JAX_PLATFORMS=cpu python bench/matcher.py [--batch 8] [--repeats 20]

For each shape (queries x targets) it draws `batch` random cost matrices,
times the jitted, vmapped `batched_linear_sum_assignment` (after warm-up,
median over repeats, results blocked on) and a host loop of
`scipy.optimize.linear_sum_assignment` over the same matrices, checks both give
the same total cost, and prints both times and their ratio.
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from dataseg.objective import matching


def _median_seconds(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--shapes", default="100x50,100x100")
  parser.add_argument("--kind", default="float", choices=("float", "tied"))
  parser.add_argument("--solver", default="auto", choices=("auto", "rows", "steps"))
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  solve = jax.jit(functools.partial(matching.batched_linear_sum_assignment, solver=args.solver))
  print(
    f"device: {jax.devices()[0].device_kind}, batch {args.batch}, "
    f"{args.kind} costs, solver {args.solver}, "
    f"median of {args.repeats}"
  )
  for shape in args.shapes.split(","):
    n, m = (int(x) for x in shape.split("x"))
    if args.kind == "float":
      cost = rng.random((args.batch, n, m)).astype(np.float32)
    else:
      cost = rng.integers(0, 4, (args.batch, n, m)).astype(np.float32)
    valid = np.ones((args.batch, m), bool)
    cost_dev, valid_dev = jnp.asarray(cost), jnp.asarray(valid)
    q2t = np.asarray(solve(cost_dev, valid_dev))  # Compile and warm up.

    def run_jax():
      solve(cost_dev, valid_dev).block_until_ready()

    def run_scipy():
      for b in range(args.batch):
        scipy.optimize.linear_sum_assignment(cost[b])

    run_scipy()
    t_jax = _median_seconds(run_jax, args.repeats)
    t_scipy = _median_seconds(run_scipy, args.repeats)
    for b in range(args.batch):
      rows, cols = scipy.optimize.linear_sum_assignment(cost[b])
      mine = q2t[b] >= 0
      total = cost[b][np.flatnonzero(mine), q2t[b][mine]].sum()
      assert np.isclose(total, cost[b][rows, cols].sum(), rtol=1e-5), b
    print(
      f"{n}x{m}: jax {t_jax * 1e3:8.3f} ms  scipy {t_scipy * 1e3:8.3f} ms"
      f"  jax/scipy {t_jax / t_scipy:6.2f}"
    )


if __name__ == "__main__":
  main()
