"""Shared fixtures of the trainer tests: one prepared data dir, text embeddings, a driver.

Everything expensive is built once per session: the synthetic dataset of
`trainer_driver.DATASET`, random unit class-name embeddings (a .npy, so no text encoder
runs), and a persistent XLA compilation cache that the trainer subprocesses share (the
same config compiles the same programs: later runs load them instead of recompiling).
Under pytest-xdist "once per session" means once for all workers: the first worker that
needs `tiny_env` or `reference_run` builds it in the run's shared temporary folder under a
file lock, the others wait for it and reuse it (the cache then also saves the second
worker's compilations; jax locks its cache files when a size limit is set, as here).
"""

import os
import pathlib
import shutil
import subprocess
import sys
import types

import filelock
import numpy as np
import pytest

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
# LLVM's expensive passes dominate compile time of the tiny model on CPU; numerics of
# the compared runs come from the same flags, so equality checks are unaffected.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def subprocess_env(cache_dir, devices=1, **extra):
  env = dict(os.environ)
  env.update(
    PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    JAX_PLATFORMS="cpu",
    # The caller's XLA flags first (e.g. --xla_cpu_max_isa=AVX2 for a run of the suite
    # with other vector code), then ours.
    XLA_FLAGS=(
      f"{env.get('XLA_FLAGS', '')} {FAST_COMPILE} --xla_force_host_platform_device_count={devices}"
    ).strip(),
    JAX_COMPILATION_CACHE_DIR=str(cache_dir),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    # A limit turns on jax's file lock around cache reads and writes (xdist workers share
    # the cache); far above what the suite writes, so nothing is evicted.
    JAX_COMPILATION_CACHE_MAX_SIZE=str(1 << 34),
    TF_CPP_MIN_LOG_LEVEL="3",
    CUDA_VISIBLE_DEVICES="",
    # tests/trainer_driver.py runs: no tf.data autotuning, whose thread keeps a run's exit
    # waiting up to half the iterator's age (10-50 s idle per run; same batches without).
    DRIVER_TF_DATA_AUTOTUNE="0",
  )
  env.update({k: str(v) for k, v in extra.items()})
  return env


@pytest.fixture(scope="session")
def tiny_env(tmp_path_factory):
  """Prepared data dir, embeddings .npy and compile cache of the tiny trainer config.

  Returns a namespace: data_dir, emb, cache_dir, config(**overrides) -> ConfigDict,
  config_arg(steps) -> the --config flag value, env(**extra) -> subprocess env, and
  driver(workdir, *flags, env=..., wait=True) -> CompletedProcess | Popen.
  """
  sys.path.insert(0, str(TESTS))
  import trainer_driver  # pylint: disable=g-import-not-at-top

  from dataseg import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  from input_pipeline import datasets as datasets_lib  # pylint: disable=g-import-not-at-top
  from input_pipeline import synthetic  # pylint: disable=g-import-not-at-top

  base, lock = _shared_dir(tmp_path_factory, "trainer_env")
  data_dir = base / "data"
  emb_path = base / "emb.npy"
  cache_dir = base / "xla_cache"
  with lock:
    if not (base / "ready").exists():
      synthetic.builder(trainer_driver.DATASET, data_dir)
      names = vocab_lib.load(datasets_lib.lookup(trainer_driver.DATASET)["vocab"]).class_names
      emb = np.random.default_rng(0).normal(size=(len(names), trainer_driver.TEXT_DIM))
      emb /= np.linalg.norm(emb, axis=1, keepdims=True)
      np.save(emb_path, emb.astype(np.float32))
      (base / "ready").touch()

  def config(steps=8):
    return trainer_driver.tiny_config(str(data_dir), str(emb_path), steps)

  def config_arg(steps=8):
    return f"{TESTS / 'trainer_driver.py'}:data={data_dir},emb={emb_path},steps={steps}"

  def env(devices=1, **extra):
    return subprocess_env(cache_dir, devices, **extra)

  def driver(workdir, *flags, steps=8, extra_env=None, wait=True, timeout=600):
    cmd = [
      sys.executable,
      str(TESTS / "trainer_driver.py"),
      f"--config={config_arg(steps)}",
      f"--workdir={workdir}",
      *flags,
    ]
    kwargs = dict(
      cwd=str(ROOT),
      env=env(**(extra_env or {})),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    if not wait:
      return subprocess.Popen(cmd, **kwargs)
    return subprocess.run(cmd, timeout=timeout, check=False, **kwargs)

  return types.SimpleNamespace(
    data_dir=data_dir,
    emb=emb_path,
    cache_dir=cache_dir,
    config=config,
    config_arg=config_arg,
    env=env,
    driver=driver,
  )


@pytest.fixture(scope="session")
def reference_run(tiny_env, tmp_path_factory):
  """One uninterrupted 8-step run of `dataseg.main` (checkpoints every 2 steps)."""
  base, lock = _shared_dir(tmp_path_factory, "reference")
  workdir, log = base / "run", base / "run.log"
  with lock:
    if not (base / "ready").exists():
      shutil.rmtree(workdir, ignore_errors=True)  # a failed earlier attempt's leftovers.
      proc = tiny_env.driver(workdir)
      log.write_text(proc.stdout)
      assert proc.returncode == 0, proc.stdout[-5000:]
      (base / "ready").touch()
  return types.SimpleNamespace(workdir=workdir, log=log.read_text())


def _shared_dir(tmp_path_factory, name):
  """(folder, lock) of a session fixture that all xdist workers of this run share.

  Without xdist: a fresh folder and a lock nobody else takes. With it: `name` in the run's
  temporary root (the parent of every worker's basetemp), and a file lock beside it; the
  fixture builds the folder's contents under the lock unless a `ready` file says that
  another worker already did.
  """
  if "PYTEST_XDIST_WORKER" not in os.environ:
    base = tmp_path_factory.mktemp(name)
  else:
    base = tmp_path_factory.getbasetemp().parent / name
    base.mkdir(exist_ok=True)
  return base, filelock.FileLock(f"{base}.lock")
