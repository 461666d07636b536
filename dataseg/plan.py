r"""Plan before you launch: compile the train step for a simulated mesh, report its cost.

  python -m dataseg.plan --config=configs/joint_r50.py --mesh=data=64,fsdp=1
  python -m dataseg.plan --config=configs/joint_r50.py:fsdp --mesh=data=8,fsdp=8 --task=panoptic
  python -m dataseg.plan --config=configs/demo.py:smoke --mesh=data=2 --json=/tmp/plan.json

Sizes a TPU-pod or multi-GPU config on a laptop: N*M fake CPU devices, the state built
abstractly with the config's shardings, each task's train step compiled ahead of time from
abstract arguments (no data, no text encoder). Reports XLA's per-device memory and FLOPs of
the partitioned program; from the CPU compiler, so a sizing estimate, not the
accelerator's exact footprint.
"""

import os
import re
import sys


def _parse_mesh(text):
  """'data=8,fsdp=2' -> {'data': 8, 'fsdp': 2, 'model': 1} (explicit sizes only)."""
  sizes = {"data": 1, "fsdp": 1, "model": 1}
  for part in filter(None, (text or "").split(",")):
    name, eq, value = part.partition("=")
    if name not in sizes or not eq:
      raise ValueError(f"--mesh: {part!r} is not AXIS=SIZE with AXIS in data, fsdp, model")
    if not value.isdigit() or int(value) < 1:
      raise ValueError(
        f"--mesh: {name}={value!r} must be a positive integer (no -1: the "
        f"plan simulates exactly the devices you name)"
      )
    sizes[name] = int(value)
  return sizes


def _mesh_arg(argv):
  for i, arg in enumerate(argv):
    if arg.startswith("--mesh="):
      return arg[len("--mesh=") :]
    if arg == "--mesh" and i + 1 < len(argv):
      return argv[i + 1]
  return None


# LLVM's optimisation of the generated CPU code is most of the compile time and changes
# neither buffer assignment nor the HLO cost analysis (checked on the demo config: the
# same bytes and FLOPs at -O0 and the default), so the plan skips it unless asked.
_FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _simulate_devices(count, fast_compile=True):
  """Makes jax see `count` CPU devices; must run before jax creates its backend."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
  if fast_compile:
    flags += " " + _FAST_COMPILE_FLAGS
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"


# Before anything imports jax: the simulated device count comes from --mesh.
if __name__ == "__main__":
  _mesh_text = _mesh_arg(sys.argv)
  if _mesh_text:
    try:
      _sizes = _parse_mesh(_mesh_text)
    except ValueError:
      pass  # reported by main() with the flag's context.
    else:
      _slow = ("--nofast_compile", "--fast_compile=false", "--fast_compile=0")
      _simulate_devices(
        _sizes["data"] * _sizes["fsdp"] * _sizes["model"],
        fast_compile=not any(a.lower() in _slow for a in sys.argv),
      )

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import math
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from dataseg import config_lib
from dataseg import schema
from dataseg.train import sharding as sharding_lib
from dataseg.train import trainer
from dataseg.vocab import padded as padded_vocab

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (file.py:args).", lock_config=True
)
_MESH = flags.DEFINE_string("mesh", None, "Mesh to simulate: data=N,fsdp=M[,model=K].")
_TASK = flags.DEFINE_string("task", "", "One task to compile; '' = every task the config trains.")
# Read from sys.argv before jax starts (above); defined so that absl accepts it.
_FAST = flags.DEFINE_bool(
  "fast_compile",
  True,
  "Skip LLVM optimisation of the CPU code (memory and FLOP figures unchanged, compile faster).",
)
_JSON = flags.DEFINE_string("json", "", "Also write the report as JSON to this path.")


def abstract_inputs(config, mesh, vocab_size_):
  """ShapeDtypeStructs (with shardings) of the step's batch and vocabulary arguments."""
  size, b = config.image_size, config.batch_size
  batch_sh = sharding_lib.batch_sharding(mesh)
  rep = sharding_lib.replicated(mesh)
  batch = {
    name: jax.ShapeDtypeStruct((b,) + shape, dtype, sharding=batch_sh)
    for name, (dtype, shape) in schema.field_shapes(size, size, config.max_segments).items()
  }
  v, d = vocab_size_, config.model.classifier.text_dim
  vocab = dict(
    text=jax.ShapeDtypeStruct((v, d), "float32", sharding=rep),
    valid=jax.ShapeDtypeStruct((v,), "bool", sharding=rep),
    is_thing=jax.ShapeDtypeStruct((v,), "bool", sharding=rep),
    index=jax.ShapeDtypeStruct((), "int32", sharding=rep),
  )
  return batch, vocab


def _first(x):
  return x[0] if isinstance(x, (list, tuple)) else x


def _per_device_bytes(tree):
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * leaf.dtype.itemsize
  return total


