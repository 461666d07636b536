r"""Panoptic inference throughput (model + post-processing), ours against the reference.

  bash bench/ref_env.sh      # once: the reference's own venv (torch CPU build pinned)
  PYTHONPATH=. python bench/inference.py --sizes 512,1024 --batches 1,8

Ours: the R50 model (as bench/train_step.py) and the evaluator's panoptic
post-processing (final-layer logits -> bilinear resize of the mask logits to the image
size -> `postprocess.panoptic_inference`: score / overlap thresholds 0.8, stuff merged
per class), one jitted program per (size, batch), vmapped over the batch, outputs fetched
to the host. Reference: transformers' Mask2Former forward + `Mask2FormerImageProcessor.
post_process_panoptic_segmentation(target_sizes=input size)` (bench/reference_mask2former.py,
its own venv, run as a subprocess after ours). images/s = batch / median seconds per
batch, warm-up excluded; compile time reported apart. Threads: XLA CPU uses every core;
torch `--threads` (default 2).
"""

import os
import resource
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

# The repository root before bench/ (the script's folder, on the path anyway): otherwise
# bench/input_pipeline.py would shadow the input_pipeline package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))
import reference_mask2former as ref  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position

from dataseg.objective import postprocess  # pylint: disable=wrong-import-position
from dataseg.train import compile_cache  # pylint: disable=wrong-import-position
from dataseg.train import host_memory  # pylint: disable=wrong-import-position
from dataseg.train import trainer  # pylint: disable=wrong-import-position

_SIZES = flags.DEFINE_list("sizes", "512,1024", "square image sides")
_BATCHES = flags.DEFINE_list("batches", "1,8", "batch sizes")
_STEPS = flags.DEFINE_integer("steps", 3, "timed steps of ours (median)")
_PROFILE = flags.DEFINE_string("profile", "", "write a jax.profiler trace of ours here")
_MALLOC_RETAIN = flags.DEFINE_bool(
  "malloc_retain",
  False,
  "re-run with train_step.MALLOC_RETAIN_ENV (glibc keeps freed memory; both sides)",
)
_RETAIN = flags.DEFINE_enum(
  "retain_freed_memory",
  "false",
  ["cpu", "true", "false"],
  "ours with config.retain_freed_memory, as dataseg.main's evaluation (default false, as "
  "the config's; dataseg/train/host_memory.py); the reference keeps glibc's defaults",
)
_REF_STEPS = flags.DEFINE_integer("ref_steps", 2, "timed steps of the reference")
_THREADS = flags.DEFINE_integer("threads", 2, "torch threads (reference)")
_DTYPE = flags.DEFINE_string("dtype", "float32", "compute dtype of ours")
_SIDE = flags.DEFINE_enum("side", "both", ["both", "ours", "reference"], "which side(s) to run")
_REF_ARGS = flags.DEFINE_string(
  "ref_args", "", "extra args for the reference, e.g. '--device cuda --bf16'"
)
_SKIP = flags.DEFINE_list("skip", "", "size x batch pairs to skip, e.g. 1024x8")
_COMPILATION_CACHE = flags.DEFINE_string(
  "compilation_cache",
  compile_cache.DEFAULT_DIR,
  "persistent compilation cache dir ('' = off; see dataseg/train/compile_cache.py)",
)


def make_program(s):
  """Jitted (state, images, vocab) -> panoptic outputs at the image size."""
  predict = trainer.make_predict_fn(s)
  post = s.config.loss.post

  def one(class_logits, mask_logits, vocab, size):
    logits = postprocess.resize_to_image(mask_logits, size)
    seg_map, cls, _, score, seg_valid = postprocess.panoptic_inference(
      class_logits,
      logits,
      vocab["valid"],
      vocab["is_thing"],
      score_threshold=post.score_threshold,
      overlap_threshold=post.overlap_threshold,
      mask_threshold=post.mask_threshold,
    )
    return dict(segment_map=seg_map, seg_class=jnp.where(seg_valid, cls, -1), seg_score=score)

  @jax.jit
  def run(state, images, vocab):
    class_logits, mask_logits = predict(state, images, vocab)
    size = images.shape[1:3]
    return jax.vmap(lambda c, m: one(c, m, vocab, size))(class_logits, mask_logits)

  return run


