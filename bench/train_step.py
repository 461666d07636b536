r"""One full training step, ours against the reference Mask2Former, timed in one run.

  bash bench/ref_env.sh      # once: the reference's own venv (torch CPU build pinned)
  PYTHONPATH=. python bench/train_step.py --sizes 256,512 --batch 2

Ours: dataseg's R50 model (`model_config('r50')`: ResNet-50, msdeform pixel decoder,
100 queries, 9 decoder layers), text classifier over a random [133, 512] text table,
`losses.compute_loss` (task 'panoptic', in-graph Hungarian matching, 112x112
importance-sampled points, deep supervision), AdamW (`optimizer.make` with the base
config), the whole step one `jax.jit` program built by `trainer.make_train_step`, run
under `jax.transfer_guard('disallow')` (so no hidden host round trip can hide in it).
Reference: bench/reference_mask2former.py in bench/.ref_venv (a subprocess, after ours
has finished, so the two never share the CPU).

Both draw the same synthetic panoptic batch (reference_mask2former.synthetic_panoptic:
~20 Voronoi segments per image, things and stuff). Times: warm-up excluded, median of
`--steps` steps; compile time is reported separately. Threads: XLA CPU uses every core
of the machine (stated in the output); torch is set to `--threads` (default 2).

Other modes:
  --profile DIR       writes a jax.profiler trace of 2 steps of ours (TensorBoard/Perfetto).
  --demo_memory       peak resident memory of the demo's training (configs/demo.py,
                      default args) for a few steps of each of its tasks.
  --dtype bfloat16    compute dtype of ours (GPU runs; see bench/gpu.sh).
MFU (GPU): model FLOPs per step from XLA's cost analysis of the compiled step.
"""

import time  # pylint: disable=g-import-not-at-top

_PROCESS_START = time.time()  # before jax's import: time to the first step counts it.

import json
import os
import resource
import shutil
import subprocess
import sys

from absl import flags
import jax
import numpy as np

# The repository root before bench/ (the script's folder, on the path anyway): otherwise
# bench/input_pipeline.py would shadow the input_pipeline package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))
import reference_mask2former as ref  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import common  # pylint: disable=wrong-import-position
from dataseg import cli  # pylint: disable=wrong-import-position
from dataseg.model import configs as model_configs  # pylint: disable=wrong-import-position
from dataseg.train import compile_cache  # pylint: disable=wrong-import-position
from dataseg.train import host_memory  # pylint: disable=wrong-import-position
from dataseg.train import trainer  # pylint: disable=wrong-import-position

REF_PYTHON = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".ref_venv", "bin", "python")
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 FLOP/s (SXM).

_FLAGS = cli.new_flags()  # not absl's global FLAGS: bench/inference.py imports this module.
flags.DEFINE_list("sizes", "256", "square image sides", flag_values=_FLAGS)
flags.DEFINE_integer("batch", 2, "images per batch", flag_values=_FLAGS)
flags.DEFINE_integer("steps", 5, "timed steps of ours (median)", flag_values=_FLAGS)
flags.DEFINE_integer("ref_steps", 3, "timed steps of the reference", flag_values=_FLAGS)
flags.DEFINE_integer("threads", 2, "torch threads (reference)", flag_values=_FLAGS)
flags.DEFINE_string("dtype", "float32", "compute dtype of ours", flag_values=_FLAGS)
flags.DEFINE_bool("remat", False, "rematerialize (gradient checkpointing)", flag_values=_FLAGS)
flags.DEFINE_integer("max_segments", 100, "segment slots per example", flag_values=_FLAGS)
flags.DEFINE_enum(
  "side", "both", ["both", "ours", "reference"], "which side(s) to run", flag_values=_FLAGS
)
flags.DEFINE_string(
  "ref_args",
  "",
  "extra args for the reference, e.g. '--device cuda --bf16'",
  flag_values=_FLAGS,
)
flags.DEFINE_string("profile", "", "write a jax.profiler trace of ours here", flag_values=_FLAGS)
flags.DEFINE_bool(
  "demo_memory", False, "peak resident memory of the demo's training", flag_values=_FLAGS
)
flags.DEFINE_string(
  "compilation_cache",
  compile_cache.DEFAULT_DIR,
  "persistent compilation cache dir ('' = off; see dataseg/train/compile_cache.py)",
  flag_values=_FLAGS,
)
flags.DEFINE_string(
  "selection",
  "",
  "config.loss.point_selection for ours (exact | sampled; '' = the default)",
  flag_values=_FLAGS,
)


