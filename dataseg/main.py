r"""Train and evaluate DaTaSeg.

  python -m dataseg.main --config=configs/demo.py:smoke --workdir=/tmp/smoke
  python -m dataseg.main --config=configs/demo.py --workdir=workdirs/demo --config.total_steps=500
  python -m dataseg.main --config=configs/demo.py --workdir=workdirs/demo --mode=eval

Resumes automatically from the workdir's latest checkpoint. Several processes (TPU pod,
Slurm, or explicit --coordinator_address/--num_processes/--process_id) are joined with
`jax.distributed.initialize` before anything touches a device; every process then trains on
all of its local accelerators (see `slurm_local_device_ids` for Slurm) and says how many.

Start-up problems (a missing dataset, a text encoder that is neither cached nor reachable, an
unknown config key) end the run at once with one line each naming what is missing and how to
get it, instead of a traceback minutes later.
"""

import difflib
import os
import re
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (file.py:args).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (+ eval) or eval only.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  None,
  "Force jax.distributed.initialize() (auto-detected on TPU pods and Slurm when unset).",
)


def _maybe_initialize_distributed():
  import jax  # pylint: disable=g-import-not-at-top

  from dataseg.train import sharding as sharding_lib  # pylint: disable=g-import-not-at-top

  explicit = _COORDINATOR.value is not None
  slurm = all(k in os.environ for k in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID"))
  auto = _DISTRIBUTED.value
  if auto is None:
    auto = (slurm and int(os.environ["SLURM_NTASKS"]) > 1) or (
      "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"]
    )
  kwargs = {}
  if slurm and not explicit:
    ids = sharding_lib.slurm_local_device_ids(os.environ)
    if ids is not None:
      kwargs["local_device_ids"] = ids  # [] = all visible (jax would pick SLURM_LOCALID).
  if explicit:
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  elif auto:
    jax.distributed.initialize(**kwargs)
  local = jax.local_devices()
  print(
    f"process {jax.process_index()}/{jax.process_count()}: {len(local)} local "
    f"device(s) ({local[0].device_kind}), {jax.device_count()} in all",
    flush=True,
  )


def _unknown_key_message(argv, error):
  """One line for an override of a key the config does not have: key, parent, matches."""
  config = flags.FLAGS["config"].value
  if config is None:  # the failed parse may leave the flag unset: load the file again.
    files = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
    if files:
      try:
        from ml_collections.config_flags import config_flags as impl  # pylint: disable=g-import-not-at-top

        config = impl._ConfigFileParser(name="config").parse(files[-1])  # pylint: disable=protected-access
      except Exception:  # pylint: disable=broad-except
        config = None
  for arg in argv[1:]:
    m = re.match(r"--config\.([\w.]+)(=|$)", arg)
    if not m or config is None:
      continue
    node, parts = config, m.group(1).split(".")
    for depth, part in enumerate(parts):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part in keys:
        node = node[part]
        continue
      parent = ".".join(parts[:depth]) or "<top level>"
      prefix = ".".join(parts[:depth])
      close = difflib.get_close_matches(part, keys, n=3, cutoff=0.5)
      hint = (
        f"; close matches: {', '.join(f'{prefix}.{c}' if prefix else c for c in close)}"
        if close
        else f"; keys of {parent}: {', '.join(sorted(keys))}"
      )
      return f"unknown config key {m.group(1)!r}: {parent} has no {part!r}{hint}"
  return f"bad config override: {type(error).__name__}: {error}"


def _parse_flags(argv):
  """absl's flag parsing, with an unknown --config.<key> answered in one line."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    sys.exit(f"dataseg: {_unknown_key_message(argv, e)}")
  except flags.Error as e:
    sys.exit(f"dataseg: {e}\nPass --helpfull to see the flags.")


def main(argv):
  del argv
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  from dataseg.train import host_memory  # pylint: disable=g-import-not-at-top

  # Before jax starts (opt-in, configs/common.py): freed memory kept for the next step.
  host_memory.apply(_CONFIG.value.get("retain_freed_memory", False))
  _maybe_initialize_distributed()
  from dataseg import config_lib  # pylint: disable=g-import-not-at-top
  from dataseg.train import compile_cache  # pylint: disable=g-import-not-at-top
  from dataseg.train import loop  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  compile_cache.enable(config.get("compilation_cache_dir", ""))  # before anything compiles.
  try:
    if _MODE.value == "train":
      results = loop.train_and_evaluate(config, _WORKDIR.value)
    else:
      results = loop.evaluate_only(config, _WORKDIR.value)
  except config_lib.StartupError as e:
    sys.exit(f"dataseg: cannot start:\n{e}")
  del results  # the loop printed the table; the full metrics are in <workdir>/eval_<step>.json.


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
