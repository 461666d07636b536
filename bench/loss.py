r"""The DaTaSeg objective alone (forward + backward), by the number of mask rows per image.

  PYTHONPATH=. python bench/loss.py --size 256 --caps 0,50,32
  PYTHONPATH=. python bench/loss.py --size 256 --caps 50 --selections exact,sampled

`losses.compute_loss` with bench/train_step.py's shapes (R50 heads: 10 supervised layers,
100 queries, 133 classes, batch 2, 112x112 importance-sampled points, task panoptic) on
random logits and the same synthetic panoptic batch (~20 segments per image, 100 slots).
`--caps` are values of `config.loss.max_mask_targets` (0 = every slot, i.e. 100 rows); the
first is the reference the others' ratios are taken against, measured in the same run.
`--selections` are values of `config.loss.point_selection` (the importance sampling's choice of the
most uncertain candidates: 'exact' top-k or 'sampled' threshold), crossed with the caps.
Why: the mask terms cost in proportion to the rows (importance sampling of 3x oversampled
candidates per row), and they were most of the step's objective time.
"""

import argparse
import os
import sys
import time

import jax
import numpy as np

# The repository root before bench/ (the script's folder, on the path anyway): otherwise
# bench/input_pipeline.py would shadow the input_pipeline package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))
import reference_mask2former as ref  # pylint: disable=g-import-not-at-top,wrong-import-position

from dataseg.objective import config as loss_config_lib  # pylint: disable=wrong-import-position
from dataseg.objective import losses  # pylint: disable=wrong-import-position
from dataseg.train import compile_cache  # pylint: disable=wrong-import-position


def time_loss(size, batch, cap, steps=3, layers=10, queries=100, selection=""):
  fields, _ = ref.synthetic_panoptic(0, batch, size, 100)
  config = loss_config_lib.loss_config()
  config.point_selection = selection or config.point_selection
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
  parser.add_argument("--selections", default="", help="config.loss.point_selection values, e.g. "
                      "exact,sampled ('' = the default)")
  parser.add_argument("--compilation_cache", default=compile_cache.DEFAULT_DIR,
                      help="persistent compilation cache dir ('' = off)")
  args = parser.parse_args()
  compile_cache.enable(args.compilation_cache)
  caps = [int(c) for c in args.caps.split(",")]
  selections = (args.selections.split(",") if args.selections
                else [loss_config_lib.loss_config().point_selection])
  print(f"# objective fwd+bwd, {args.size}x{args.size}, batch {args.batch}, jax "
        f"{jax.__version__} on {jax.default_backend()} ({os.cpu_count()} CPU cores)")
  base = None
  for selection in selections:
    for cap in caps:
      seconds, compile_s, dropped = time_loss(args.size, args.batch, cap, args.steps,
                                              selection=selection)
      base = base or seconds
      rows = cap or 100
      print(f"selection={selection} max_mask_targets={cap} ({rows} rows/image): "
            f"{seconds:.3f} s, compile {compile_s:.1f} s, dropped targets {dropped:.0f}, "
            f"time vs the first: {seconds / base:.2f}", flush=True)


if __name__ == "__main__":
  main()
