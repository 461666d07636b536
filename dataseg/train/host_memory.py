"""glibc malloc settings under which a training process keeps freed memory for reuse.

Why (issue 15): XLA:CPU allocates each execution's temporaries anew, GBs for an R50 train
step, and glibc serves blocks above its mmap threshold (at most 32 MiB) with mmap and
unmaps them when they are freed. So every step page-faults its temporaries in again: 2.2 M
minor faults and 4-5 s of system time per 512x512 step on 2 cores
(`python bench/train_step.py --side ours --sizes 512 --batch 2`), where torch's own
allocations mostly reuse freed memory. With no mmap'd blocks, no trimming of the heap and
one arena, the next step reuses the same pages: 0 faults, and that step took 8.7-9.1 s
instead of 10.8-12.3 s (README, "Performance against Mask2Former"). The price: the process
keeps its peak memory, and more (below).

`retain_freed_memory()` sets them with mallopt(3) at run time: `dataseg.main` calls it
before jax starts when `config.retain_freed_memory` is True. Off by default: the heap
never shrinks and can fragment. `bench/train_step.py --retain_freed_memory --sizes 256,512`
(a 256x256 then a 512x512 program in one process) was killed for memory on a 24 GiB
machine, where each size alone ran. No-op (False) where glibc's mallopt is not available.
The same settings as environment variables for a process started with them: `ENV`
(bench/train_step.py --malloc_retain).
"""

import ctypes
import ctypes.util
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
