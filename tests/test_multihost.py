"""Two processes on localhost (CPU, gloo collectives) train as one process does.

`python tests/trainer_driver.py` (= `python -m dataseg.main` plus hooks) is launched
twice with --coordinator_address/--num_processes/--process_id; each process owns 1 CPU
device, the mesh is data=2 across the processes, and each feeds its half of the same
global batch (DRIVER_GLOBAL_DATA: every process reads the 1-process pipeline and keeps
its rows, so the global batches equal the 1-process run's). Compared with the
1-process reference run (conftest.reference_run), same config and global batch.
"""

import json
import pathlib
import socket

import numpy as np

import trainer_driver

# One device vs two: the batch mean is reduced in another order (float32). Losses O(20);
# parameters after 8 Adam steps: see test_trainer.py for why a few elements with ~0
# true gradient may move by up to lr per step in either run (sum of lr here ~2e-3).
LOSS_RTOL = 1e-4
PARAM_ATOL_BULK = 1e-5
PARAM_ATOL_ALL = 2e-3


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _losses(workdir):
  key = f"train/{trainer_driver.DATASET}/loss"
  out = {}
  for line in open(pathlib.Path(workdir) / "metrics.jsonl"):
    record = json.loads(line)
    if key in record:
      out[record["step"]] = record[key]
  return out


def test_two_processes_train_like_one(tiny_env, reference_run, tmp_path):
  workdir = tmp_path / "run"
  port = _free_port()
  procs = [tiny_env.driver(workdir, f"--coordinator_address=localhost:{port}",
                           "--num_processes=2", f"--process_id={i}",
                           extra_env=dict(DRIVER_GLOBAL_DATA=1), wait=False)
           for i in range(2)]
  logs = [p.communicate(timeout=900)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-6000:]

  # Only process 0 writes logs: progress lines, metrics.jsonl, TensorBoard events.
  assert "[step      8/8]" in logs[0] and "[step " not in logs[1]
  assert len(list(workdir.glob("events.out.tfevents.*"))) == 1
  # Each process saved its own pipeline position.
  assert (workdir / "checkpoints" / "data_state" / "8.process1.npz").exists()

  got, want = _losses(workdir), _losses(reference_run.workdir)
  assert sorted(got) == sorted(want) == list(range(1, 9))
  np.testing.assert_allclose([got[s] for s in range(1, 9)], [want[s] for s in range(1, 9)],
                             rtol=LOSS_RTOL)
  a = trainer_driver.load_checkpoint(workdir, 8)
  b = trainer_driver.load_checkpoint(reference_run.workdir, 8)
  keys = [k for k in b if k.startswith("['params']")]
  assert keys and a.keys() == b.keys()
  diffs = []
  for key in keys:
    np.testing.assert_allclose(a[key], b[key], rtol=0, atol=PARAM_ATOL_ALL, err_msg=key)
    diffs.append(np.abs(a[key] - b[key]).ravel())
  assert np.mean(np.concatenate(diffs) <= PARAM_ATOL_BULK) >= 0.999
  assert int(a["['step']"]) == 8
