"""Checkpoints of `dataseg.main`: preemption, kill -9 + resume, corrupt-checkpoint fallback.

All runs use the tiny config (tests/trainer_driver.py, 8 steps, a checkpoint every 2)
in subprocesses on CPU. An interrupted run is compared with the uninterrupted reference
run (conftest.reference_run): on CPU the same program on the same inputs is
deterministic, so a correct resume (parameters, Adam moments, step, RNG *and* the
data-pipeline position) gives bitwise the same final state.
"""

import json
import os
import pathlib
import shutil
import signal
import time

import numpy as np
import pytest
import trainer_driver

POLL_S = 0.05
SIGTERM_AT = 2


def _finalized_steps(workdir):
  """Checkpoint steps orbax has finished writing (tmp folders excluded)."""
  folder = pathlib.Path(workdir) / "checkpoints"
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _wait_for(proc, predicate, timeout=600):
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(
        f"process ended (rc {proc.returncode}) before the condition:\n" + proc.stdout.read()[-5000:]
      )
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError("timed out waiting for the condition")
    time.sleep(POLL_S)


def _losses(workdir):
  """{step: [loss of every logged occurrence]} from metrics.jsonl."""
  out = {}
  with open(pathlib.Path(workdir) / "metrics.jsonl") as f:
    for line in f:
      record = json.loads(line)
      key = f"train/{trainer_driver.DATASET}/loss"
      if key in record:
        out.setdefault(record["step"], []).append(record[key])
  return out


def _corrupt(step_dir):
  """Garbles every file of a checkpoint's state: half of each file, then junk."""
  files = [p for p in pathlib.Path(step_dir, "state").rglob("*") if p.is_file()]
  assert files, step_dir
  for p in files:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2] + b"\x00garbage\xff" * 3)
  return files


@pytest.fixture(scope="module")
def interrupted(tiny_env, tmp_path_factory):
  """SIGTERM at step 2, resume, SIGKILL after a later checkpoint, corrupt it, resume.

  The SIGTERM run and the first resume share one process (DRIVER_RUNS=2: `dataseg.main`
  twice, the SIGTERM exit 0 ends the first), which saves a process start; the SIGTERM is a
  real signal the process sends itself at a known step (DRIVER_SIGTERM_AT_STEP). Steps
  sleep 0.3 s (DRIVER_STEP_SLEEP_S) so that SIGKILL lands while training runs. The
  exit status of a SIGTERM'd process itself is checked in tests/test_multihost.py.
  """
  workdir = tmp_path_factory.mktemp("interrupted") / "run"
  info = {"term_step": SIGTERM_AT + 1}  # one process stops after the signalled step.

  proc = tiny_env.driver(
    workdir,
    wait=False,
    extra_env=dict(DRIVER_STEP_SLEEP_S=0.3, DRIVER_SIGTERM_AT_STEP=SIGTERM_AT, DRIVER_RUNS=2),
  )
  _wait_for(proc, lambda: max(_finalized_steps(workdir), default=0) > info["term_step"])
  proc.kill()  # SIGKILL: no handler, no final save.
  info["kill_log"] = proc.communicate(timeout=600)[0]
  info["kill_rc"] = proc.returncode
  info["kill_steps"] = _finalized_steps(workdir)

  # The newest checkpoint is now corrupt: the resume must fall back to the one before.
  info["corrupt_step"] = max(info["kill_steps"])
  _corrupt(workdir / "checkpoints" / str(info["corrupt_step"]))
  proc = tiny_env.driver(workdir)
  info["resume_log"], info["resume_rc"] = proc.stdout, proc.returncode
  info["workdir"] = workdir
  return info


def test_sigterm_saves_a_checkpoint_and_exits_zero(interrupted):
  log, last = interrupted["kill_log"], interrupted["term_step"]
  assert f"SIGTERM: saved checkpoint at step {last}; exiting" in log, log[-5000:]
  assert "[driver] run 0 exited 0 (SystemExit)" in log
  assert f"Resuming from checkpoint {interrupted['workdir']}/checkpoints/{last}" in log
  assert last in interrupted["kill_steps"]
  assert os.path.exists(
    interrupted["workdir"] / "checkpoints" / "data_state" / f"{last}.process0.npz"
  )