def time_ours(size, batch, steps=3, dtype="float32", profile_dir=""):
  config = train_step.bench_config(size, batch, dtype=dtype)
  s = trainer.setup(config, num_datasets=1, vocab_size=ref.NUM_CLASSES)
  state = trainer.init_state(s)
  fields, _ = ref.synthetic_panoptic(0, batch, size)
  images = jax.device_put(fields["image"])
  vocab = jax.device_put(train_step.vocab_arrays())
  run = make_program(s)
  t0 = time.perf_counter()
  compiled = run.lower(state, images, vocab).compile()
  compile_s = time.perf_counter() - t0
  print(f"# ours inference {size}x{size} batch {batch}: compile {compile_s:.1f} s", flush=True)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  times, cpu_times, usage = [], [], []
  with jax.transfer_guard_device_to_host("allow"), jax.transfer_guard_host_to_device("disallow"):
    for i in range(steps + 1):
      start, cpu_start = time.perf_counter(), time.process_time()
      ru0 = resource.getrusage(resource.RUSAGE_SELF)
      out = jax.device_get(compiled(state, images, vocab))  # results on the host.
      if i:
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        usage.append(train_step.rusage_delta(ru0, resource.getrusage(resource.RUSAGE_SELF)))
    if profile_dir:  # as bench/train_step.py: trace + HLO for bench/profile_summary.py.
      os.makedirs(profile_dir, exist_ok=True)
      with open(os.path.join(profile_dir, "step.hlo.txt"), "w") as f:
        f.write(compiled.as_text())
      with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
        for _ in range(2):
          jax.device_get(compiled(state, images, vocab))
  med = float(np.median(times))
  res = dict(
    side="ours",
    backend=jax.default_backend(),
    device=jax.devices()[0].device_kind,
    size=size,
    batch=batch,
    dtype=dtype,
    compile_s=compile_s,
    seconds=med,
    cpu_seconds=float(np.median(cpu_times)),
    **train_step.median_usage(usage),
    images_per_s=batch / med,
    all_seconds=times,
    flops_per_batch=flops,
    segments_per_image=float(np.mean(np.sum(out["seg_class"] >= 0, -1))),
  )
  peak = train_step.peak_flops(jax.devices()[0])
  if peak and flops:
    res["mfu"] = flops / (med * peak)
  return res


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  malloc_line = train_step.malloc_retain(_MALLOC_RETAIN.value)
  retain = {"true": True, "false": False}.get(_RETAIN.value, "cpu")
  if host_memory.apply(retain):  # before jax starts, as in dataseg.main.
    malloc_line += " (ours: freed memory retained, config.retain_freed_memory)"
  compile_cache.enable(_COMPILATION_CACHE.value)
  skip = set(_SKIP.value)
  print(
    f"# ours: jax {jax.__version__} on {jax.default_backend()} ({os.cpu_count()} CPU "
    f"cores; XLA CPU uses all); reference: torch threads {_THREADS.value}; {malloc_line}",
    flush=True,
  )
  for size in (int(x) for x in _SIZES.value):
    for batch in (int(x) for x in _BATCHES.value):
      if f"{size}x{batch}" in skip:
        print(f"# skipped {size}x{size} batch {batch}", flush=True)
        continue
      ours, theirs = train_step.side_by_side(
        _SIDE.value,
        lambda: time_ours(size, batch, _STEPS.value, _DTYPE.value, _PROFILE.value),
        lambda: train_step.run_reference(
          "infer", size, batch, _REF_STEPS.value, _THREADS.value, _REF_ARGS.value.split()
        ),
      )
      if ours and theirs and "images_per_s" in theirs:
        print(
          f"panoptic inference {size}x{size} batch {batch}: ours "
          f"{ours['images_per_s']:.3f} img/s, reference {theirs['images_per_s']:.3f} "
          f"img/s, speed-up {ours['images_per_s'] / theirs['images_per_s']:.2f}x "
          f"(target >= 2)",
          flush=True,
        )


if __name__ == "__main__":
  app.run(main)