# The same settings as dataseg/train/host_memory.py, as environment variables (so that the
# reference's subprocess gets them too): one arena, no mmap'd chunks, no trimming. Our 512x512
# step with them: 8.7-9.1 s against 10.8-12.3 s (README, 1 Dec 2026). Off by default: ours
# gets them from --retain_freed_memory (config.retain_freed_memory) without a re-exec.
MALLOC_RETAIN_ENV = host_memory.ENV
flags.DEFINE_enum(
  "retain_freed_memory",
  "false",
  ["cpu", "true", "false"],
  "ours with config.retain_freed_memory (default false, as the config's; 'cpu': when jax "
  "runs on the host CPU): glibc keeps freed memory for the next step, and XLA compiles "
  "slower (dataseg/train/host_memory.py); the reference's subprocess keeps glibc's defaults",
  flag_values=_FLAGS,
)
flags.DEFINE_bool(
  "malloc_retain",
  False,
  "re-run this process (and so the reference's) with MALLOC_RETAIN_ENV: freed memory "
  "kept by glibc instead of page-faulted in again every step",
  flag_values=_FLAGS,
)


def malloc_retain(enabled: bool):
  """Re-executes this script with MALLOC_RETAIN_ENV set (before any XLA work), once;
  the reference's subprocess inherits it. Returns a line describing the setting."""
  if enabled and any(os.environ.get(k) != v for k, v in MALLOC_RETAIN_ENV.items()):
    if not os.environ.get("_DATASEG_BENCH_MALLOC_REEXEC"):
      os.environ.update(MALLOC_RETAIN_ENV, _DATASEG_BENCH_MALLOC_REEXEC="1")
      sys.stdout.flush()
      os.execv(sys.executable, [sys.executable] + sys.argv)
  on = all(os.environ.get(k) == v for k, v in MALLOC_RETAIN_ENV.items())
  return "malloc: " + (
    " ".join(f"{k}={v}" for k, v in MALLOC_RETAIN_ENV.items()) if on else "glibc defaults"
  )


def bench_config(
  size, batch, model="r50", dtype="float32", remat=False, max_segments=100, selection=""
):
  c = common.base_config()
  c.loss.point_selection = selection or c.loss.point_selection
  c.image_size = c.eval_image_size = size
  c.batch_size = batch
  c.max_segments = max_segments
  c.total_steps = 1000
  c.model = model_configs.model_config(model)
  c.model.dtype = dtype
  c.model.remat = remat
  c.model.classifier.text_dim = 512
  return c


def vocab_arrays(text_dim=512, num_classes=ref.NUM_CLASSES, seed=0):
  rng = np.random.default_rng(seed)
  return dict(
    text=rng.normal(size=(num_classes, text_dim)).astype(np.float32),
    valid=np.ones((num_classes,), bool),
    is_thing=np.arange(num_classes) < ref.NUM_THINGS,
    index=np.int32(0),
  )


def peak_flops(device):
  kind = getattr(device, "device_kind", "")
  for name, flops in PEAK_BF16.items():
    if name in kind:
      return flops
  return None


def rusage_delta(before, after):
  """User and system CPU seconds and minor page faults between two getrusage()s."""
  return dict(
    user_seconds=after.ru_utime - before.ru_utime,
    sys_seconds=after.ru_stime - before.ru_stime,
    minor_faults=after.ru_minflt - before.ru_minflt,
  )


def median_usage(usage):
  """Per-key medians of rusage_delta()s (system time is mostly page faults of fresh
  buffers: XLA:CPU allocates each step's temporaries anew)."""
  return {k: float(np.median([u[k] for u in usage])) for k in usage[0]} if usage else {}