def test_kill9_resume_after_corrupt_checkpoint_is_bitwise_identical(interrupted, reference_run):
  assert interrupted["kill_rc"] == -signal.SIGKILL, interrupted["kill_log"][-3000:]
  assert interrupted["resume_rc"] == 0, interrupted["resume_log"][-5000:]
  corrupt = interrupted["corrupt_step"]
  ckpt_dir = interrupted["workdir"] / "checkpoints"
  log = interrupted["resume_log"]
  # The corrupt checkpoint is reported by path, and the previous one is used.
  assert f"checkpoint {ckpt_dir}/{corrupt} failed to restore" in log, log[-5000:]
  previous = max(s for s in interrupted["kill_steps"] if s < corrupt)
  assert f"Resuming from checkpoint {ckpt_dir}/{previous}" in log
  got = trainer_driver.load_checkpoint(interrupted["workdir"], 8)
  want = trainer_driver.load_checkpoint(reference_run.workdir, 8)
  assert got.keys() == want.keys()
  assert any(k.startswith("['params']") for k in got)
  assert any(k.startswith("['opt_state']") for k in got)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_resume_restores_the_data_pipeline_position(interrupted, reference_run):
  # Every step's loss (logged once per run that executed it) equals the reference's:
  # the batches after each resume are the uninterrupted run's.
  got, want = _losses(interrupted["workdir"]), _losses(reference_run.workdir)
  assert sorted(got) == sorted(want) == list(range(1, 9))
  for step, values in got.items():
    assert all(v == want[step][0] for v in values), (step, values, want[step])
  assert max(len(v) for v in got.values()) >= 2  # some steps really ran twice.
  # The saved pipeline positions have the same layout and step (the tf.data iterator
  # blobs themselves are not byte-stable: they hold prefetch buffers).
  for step in (2, 8):
    with (
      np.load(interrupted["workdir"] / "checkpoints" / "data_state" / f"{step}.process0.npz") as a,
      np.load(reference_run.workdir / "checkpoints" / "data_state" / f"{step}.process0.npz") as b,
    ):
      assert a.keys() == b.keys()
      assert int(a["['step']"]) == int(b["['step']"]) == step


def test_corrupt_latest_checkpoint_falls_back_in_process(tiny_env, reference_run, tmp_path, capsys):
  import jax  # pylint: disable=g-import-not-at-top

  from dataseg.train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from dataseg.train import trainer  # pylint: disable=g-import-not-at-top
  from dataseg.vocab import padded as padded_vocab  # pylint: disable=g-import-not-at-top

  workdir = tmp_path / "run"
  shutil.copytree(reference_run.workdir / "checkpoints", workdir / "checkpoints")
  _corrupt(workdir / "checkpoints" / "8")
  config = tiny_env.config()
  vocabs = padded_vocab.build_vocabularies(config, str(workdir))
  s = trainer.setup(config, 1, padded_vocab.vocab_size(config, vocabs))
  ckpt = checkpoint_lib.Checkpointer(str(workdir / "checkpoints"))
  step, state, data_state = ckpt.restore_latest(s.abstract_state)
  out = capsys.readouterr().out
  assert step == 6
  assert f"checkpoint {workdir}/checkpoints/8 failed to restore" in out
  want = trainer_driver.load_checkpoint(reference_run.workdir, 6)
  got = {
    jax.tree_util.keystr(p): np.asarray(v)
    for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
  }
  # (opt_state keys differ in spelling: optax namedtuples here, plain dicts there.)
  assert len(got) == len(want)
  params = [k for k in want if k.startswith("['params']")]
  assert len(params) > 50
  for key in params + ["['step']", "['rng']"]:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert int(data_state["['step']"]) == 6  # flat pipeline position of step 6.
