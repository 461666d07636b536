"""The launch scripts run for real against fakes: tpu_pod.sh with a fake `gcloud` on PATH.

The fake gcloud (written below) records every call and executes `ssh --command` locally,
once per fake worker (own HOME, own `hostname`, in parallel like --worker=all), `scp` as a
copy into each worker's HOME, and create / delete / describe against a state file. The
script runs from a small fake checkout (its own copy of launch/tpu_pod.sh), whose
`.venv/bin/activate` puts a fake `python` first on PATH: it records its argv, prints a line,
and exits 0 on SIGTERM. So copying, quoting of the remote command, run, logs, status, stop,
runtime-version choice, queued resources and recovery after pre-emption are exercised
without a TPU, a network or a training run.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORKERS = 2

FAKE_GCLOUD = r"""#!{python}
import json, os, shutil, subprocess, sys
root = os.environ["FAKE_TPU_ROOT"]
args = sys.argv[1:]
with open(os.path.join(root, "calls.jsonl"), "a") as f:
  f.write(json.dumps(args) + "\n")
opts = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "") for a in args if a.startswith("--"))
pos = [a for a in args if not a.startswith("--")]
group, verb = pos[2], pos[3]  # compute tpus <tpu-vm|queued-resources> <verb> ...
state = os.path.join(root, "state")
home = lambda i: os.path.join(root, f"worker{{i}}")
workers = range({workers}) if opts.get("worker", "all") == "all" else [int(opts["worker"])]
if verb == "ssh":
  procs = []
  for i in workers:
    path = os.path.join(home(i), "bin") + ":" + os.environ["PATH"]
    env = dict(os.environ, HOME=home(i), PATH=path)
    procs.append(subprocess.Popen(["bash", "-c", opts["command"]], env=env, cwd=home(i)))
  sys.exit(max(p.wait() for p in procs))
elif verb == "scp":
  src, dest = pos[4], pos[5].split(":", 1)[1]
  for i in workers:
    shutil.copy(src, os.path.join(home(i), dest.removeprefix("~/")))
elif verb == "describe":
  if not os.path.exists(state):
    sys.exit("ERROR: (gcloud) NOT_FOUND")
  print(open(state).read().strip())
elif verb == "create":
  open(state, "w").write("ACTIVE" if group == "queued-resources" else "READY")
elif verb == "delete":
  os.remove(state)
"""

FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stand-in for the worker's training process: records argv, exits 0 on SIGTERM.
if [ "${{2:-}}" != dataseg.main ]; then exit 0; fi  # setup's `python -c` / pip lines.
printf '%s\n' "$@" > "$HOME/python_argv.txt"
exec {python} -c '
import signal, sys, time
print("fake dataseg.main started", flush=True)
def term(*_):
  print("got SIGTERM, exiting 0", flush=True)
  sys.exit(0)
signal.signal(signal.SIGTERM, term)
while True:
  time.sleep(0.05)
'
"""