def time_ours(
  size,
  batch,
  steps=5,
  dtype="float32",
  remat=False,
  model="r50",
  profile_dir="",
  max_segments=100,
  selection="",
):
  """Compiles and times our jitted train step; returns a dict of figures."""
  config = bench_config(size, batch, model, dtype, remat, max_segments, selection)
  start = time.perf_counter()
  s = trainer.setup(config, num_datasets=1, vocab_size=ref.NUM_CLASSES)
  state = jax.block_until_ready(trainer.init_state(s))
  init_s = time.perf_counter() - start
  fields, _ = ref.synthetic_panoptic(0, batch, size, max_segments)
  batch_arrays = trainer.global_batch(fields, s.mesh)
  vocab = jax.device_put(vocab_arrays(config.model.classifier.text_dim))
  step = trainer.make_train_step(s, "panoptic")
  cache0 = compile_cache.stats()["cache_hits"]
  t0 = time.perf_counter()
  lowered = step.lower(state, batch_arrays, vocab)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  from_cache = compile_cache.stats()["cache_hits"] > cache0
  print(
    f"# ours {size}x{size} batch {batch}: setup + init {init_s:.1f} s, trace "
    f"{t1 - t0:.1f} s, compile {t2 - t1:.1f} s"
    f"{' (persistent cache hit)' if from_cache else ''}",
    flush=True,
  )
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  times, cpu_times, usage = [], [], []
  with jax.transfer_guard("disallow"):
    for i in range(steps + 1):
      start, cpu_start = time.perf_counter(), time.process_time()
      ru0 = resource.getrusage(resource.RUSAGE_SELF)
      state, metrics = compiled(state, batch_arrays, vocab)
      jax.block_until_ready((state, metrics))
      if i:
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        usage.append(rusage_delta(ru0, resource.getrusage(resource.RUSAGE_SELF)))
      else:
        first_step_s = time.time() - _PROCESS_START
        print(
          f"# ours {size}x{size}: first step finished {first_step_s:.1f} s after process start",
          flush=True,
        )
    if profile_dir:  # the HLO maps the trace's ops to source (bench/profile_summary.py).
      os.makedirs(profile_dir, exist_ok=True)
      with open(os.path.join(profile_dir, "step.hlo.txt"), "w") as f:
        f.write(compiled.as_text())
      with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
        for _ in range(2):
          state, metrics = compiled(state, batch_arrays, vocab)
          jax.block_until_ready((state, metrics))
  loss = float(jax.device_get(metrics["loss"]))
  med = float(np.median(times))
  dev = jax.devices()[0]
  out = dict(
    side="ours",
    backend=jax.default_backend(),
    device=dev.device_kind,
    devices=jax.device_count(),
    cpu_cores=os.cpu_count(),
    size=size,
    batch=batch,
    dtype=dtype,
    remat=remat,
    trace_s=t1 - t0,
    compile_s=t2 - t1,
    compile_from_cache=from_cache,
    process_to_first_step_s=first_step_s,
    seconds=med,
    cpu_seconds=float(np.median(cpu_times)),
    **median_usage(usage),
    init_s=init_s,
    images_per_s=batch / med,
    all_seconds=times,
    loss=loss,
    finite=bool(jax.device_get(metrics["finite"])),
    flops_per_step=flops,
    transfer_guard="disallow",
  )
  peak = peak_flops(dev)
  if peak and flops:
    out["mfu"] = flops / (med * peak * jax.device_count())
  return out


def run_reference(mode, size, batch, steps=3, threads=2, extra=()):
  """Runs bench/reference_mask2former.py in the reference venv; its JSON or an error."""
  python = os.environ.get("REF_PYTHON", REF_PYTHON)
  python = shutil.which(python) or python  # REF_PYTHON may be a bare name (GPU image: python3).
  if not os.path.exists(python):
    return dict(side="reference", error=f"{python} missing: run bash bench/ref_env.sh")
  cmd = [
    python,
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_mask2former.py"),
    "--mode",
    mode,
    "--size",
    str(size),
    "--batch",
    str(batch),
    "--steps",
    str(steps),
    "--threads",
    str(threads),
    *extra,
  ]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    return dict(side="reference", error=proc.stderr[-2000:])
  return json.loads(lines[-1])


