"""Jax's persistent compilation cache, on by default for training, prediction and benches.

Why: the R50 train step compiles for tens of seconds on a CPU and minutes on an accelerator
(issue 15), and a resume, a restart after pre-emption or a second session compiles exactly
the same programs. XLA's executables go to `config.compilation_cache_dir` (DEFAULT_DIR unless
set; '' disables; jax's JAX_COMPILATION_CACHE_DIR wins over the default, as the tests and
clusters use it) and any later process with the same program, jax version and devices reads
them back. `enable` must run before the first program compiles (dataseg.main, the
Predictor's `load_run`, the benches); it caches every program, however small, and lowers
threefry as one GPU kernel (the ~250 initialiser draws' unrolled rounds were most of the
init's compile time; same bits).
"""

import atexit
import json
import os
import threading

DEFAULT_DIR = os.path.join("~", ".cache", "dataseg", "jax_compilation_cache")
JAX_ENV_VAR = "JAX_COMPILATION_CACHE_DIR"
# When set, the process writes `stats()` (+ the cache dir) as JSON to this path at exit
# (bench/compile_cache.py reads it from its dataseg.main runs).
STATS_ENV_VAR = "DATASEG_COMPILE_STATS"

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"

_lock = threading.Lock()
_stats = dict(compile_s=0.0, programs=0, cache_hits=0)
_listening = False


def enable(cache_dir: str, min_compile_time_secs: float = 0.0) -> str:
  """Turns jax's persistent compilation cache on at `cache_dir`; '' leaves it off.

  Args:
    cache_dir: directory ('~' expanded; created if local); '' disables the cache.
    min_compile_time_secs: programs that compiled faster than this are not written
      (jax's default is 1 s; 0 caches everything).

  Returns:
    The directory in use, or '' when disabled. Also starts counting compile time
    (`stats()`), cache or not.
  """
  import jax  # pylint: disable=g-import-not-at-top

  _listen()
  jax.config.update("jax_threefry_gpu_kernel_lowering", True)
  if not cache_dir:
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_enable_compilation_cache", False)
    _report_at_exit("")
    return ""
  path = cache_dir
  if path == DEFAULT_DIR and os.environ.get(JAX_ENV_VAR):
    path = os.environ[JAX_ENV_VAR]
  if "://" not in path:
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  _report_at_exit(path)
  return path


def _report_at_exit(path):
  out = os.environ.get(STATS_ENV_VAR)
  if out:

    def write():
      with open(out, "w") as f:
        json.dump(dict(stats(), cache_dir=path), f)

    atexit.register(write)


def _listen():
  """Sums XLA compile time (or, on a cache hit, load time) and counts cache hits."""
  global _listening
  import jax  # pylint: disable=g-import-not-at-top

  with _lock:
    if _listening:
      return
    _listening = True

  def on_duration(event, duration, **_):
    if event == _BACKEND_COMPILE_EVENT:
      with _lock:
        _stats["compile_s"] += duration
        _stats["programs"] += 1

  def on_event(event, **_):
    if event == _CACHE_HIT_EVENT:
      with _lock:
        _stats["cache_hits"] += 1

  jax.monitoring.register_event_duration_secs_listener(on_duration)
  jax.monitoring.register_event_listener(on_event)


def stats() -> dict:
  """Since `enable`: compile_s (XLA compile or cache-load seconds, summed over programs),
  programs (backend compilations requested), cache_hits (of those, read from the cache)."""
  with _lock:
    return dict(_stats)


def summary() -> str:
  s = stats()
  return (
    f"XLA compile {s['compile_s']:.1f} s for {s['programs']} programs "
    f"({s['cache_hits']} from the persistent compilation cache)"
  )
