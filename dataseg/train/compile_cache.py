"""Jax's persistent compilation cache, on by default for training, prediction and benches.

Why: the R50 train step takes tens of seconds to compile on a CPU and minutes on an
accelerator (issue 15); a restart after pre-emption, a resume or a second debug run
recompiles exactly the programs it compiled before. With the cache, XLA's executables are
written to `config.compilation_cache_dir` and read back by any later process whose program,
jax/jaxlib version, backend and devices match (jax keys the entries on all of them), on CPU,
GPU and TPU alike. The directory may be local or any path jax's cache accepts (gs://...
on Cloud TPU). '' disables the cache.

Default directory: DEFAULT_DIR (`~/.cache/dataseg/jax_compilation_cache`, the default of
`config.compilation_cache_dir`). When the config keeps that default and jax's own
environment variable JAX_COMPILATION_CACHE_DIR is set, jax's variable wins (the test suite
and clusters point every process at one directory that way); an explicit config value
always wins.

jax reads the settings when it compiles its first program in a process, so `enable` must run
before the first `jax.jit` call compiles (dataseg.main calls it right after distributed
initialisation; the benches at start-up; the Predictor before it builds its programs).

`enable` also sets `jax_threefry_gpu_kernel_lowering` (GPU only; CPU and TPU ignore it):
threefry as one CUDA kernel instead of its unrolled rounds in every program. Why: the
parameter init is ~250 initialiser draws (no forward: jit drops it as dead code), and
their unrolled threefry was most of its compile time (37 s of CPU time on the R50 model on
this project's CPU; 67 s on an H200 in issue 15). Same bits either way.

`enable` also lowers jax's thresholds so that every program is cached: by default jax skips
programs that compiled in under a second, which on a CPU is most of the small ones a run
compiles (initialisers, metrics, evaluation helpers), and together those are seconds.
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
  return (f"XLA compile {s['compile_s']:.1f} s for {s['programs']} programs "
          f"({s['cache_hits']} from the persistent compilation cache)")