def side_by_side(side, ours_fn, reference_fn):
  """Ours, then the reference (never at the same time), each printed as a JSON line."""
  ours = theirs = None
  if side in ("both", "ours"):
    ours = ours_fn()
    print(json.dumps(ours), flush=True)
  if side in ("both", "reference"):
    theirs = reference_fn()
    print(json.dumps(theirs), flush=True)
  return ours, theirs


def demo_memory(steps=3):
  """Peak RSS of the demo's training config: a few jitted steps of each of its tasks."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import demo  # pylint: disable=g-import-not-at-top

  config = demo.get_config("")
  num_vocab, text_dim = 16, config.model.classifier.text_dim
  s = trainer.setup(config, num_datasets=len(config.datasets), vocab_size=num_vocab)
  state = trainer.init_state(s)
  vocab = jax.device_put(vocab_arrays(text_dim, num_vocab))
  for name in config.datasets:
    task = config.datasets[name].task
    fields, _ = ref.synthetic_panoptic(
      1, config.batch_size, config.image_size, config.max_segments, num_segments=8, num_things=3
    )
    fields["seg_class"] = np.where(fields["seg_valid"], fields["seg_class"] % num_vocab, -1)
    batch_arrays = trainer.global_batch(fields, s.mesh)
    step = trainer.make_train_step(s, task)
    with jax.transfer_guard("disallow"):
      for _ in range(steps):
        state, metrics = step(state, batch_arrays, vocab)
    jax.block_until_ready(metrics)
  peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return dict(
    mode="demo_memory",
    config="configs/demo.py (default args)",
    image_size=config.image_size,
    batch=config.batch_size,
    tasks=[config.datasets[n].task for n in config.datasets],
    steps_per_task=steps,
    peak_rss_gib=peak_kib / 2**20,
  )


def main(argv=None):
  """`argv` holds the flags (default sys.argv[1:])."""
  args = cli.parse(_FLAGS, argv, prog="python bench/train_step.py", doc=__doc__)
  malloc_line = malloc_retain(args.malloc_retain)
  retain = {"true": True, "false": False}.get(args.retain_freed_memory, "cpu")
  if host_memory.apply(retain):  # before jax starts (host_memory.computes_on_cpu).
    malloc_line += " (ours: freed memory retained, config.retain_freed_memory)"
  compile_cache.enable(args.compilation_cache)
  if args.demo_memory:
    print(json.dumps(demo_memory()))
    return
  print(
    f"# ours: jax {jax.__version__} on {jax.default_backend()} "
    f"({jax.device_count()} device(s), {os.cpu_count()} CPU cores; XLA CPU uses all); "
    f"reference: torch threads {args.threads}; {malloc_line}",
    flush=True,
  )
  for size in (int(x) for x in args.sizes):
    ours, theirs = side_by_side(
      args.side,
      lambda: time_ours(
        size,
        args.batch,
        args.steps,
        args.dtype,
        args.remat,
        profile_dir=args.profile,
        max_segments=args.max_segments,
        selection=args.selection,
      ),
      lambda: run_reference(
        "train", size, args.batch, args.ref_steps, args.threads, args.ref_args.split()
      ),
    )
    if ours and theirs and "seconds" in theirs:
      cpu = ""
      if "cpu_seconds" in theirs and ours["backend"] == "cpu":
        cpu = (
          f"; CPU time per step ours {ours['cpu_seconds']:.2f} s, reference "
          f"{theirs['cpu_seconds']:.2f} s, ratio {ours['cpu_seconds'] / theirs['cpu_seconds']:.2f}"
        )
      print(
        f"train step {size}x{size} batch {args.batch}: ours {ours['seconds']:.3f} s, "
        f"reference {theirs['seconds']:.3f} s, ratio ours/ref "
        f"{ours['seconds'] / theirs['seconds']:.2f} (target <= 0.5){cpu}; "
        f"our compile {ours['compile_s']:.1f} s"
        f"{' (from the persistent cache)' if ours['compile_from_cache'] else ''}, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
      )


if __name__ == "__main__":
  main()
