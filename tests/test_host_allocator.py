"""fcnjax.host_allocator: a block that a worker thread frees is reused by the next one without new page faults; the
environment benchmarks.host_allocator starts a huge-pages run with."""
import subprocess
import sys

import pytest

from benchmarks import host_allocator as benchmark
from fcnjax import host_allocator

pytestmark = pytest.mark.skipif(not host_allocator.is_glibc(), reason="glibc's allocator only")

# A worker thread allocates a 256 MB block, writes it, frees it, and does so again, as XLA's CPU runtime allocates a
# step's temporaries; the process prints the page faults of the second round. glibc maps such a block afresh each
# time (65,536 pages of 4 KiB to fault in and zero); kept in the heap, the second round reuses the first's pages.
_SCRIPT = """
import ctypes, resource, sys, threading
if sys.argv[1] == "keep":
  from fcnjax import host_allocator
  assert host_allocator.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 256 << 20
faults = []
def step():
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(SIZE)
  ctypes.memset(block, 1, SIZE)
  libc.free(block)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
for _ in range(2):
  worker = threading.Thread(target=step)
  worker.start()
  worker.join()
print(faults[1])
"""


def _second_round_faults(setting: str) -> int:
  result = subprocess.run([sys.executable, "-c", _SCRIPT, setting], capture_output=True, text=True, check=True)
  return int(result.stdout.split()[-1])


def test_a_freed_block_is_reused_without_page_faults():
  assert _second_round_faults("default") > 30_000  # glibc's default maps the block again
  assert _second_round_faults("keep") < 1_000


def test_the_huge_pages_tunable_is_added_to_or_taken_from_the_others():
  environ = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.malloc.arena_max=2", "HOME": "/h"}
  assert benchmark.huge_pages_environment(environ, on=True) == {
      "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "HOME": "/h"}
  assert benchmark.huge_pages_environment(environ, on=False) == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2",
                                                                  "HOME": "/h"}
  assert benchmark.huge_pages_environment({"GLIBC_TUNABLES": benchmark.HUGE_PAGES_TUNABLE}, on=False) == {}