@pytest.fixture
def pod(tmp_path):
  """A fake checkout, fake workers and a fake gcloud; returns a runner of tpu_pod.sh."""
  checkout = tmp_path / "checkout"
  (checkout / "launch").mkdir(parents=True)
  shutil.copy(ROOT / "launch" / "tpu_pod.sh", checkout / "launch" / "tpu_pod.sh")
  (checkout / "launch" / "setup_env.sh").write_text("echo '[fake setup_env]'\n")
  (checkout / "requirements.txt").write_text("jax==0.0.0\n")
  (checkout / "README.md").write_text("fake checkout\n")
  (checkout / "input_pipeline" / "data").mkdir(parents=True)  # nested "data": kept.
  (checkout / "input_pipeline" / "data" / "keep.txt").write_text("x")
  for skipped in ("data", ".venv", ".git", "workdirs"):  # top-level: not copied.
    (checkout / skipped).mkdir()
    (checkout / skipped / "big.bin").write_text("x")
  root = tmp_path / "cloud"
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable, workers=WORKERS))
  (bin_dir / "gcloud").chmod(0o755)
  for i in range(WORKERS):
    wbin = root / f"worker{i}" / "bin"
    wbin.mkdir(parents=True)
    (wbin / "hostname").write_text(f"#!/bin/sh\necho worker{i}\n")
    (wbin / "python3.11").write_text("#!/bin/sh\nexit 0\n")
    for p in wbin.iterdir():
      p.chmod(0o755)
  env = dict(
    os.environ,
    PATH=f"{bin_dir}:{os.environ['PATH']}",
    FAKE_TPU_ROOT=str(root),
    PROJECT="proj",
    ZONE="us-central2-b",
    TPU_NAME="pod",
    BUCKET="gs://b",
    POLL_S="0",
  )

  def install_fake_venv():
    for i in range(WORKERS):
      venv = root / f"worker{i}" / "dataseg" / ".venv" / "bin"
      venv.mkdir(parents=True, exist_ok=True)
      (venv / "activate").write_text(f'export PATH="{venv}:$PATH"\n')
      (venv / "python").write_text(FAKE_PYTHON.format(python=sys.executable))
      (venv / "python").chmod(0o755)

  def run(*args, timeout=120, **extra):
    proc = subprocess.run(
      ["bash", str(checkout / "launch" / "tpu_pod.sh"), *args],
      env=dict(env, **extra),
      cwd=str(tmp_path),
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr

  def calls():
    path = root / "calls.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []

  yield type(
    "Pod",
    (),
    dict(
      root=root,
      run=staticmethod(run),
      calls=staticmethod(calls),
      install_fake_venv=staticmethod(install_fake_venv),
    ),
  )
  for pid_file in root.glob("worker*/dataseg_*.pid"):  # a failed test leaves none running.
    try:
      os.kill(int(pid_file.read_text()), signal.SIGKILL)
    except (ValueError, ProcessLookupError):
      pass


def _verb(call):
  return [a for a in call if not a.startswith("--")][3]


def _wait_for_text(path, text, timeout=60):
  t0 = time.time()
  while not (path.exists() and text in path.read_text()):
    assert time.time() - t0 < timeout, (path, path.read_text() if path.exists() else None)
    time.sleep(0.05)


def test_copy_run_logs_status_stop(pod):
  pod.run("copy")
  for i in range(WORKERS):
    remote = pod.root / f"worker{i}" / "dataseg"
    assert (remote / "launch" / "tpu_pod.sh").is_file()
    assert (remote / "input_pipeline" / "data" / "keep.txt").is_file()
    for skipped in ("data", ".venv", ".git", "workdirs"):
      assert not (remote / skipped).exists(), skipped
  pod.install_fake_venv()

  # Spaces and quotes in every argument reach python on every worker unchanged.
  out = pod.run("run", "configs/my config.py:a=1", "exp one", '--config.note=it\'s a "test"')
  want = [
    "-m",
    "dataseg.main",
    "--config=configs/my config.py:a=1",
    "--workdir=gs://b/dataseg/exp one",
    "--config.data_dir=gs://b/tensorflow_datasets",
    "--distributed",
    '--config.note=it\'s a "test"',
  ]
  pids = []
  for i in range(WORKERS):
    home = pod.root / f"worker{i}"
    assert f"worker worker{i}: started pid" in out, out
    _wait_for_text(home / "dataseg_exp one.log", "fake dataseg.main started")
    assert (home / "python_argv.txt").read_text().splitlines() == want
    pid = int((home / "dataseg_exp one.pid").read_text())
    pids.append(pid)
    # The recorded pid is python itself, not a shell around it.
    assert (
      pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"python")
      or b"python" in pathlib.Path(f"/proc/{pid}/comm").read_bytes()
    )

  out = pod.run("logs", "exp one", FOLLOW="0")
  for i in range(WORKERS):
    assert f"[worker{i}] fake dataseg.main started" in out, out
  out = pod.run("status")
  assert "slice pod: MISSING" in out
  for i in range(WORKERS):
    assert f"worker worker{i}: dataseg_exp one pid {pids[i]} running" in out, out

  out = pod.run("stop")
  for i, pid in enumerate(pids):
    assert f"worker worker{i}: pid {pid} stopped" in out, out
    assert "got SIGTERM, exiting 0" in (pod.root / f"worker{i}" / "dataseg_exp one.log").read_text()
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)


