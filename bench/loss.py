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

  PYTHONPATH=. python bench/loss.py --caps 50 --before 8e21426

`--before REV`: the objective with the current code against the same objective with
dataseg/objective/points.py, costs.py, merge.py and losses.py as of git revision REV (the
rest of the code is the current one; an earlier importance_points is called without its
newer arguments: every row sampled), both compiled in this process and timed alternately (wall and
process CPU seconds, all threads; the ratio is current / REV); also prints the two
losses (equal up to float rounding unless the sampling's semantics changed).
"""

import importlib.util
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np

# The repository root before bench/ (the script's folder, on the path anyway): otherwise
# bench/input_pipeline.py would shadow the input_pipeline package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))
import reference_mask2former as ref  # pylint: disable=g-import-not-at-top,wrong-import-position

from dataseg.objective import config as loss_config_lib  # pylint: disable=wrong-import-position
from dataseg.objective import costs  # pylint: disable=wrong-import-position
from dataseg.objective import losses  # pylint: disable=wrong-import-position
from dataseg.objective import merge  # pylint: disable=wrong-import-position
from dataseg.objective import points  # pylint: disable=wrong-import-position
from dataseg.train import compile_cache  # pylint: disable=wrong-import-position

_SIZE = flags.DEFINE_integer("size", 256, "square image side")
_BATCH = flags.DEFINE_integer("batch", 2, "images per batch")
_CAPS = flags.DEFINE_list(
  "caps", "0,50,32", "config.loss.max_mask_targets values (0 = every slot); the first is the base"
)
_STEPS = flags.DEFINE_integer("steps", 3, "timed steps (median)")
_SELECTIONS = flags.DEFINE_list(
  "selections", "", "config.loss.point_selection values, e.g. exact,sampled ('' = the default)"
)
_BEFORE = flags.DEFINE_string(
  "before",
  "",
  "git revision: compare the current objective modules with that revision's (docstring)",
)
_COMPILATION_CACHE = flags.DEFINE_string(
  "compilation_cache", compile_cache.DEFAULT_DIR, "persistent compilation cache dir ('' = off)"
)


def loss_fn(size, batch, cap, layers=10, queries=100, selection=""):
  """The jitted objective (value and gradient) and its arguments."""
  fields, _ = ref.synthetic_panoptic(0, batch, size, 100)
  config = loss_config_lib.loss_config()
  config.point_selection = selection or config.point_selection
  config.max_mask_targets = cap
  rng = np.random.default_rng(0)
  v = ref.NUM_CLASSES
  class_logits = rng.normal(size=(layers, batch, queries, v + 1)).astype(np.float32)
  mask_logits = rng.normal(size=(layers, batch, queries, size // 4, size // 4)).astype(np.float32)
  vocab_valid = np.ones((v,), bool)
  is_thing = np.arange(v) < ref.NUM_THINGS

  def loss(c, m):
    total, metrics = losses.compute_loss(
      dict(class_logits=c, mask_logits=m),
      fields,
      task="panoptic",
      vocab_valid=vocab_valid,
      is_thing_vocab=is_thing,
      config=config,
      rng=jax.random.PRNGKey(0),
    )
    return total, metrics["dropped_mask_targets"]

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)), (
    class_logits,
    mask_logits,
  )


def time_loss(size, batch, cap, steps=3, layers=10, queries=100, selection=""):
  fn, args = loss_fn(size, batch, cap, layers, queries, selection)
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  times = []
  for i in range(steps + 1):
    start = time.perf_counter()
    (_, dropped), _ = jax.block_until_ready(compiled(*args))
    if i:
      times.append(time.perf_counter() - start)
  return float(np.median(times)), compile_s, float(dropped)


def _module_at(rev, path):
  """The module at `path` as of git revision `rev` (a fresh module object)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  text = subprocess.run(
    ["git", "show", f"{rev}:{path}"], cwd=root, check=True, capture_output=True, text=True
  ).stdout
  with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
    f.write(text)
  spec = importlib.util.spec_from_file_location(f"before_{os.path.basename(path)[:-3]}", f.name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  os.unlink(f.name)
  return module


def _swap(module, source):
  """Sets module's functions and selection tables to source's (a module or a dict)."""
  items = vars(source) if not isinstance(source, dict) else source
  for name, value in items.items():
    if not name.startswith("__") and (callable(value) or name in ("SELECTION", "SELECT")):
      setattr(module, name, value)


# The modules --before swaps for REV's.
MODULES = (points, costs, merge, losses)


def compare_before(rev, size, batch, cap, steps, selection=""):
  """Current points / costs / merge / losses.py against REV's, compiled and timed here."""
  current = {m: dict(vars(m)) for m in MODULES}
  before = {
    m: _module_at(rev, f"dataseg/objective/{m.__name__.rsplit('.', 1)[-1]}.py") for m in MODULES
  }
  earlier = before[points].importance_points
  if "num_valid" not in earlier.__code__.co_varnames:

    def importance_points(
      rng,
      maps,
      num_points,
      oversample=3.0,
      importance_ratio=0.75,
      uncertainty_fn=points.logit_uncertainty,
      selection="",
      row_flags=None,
      num_valid=None,
      chunk=None,
    ):
      del num_valid, chunk  # every row sampled, as before.
      fn = uncertainty_fn if row_flags is None else (lambda v: uncertainty_fn(v, row_flags))
      return earlier(rng, maps, num_points, oversample, importance_ratio, fn, selection)

    before[points].importance_points = importance_points
    before[points].logit_or_prob_uncertainty = points.logit_or_prob_uncertainty
  compiled = {}
  for name in (rev, "current"):
    for module in MODULES:
      _swap(module, before[module] if name == rev else current[module])
    fn, args = loss_fn(size, batch, cap, selection=selection)
    start = time.perf_counter()
    compiled[name] = fn.lower(*args).compile()
    print(f"# {name}: compile {time.perf_counter() - start:.1f} s", flush=True)
  for module in MODULES:
    _swap(module, current[module])
  values = {}
  times = {name: [] for name in compiled}
  for i in range(steps + 1):
    for name, fn in compiled.items():
      wall, cpu = time.perf_counter(), time.process_time()
      (total, _), _ = jax.block_until_ready(fn(*args))
      if i:
        times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
      values[name] = float(total)
  med = {name: np.median(np.array(t), 0) for name, t in times.items()}
  for name in compiled:
    print(
      f"{name}: {med[name][0]:.3f} s wall, {med[name][1]:.3f} s CPU, loss {values[name]:.6f}",
      flush=True,
    )
  print(
    f"objective fwd+bwd {size}x{size} batch {batch}, {cap or 100} rows/image: current / "
    f"{rev}: {med['current'][0] / med[rev][0]:.2f} wall, "
    f"{med['current'][1] / med[rev][1]:.2f} CPU; load average "
    f"{os.getloadavg()[0]:.1f}",
    flush=True,
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  compile_cache.enable(_COMPILATION_CACHE.value)
  caps = [int(c) for c in _CAPS.value]
  selections = (
    _SELECTIONS.value if _SELECTIONS.value else [loss_config_lib.loss_config().point_selection]
  )
  print(
    f"# objective fwd+bwd, {_SIZE.value}x{_SIZE.value}, batch {_BATCH.value}, jax "
    f"{jax.__version__} on {jax.default_backend()} ({os.cpu_count()} CPU cores)"
  )
  if _BEFORE.value:
    for cap in caps:
      compare_before(_BEFORE.value, _SIZE.value, _BATCH.value, cap, _STEPS.value, selections[0])
    return
  base = None
  for selection in selections:
    for cap in caps:
      seconds, compile_s, dropped = time_loss(
        _SIZE.value, _BATCH.value, cap, _STEPS.value, selection=selection
      )
      base = base or seconds
      rows = cap or 100
      print(
        f"selection={selection} max_mask_targets={cap} ({rows} rows/image): "
        f"{seconds:.3f} s, compile {compile_s:.1f} s, dropped targets {dropped:.0f}, "
        f"time vs the first: {seconds / base:.2f}",
        flush=True,
      )


if __name__ == "__main__":
  app.run(main)
