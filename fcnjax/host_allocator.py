"""The C library's allocator, set to keep the memory that a step frees for the next step (glibc on Linux; opt-in).

XLA's CPU runtime allocates each step's temporaries as one block, from one of its worker threads: 1.2 GB for
fcn_resnet101's train step at batch 2, 224x224. glibc serves a block over 64 MB in a worker thread with a fresh mmap
and unmaps it when it is freed, so every step faults all its pages in again and the kernel zeroes each of them
(350,000 page faults a step). keep_freed_memory() makes every thread allocate from the one main heap, never by
mmap, and never give the heap's free top back: after the first steps, steps reuse the pages of earlier ones and
fault none.

What that is worth depends on what a page fault costs, which on a 2-core Xeon VM varied from run to run: perf put
up to 65% of fcn_resnet101's train step in the kernel's page zeroing, and the large models' train steps gained
0-35%. It costs memory (the process keeps its peak, and the heap grows to hold a step's block beside what fragments
it: fcn8s' train step 6.7-8.3 GB peak RSS against 4.0-4.4 GB), and the mobile models' steps were up to 30% slower
with it when compiled in the same process. Hence opt-in: the entry points' --keep_freed_memory.
`python -m benchmarks.host_allocator` measures both settings per model and framework (docs/performance.md has the
figures).
"""
from __future__ import annotations

import ctypes
import os
import warnings

# mallopt's parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
# mallopt takes an int; glibc converts the threshold to size_t, so -1 is the largest size: never trim.
_NEVER = -1


def is_glibc() -> bool:
  try:
    return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
  except (ValueError, OSError, AttributeError):  # another C library or system
    return False


def keep_freed_memory() -> bool:
  """Sets glibc's allocator as the module says; returns whether it was set (False with another C library).

  Call it before JAX's backend starts (the entry points do with --keep_freed_memory): a thread that allocated
  before keeps a heap of its own, and a block of over 64 MB there is mapped and unmapped as before."""
  if not is_glibc():
    return False
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    warnings.warn("fcnjax: keep_freed_memory() after JAX's backend started: its threads may keep their own heaps")
  mallopt = ctypes.CDLL(None).mallopt
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  # One heap for every thread: the others' heaps hold at most 64 MB, and larger blocks fall back to mmap there.
  return all(mallopt(param, value) == 1 for param, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER)))