@pytest.mark.parametrize(
  "accelerator,version",
  [
    ("v4-64", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-128", "v2-alpha-tpuv5"),
    ("v6e-64", "v2-alpha-tpuv6e"),
  ],
)
def test_runtime_version_follows_the_accelerator(pod, accelerator, version):
  pod.run("create", ACCELERATOR=accelerator)
  assert f"--version={version}" in pod.calls()[-1]
  assert f"--accelerator-type={accelerator}" in pod.calls()[-1]


def test_queued_spot_create(pod):
  pod.run("create", QUEUED="1", SPOT="1")
  create = pod.calls()[0]
  assert [a for a in create if not a.startswith("--")] == [
    "compute",
    "tpus",
    "queued-resources",
    "create",
    "pod",
  ]
  assert {"--node-id=pod", "--spot", "--runtime-version=tpu-ubuntu2204-base"} <= set(create)
  assert _verb(pod.calls()[-1]) == "describe"  # waited for ACTIVE.


def test_recover_recreates_a_preempted_slice_and_runs(pod):
  pod.run("create")
  (pod.root / "state").write_text("PREEMPTED")
  pod.install_fake_venv()  # what `setup` would have installed (setup itself is faked).
  out = pod.run("recover", "configs/c.py", "job")
  verbs = [_verb(c) for c in pod.calls()[1:]]
  # describe, delete, create, copy (scp + ssh unpack), setup (ssh), run (ssh).
  assert verbs == ["describe", "delete", "create", "scp", "ssh", "ssh", "ssh"], verbs
  assert "slice pod: PREEMPTED" in out
  for i in range(WORKERS):
    _wait_for_text(pod.root / f"worker{i}" / "dataseg_job.log", "fake dataseg.main started")
  pod.run("stop")
  # A READY slice is only run again (resume), not recreated.
  out = pod.run("recover", "configs/c.py", "job")
  assert [_verb(c) for c in pod.calls()[-2:]] == ["describe", "ssh"]
  pod.run("stop")


def _main(tmp_path, *flags, **env):
  """`python -m dataseg.main` offline: no Hugging Face cache, offline mode, CPU."""
  return subprocess.run(
    [sys.executable, "-m", "dataseg.main", *flags],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
    env=dict(
      os.environ,
      PYTHONPATH=str(ROOT),
      JAX_PLATFORMS="cpu",
      HF_HUB_OFFLINE="1",
      HF_HOME=str(tmp_path / "hf"),
      DATASEG_TEXT_CACHE=str(tmp_path / "text"),
      TF_CPP_MIN_LOG_LEVEL="3",
      **env,
    ),
  )


def test_paper_config_without_data_or_network_fails_fast(tmp_path):
  """No datasets and no cached text encoder: one line each, then exit; no retries, no trace."""
  workdir = tmp_path / "W"
  proc = _main(tmp_path, "--config=configs/coco_r50.py", f"--workdir={workdir}")
  assert proc.returncode != 0
  err = proc.stderr
  assert "Traceback" not in err, err[-5000:]
  assert "dataseg: cannot start:" in err, err[-5000:]
  assert "TFDS coco/2017_panoptic is not prepared" in err and "tfds build" in err
  assert "openai/clip-vit-large-patch14" in err
  assert "python -m dataseg.text --vocab=coco_panoptic" in err
  assert not workdir.exists()  # stopped before creating anything.


def test_unknown_config_key_names_parent_and_close_matches(tmp_path):
  proc = _main(
    tmp_path,
    "--config=configs/demo.py:smoke",
    "--config.optimizer.lrr=1",
    f"--workdir={tmp_path / 'W'}",
  )
  assert proc.returncode != 0
  assert (
    "unknown config key 'optimizer.lrr': optimizer has no 'lrr'; close matches: optimizer.lr"
  ) in proc.stderr, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
