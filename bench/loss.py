r"""The DaTaSeg objective alone (forward + backward), by the number of mask rows per image.

  PYTHONPATH=. python bench/loss.py --size 256 --caps 0,50,32

`losses.compute_loss` with bench/train_step.py's shapes (R50 heads: 10 supervised layers,
100 queries, 133 classes, batch 2, 112x112 importance-sampled points, task panoptic) on
random logits and the same synthetic panoptic batch (~20 segments per image, 100 slots).
`--caps` are values of `config.loss.max_mask_targets` (0 = every slot, i.e. 100 rows); the
first is the reference the others' ratios are taken against, measured in the same run.
Why: the mask terms cost in proportion to the rows (importance sampling of 3x oversampled
candidates per row), and they were most of the step's objective time.
"""

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_mask2former as ref  # pylint: disable=g-import-not-at-top,wrong-import-position

from dataseg.objective import config as loss_config_lib  # pylint: disable=wrong-import-position
from dataseg.objective import losses  # pylint: disable=wrong-import-position


def time_loss(size, batch, cap, steps=3, layers=10, queries=100):
  fields, _ = ref.synthetic_panoptic(0, batch, size, 100)
  config = loss_config_lib.loss_config()
  config.max_mask_targets = cap
  rng = np.random.default_rng(0)
  v = ref.NUM_CLASSES
  class_logits = rng.normal(size=(layers, batch, queries, v + 1)).astype(np.float32)
  mask_logits = rng.normal(size=(layers, batch, queries, size // 4, size // 4)).astype(
      np.float32)
  vocab_valid = np.ones((v,), bool)
  is_thing = np.arange(v) < ref.NUM_THINGS

  def loss(c, m):
    total, metrics = losses.compute_loss(
        dict(class_logits=c, mask_logits=m), fields, task="panoptic",
        vocab_valid=vocab_valid, is_thing_vocab=is_thing, config=config,
        rng=jax.random.PRNGKey(0))
    return total, metrics["dropped_mask_targets"]

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  start = time.perf_counter()
  compiled = fn.lower(class_logits, mask_logits).compile()
  compile_s = time.perf_counter() - start
  times = []
  for i in range(steps + 1):
    start = time.perf_counter()
    (_, dropped), _ = jax.block_until_ready(compiled(class_logits, mask_logits))
    if i:
      times.append(time.perf_counter() - start)
  return float(np.median(times)), compile_s, float(dropped)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=256)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--caps", default="0,50,32")
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()
  caps = [int(c) for c in args.caps.split(",")]
  print(f"# objective fwd+bwd, {args.size}x{args.size}, batch {args.batch}, jax "
        f"{jax.__version__} on {jax.default_backend()} ({os.cpu_count()} CPU cores)")
  base = None
  for cap in caps:
    seconds, compile_s, dropped = time_loss(args.size, args.batch, cap, args.steps)
    base = base or seconds
    rows = cap or 100
    print(f"max_mask_targets={cap} ({rows} rows/image): {seconds:.3f} s, compile "
          f"{compile_s:.1f} s, dropped targets {dropped:.0f}, time vs max_mask_targets="
          f"{caps[0]}: {seconds / base:.2f}", flush=True)


if __name__ == "__main__":
  main()
