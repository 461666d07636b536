"""glibc malloc settings under which a training process keeps freed memory for reuse.

Why (issue 15): XLA:CPU allocates each execution's temporaries anew, GBs for an R50 train
step, and glibc serves blocks above its mmap threshold (at most 32 MiB) with mmap and
unmaps them when they are freed. So every step page-faults its temporaries in again: 2.2 M
minor faults and 4-5 s of system time per 512x512 step on 2 cores
(`python bench/train_step.py --side ours --sizes 512 --batch 2`), where torch's own
allocations mostly reuse freed memory. With no mmap'd blocks, no trimming of the heap and
one arena, the next step reuses the same pages: 0 faults, and that step took 8.7-9.1 s
instead of 10.8-12.3 s (README, "Performance against Mask2Former").

`retain_freed_memory()` sets them with mallopt(3) at run time; `apply(config value)` is what
`dataseg.main` and bench/train_step.py / inference.py call before jax starts.
`config.retain_freed_memory`: False (default), True, or 'cpu' (on when jax will compute on
the host CPU, `computes_on_cpu`; on GPU and TPU hosts the temporaries are device memory).
Why off by default: with one arena XLA's compiler threads contend for it. A cold compile of
`bench/train_step.py --side ours --sizes 128 --compilation_cache ''` took 62.2 s instead of
46.1 s (init 33.8 instead of 25.9 s); MALLOC_ARENA_MAX=1 alone: 65.6 s; no mmap and no
trimming alone: 39.8 s, but 0.21 M faults per step remain (XLA's threads allocate the
temporaries from other arenas, whose large blocks are always mmap'd). With it as the
default, the test suite (its dataseg.main runs compile cold) took 12.8 min, and the demo's
run 5:49 instead of 4:56 (side by side, one core each, its programs compiled cold). Its
gain is in long CPU runs. The demo's training steps
(`python -m dataseg.main --config=configs/demo.py:steps=60`) with it and without peaked
at 3.51 / 3.76 GB resident, with 5.7 / 18.2 s of system time and 1.78 / 1.68 steps/s
(1 Dec 2026). The heap never shrinks, so a process keeps its peak, and programs of several
sizes in one process add up: `bench/train_step.py --sizes 256,512 --retain_freed_memory
true` peaked at 18.6 GB resident (once killed for memory on this 24 GiB machine while
other jobs ran).
No-op (False) where glibc's mallopt is not available. The same settings as environment
variables for a process started with them: `ENV` (bench/train_step.py --malloc_retain,
which gives them to the reference's subprocess too).
"""

import ctypes
import ctypes.util
import os
import sys

# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
# glibc's environment variables for the same (read when the process starts).
ENV = {
  "MALLOC_ARENA_MAX": "1",
  "MALLOC_MMAP_MAX_": "0",
  "MALLOC_TRIM_THRESHOLD_": str(2**40),
}


def retain_freed_memory() -> bool:
  """One arena, no mmap'd blocks, no trimming (mallopt). True when glibc took all three.

  Call it early, before other threads allocate (later arenas are not merged; the limit
  applies from then on). M_TRIM_THRESHOLD = -1 disables trimming (mallopt(3)).
  """
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  results = [mallopt(param, value) for param, value in _SETTINGS]
  return all(r == 1 for r in results)


# Device files of accelerators jax can use (NVIDIA, AMD ROCm, Cloud TPU).
ACCELERATOR_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/accel0", "/dev/vfio/0")


def computes_on_cpu() -> bool:
  """Whether jax will run on the host CPU, decided before jax starts.

  JAX_PLATFORMS when set (its first platform); otherwise True when the host has no
  accelerator device file (ACCELERATOR_FILES). Asking jax instead would start its backend,
  and the malloc settings must precede the threads that allocate XLA's temporaries (set
  after, the 256x256 step still took 0.52 M page faults; bench/train_step.py).
  """
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(os.path.exists(path) for path in ACCELERATOR_FILES)


def apply(setting) -> bool:
  """Applies `config.retain_freed_memory` before jax starts; True when memory is retained.

  setting: True, False, or 'cpu' (the default): retained when jax will compute on the host
  CPU (computes_on_cpu). There XLA's temporaries are host memory, page-faulted in anew
  every step; on a GPU or TPU host they are device memory, and one malloc arena would only
  serialise the input pipeline's threads.
  """
  if setting == "cpu":
    setting = computes_on_cpu()
  if not isinstance(setting, bool):
    raise ValueError(
      f"config.retain_freed_memory={setting!r} is not allowed; allowed: True, False, 'cpu'"
    )
  return setting and retain_freed_memory()