def plan(config, mesh_sizes, tasks=None, log=None):
  """Compiles each task's step for the mesh; returns a JSON-able report (bytes, FLOPs, s).

  `log`: optional callable taking a progress line (compiles at 1024 px take minutes).
  """
  log = log or (lambda line: None)

  config_lib.validate(config)
  n = math.prod(mesh_sizes.values())
  if config.batch_size % (mesh_sizes["data"] * mesh_sizes["fsdp"]):
    raise ValueError(
      f"config.batch_size={config.batch_size} is not divisible by the batch "
      f"axes data*fsdp={mesh_sizes['data'] * mesh_sizes['fsdp']}"
    )
  devices = jax.devices()
  if len(devices) < n:
    raise ValueError(
      f"mesh {mesh_sizes} needs {n} devices, jax sees {len(devices)}: run "
      f"`python -m dataseg.plan` (it sets XLA_FLAGS before jax starts)"
    )
  mesh = sharding_lib.make_mesh(mesh_sizes, devices=devices[:n])
  v = padded_vocab.config_vocab_size(config)
  s = trainer.setup(config, len(config.datasets), v, mesh=mesh)
  batch, vocab = abstract_inputs(config, mesh, v)
  trained = list(dict.fromkeys(e.task for e in config.datasets.values()))
  tasks = list(tasks or trained)

  params = s.abstract_state["params"]
  report = dict(
    mesh=dict(mesh_sizes),
    devices=n,
    platform=devices[0].platform,
    image_size=config.image_size,
    global_batch=config.batch_size,
    per_device_batch=config.batch_size // (mesh_sizes["data"] * mesh_sizes["fsdp"]),
    vocab_size=v,
    text_dim=config.model.classifier.text_dim,
    num_params=sum(math.prod(p.shape) for p in jax.tree.leaves(params)),
    params_bytes_per_device=_per_device_bytes(params),
    state_bytes_per_device=_per_device_bytes(s.abstract_state),
    tasks={},
  )
  for task in tasks:
    step = trainer.make_train_step(s, task)
    t0 = time.perf_counter()
    lowered = step.lower(s.abstract_state, batch, vocab)
    t1 = time.perf_counter()
    log(f"[plan] {task}: lowered in {t1 - t0:.1f} s; compiling for {n} devices")
    compiled = lowered.compile()
    t2 = time.perf_counter()
    log(f"[plan] {task}: compiled in {t2 - t1:.1f} s")
    mem = compiled.memory_analysis()
    cost = _first(compiled.cost_analysis()) or {}
    entry = dict(
      lower_s=t1 - t0,
      compile_s=t2 - t1,
      flops=float(cost.get("flops", float("nan"))),
      bytes_accessed=float(cost.get("bytes accessed", float("nan"))),
    )
    if mem is not None:
      entry.update(
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes),
      )
      entry["peak_bytes"] = (
        entry["argument_bytes"] + entry["output_bytes"] + entry["temp_bytes"] - entry["alias_bytes"]
      )
    report["tasks"][task] = entry
  return report


def _gib(b):
  return f"{b / 2**30:8.3f}"


def format_report(report, config_name=""):
  m = report["mesh"]
  lines = [
    f"plan {config_name}: mesh data={m['data']} fsdp={m['fsdp']} model={m['model']} "
    f"({report['devices']} simulated {report['platform']} devices)",
    f"  image {report['image_size']}x{report['image_size']}, global batch "
    f"{report['global_batch']} ({report['per_device_batch']} per device), vocabulary "
    f"{report['vocab_size']} x {report['text_dim']}",
    f"  parameters {report['num_params'] / 1e6:.2f} M; per device: params "
    f"{report['params_bytes_per_device'] / 2**20:.1f} MiB, train state (params + optimizer "
    f"+ frozen) {report['state_bytes_per_device'] / 2**20:.1f} MiB",
    "  per device, GiB:",
    f"  {'task':<10}{'args':>9}{'output':>9}{'temp':>9}{'aliased':>9}{'code':>9}"
    f"{'peak':>9}{'GFLOP/step':>12}{'compile s':>11}",
  ]
  for task, e in report["tasks"].items():
    if "argument_bytes" in e:
      mem = "".join(
        " " + (_gib(e[k]) if e[k] or k != "code_bytes" else f"{'n/a':>8}")
        for k in (
          "argument_bytes",
          "output_bytes",
          "temp_bytes",
          "alias_bytes",
          "code_bytes",
          "peak_bytes",
        )
      )
    else:
      mem = f"{'(no memory analysis on this backend)':>54}"
    lines.append(f"  {task:<10}{mem}{e['flops'] / 1e9:12.1f}{e['lower_s'] + e['compile_s']:11.1f}")
  lines.append(
    "  peak = args + output + temp - aliased (donated state); FLOPs and bytes "
    "are per device, from XLA's CPU compiler: an estimate for TPU/GPU (code: n/a "
    "where the backend does not report it)."
  )
  return "\n".join(lines)


def main(argv):
  del argv
  if _MESH.value is None:
    raise app.UsageError("--mesh is required, e.g. --mesh=data=64,fsdp=1")
  mesh_sizes = _parse_mesh(_MESH.value)
  config = _CONFIG.value
  if _TASK.value:
    if _TASK.value not in schema.TASKS:
      raise app.UsageError(f"--task={_TASK.value!r} is unknown; allowed: {', '.join(schema.TASKS)}")
  report = plan(
    config,
    mesh_sizes,
    [_TASK.value] if _TASK.value else None,
    log=lambda line: print(line, file=sys.stderr, flush=True),
  )
  name = flags.FLAGS["config"].config_filename if "config" in flags.FLAGS else ""
  print(format_report(report, name), flush=True)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
