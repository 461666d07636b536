r"""Train and evaluate DaTaSeg.

  python -m dataseg.main --config=configs/demo.py:smoke --workdir=/tmp/smoke
  python -m dataseg.main --config=configs/demo.py --workdir=workdirs/demo --config.total_steps=500
  python -m dataseg.main --config=configs/demo.py --workdir=workdirs/demo --mode=eval

Resumes automatically from the workdir's latest checkpoint. Several processes (TPU pod,
Slurm, or explicit --coordinator_address/--num_processes/--process_id) are joined with
`jax.distributed.initialize` before anything touches a device.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (file.py:args).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (+ eval) or eval only.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None, "Force jax.distributed.initialize() (auto-detected on TPU pods "
    "and Slurm when unset).")


def _maybe_initialize_distributed():
  import jax  # pylint: disable=g-import-not-at-top
  explicit = _COORDINATOR.value is not None
  auto = _DISTRIBUTED.value
  if auto is None:
    auto = ("SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1) or (
        "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"])
  if explicit:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif auto:
    jax.distributed.initialize()


def main(argv):
  del argv
  _maybe_initialize_distributed()
  from dataseg.train import loop  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  if _MODE.value == "train":
    results = loop.train_and_evaluate(config, _WORKDIR.value)
  else:
    results = loop.evaluate_only(config, _WORKDIR.value)
  del results  # the loop printed the table; the full metrics are in <workdir>/eval_<step>.json.


if __name__ == "__main__":
  app.run(main)
