"""The persistent compilation cache helper: entries written, and the config key disables it.

Each case runs in a fresh Python process: jax reads the cache settings once per process,
when it compiles its first program, so an in-process test would depend on test order.
"""

import json
import os
import subprocess
import sys

from configs import common
from dataseg.train import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROGRAM = r"""
import json, sys
from dataseg.train import compile_cache
used = compile_cache.enable(sys.argv[1])
import jax, jax.numpy as jnp
x = jax.jit(lambda a: jnp.sin(a) * 2 + 1)(jnp.arange(8.0))
jax.block_until_ready(x)
print(json.dumps(dict(used=used, stats=compile_cache.stats())))
"""


def _run(cache_arg, tmp_path, env_cache=None):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", HOME=str(tmp_path / "home"))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  if env_cache:
    env["JAX_COMPILATION_CACHE_DIR"] = env_cache
  proc = subprocess.run(
    [sys.executable, "-c", _PROGRAM, cache_arg],
    env=env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=True,
    timeout=300,
  )
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _entries(path):
  return [f for _, _, files in os.walk(path) for f in files] if os.path.isdir(path) else []


def test_config_default_is_the_documented_dir():
  assert common.base_config().compilation_cache_dir == compile_cache.DEFAULT_DIR.replace(
    os.sep, "/"
  )


def test_cache_gets_entries_and_second_process_hits(tmp_path):
  cache = tmp_path / "cache"
  first = _run(str(cache), tmp_path)
  assert first["used"] == str(cache)
  assert _entries(cache), "no cache entry written after a jitted run"
  assert first["stats"]["programs"] >= 1
  second = _run(str(cache), tmp_path)
  assert second["stats"]["cache_hits"] >= 1


def test_empty_key_disables(tmp_path):
  out = _run("", tmp_path, env_cache=str(tmp_path / "env_cache"))
  assert out["used"] == ""
  assert out["stats"]["cache_hits"] == 0
  assert not _entries(tmp_path / "env_cache")
  assert not _entries(tmp_path / "home")


def test_default_goes_to_home_unless_jax_env_var(tmp_path):
  out = _run(compile_cache.DEFAULT_DIR, tmp_path)
  assert out["used"] == str(tmp_path / "home" / ".cache" / "dataseg" / "jax_compilation_cache")
  assert _entries(out["used"])
  env_dir = str(tmp_path / "env_cache")
  assert _run(compile_cache.DEFAULT_DIR, tmp_path, env_cache=env_dir)["used"] == env_dir
  assert _entries(env_dir)
