"""A full disk (or an exhausted quota), recognised in whatever form it reaches the training run, and said in one line.

Python raises OSError(ENOSPC); orbax's array writes go through tensorstore, which raises ValueError("RESOURCE_EXHAUSTED:
... No space left on device [os_error_code='28']"), often wrapped by orbax's background threads. Both mean the same
to a user: free space, then run the same command, which resumes from the last finished checkpoint.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from typing import Iterator

# What the C library's strerror and tensorstore's status text say for ENOSPC and EDQUOT.
_MESSAGES = ("No space left on device", "Disk quota exceeded", "os_error_code='28'", "os_error_code='122'")
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')


class DiskFullError(OSError):
  """No space left on the filesystem of the run's workdir; the message says where and which checkpoint is intact."""

  def __init__(self, message: str, path: str | None = None):
    super().__init__(errno.ENOSPC, message)
    self.message, self.path = message, path

  def __str__(self) -> str:
    return self.message


def _chain(error: BaseException | None) -> Iterator[BaseException]:
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def is_disk_full(error: BaseException) -> bool:
  """True when `error`, or an error it was raised from, is ENOSPC / EDQUOT (Python's or tensorstore's)."""
  for e in _chain(error):
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if any(text in str(e) for text in _MESSAGES):
      return True
  return False


def text_is_disk_full(text: str) -> bool:
  return any(message in text for message in _MESSAGES)


def failed_path(error: BaseException) -> str | None:
  """The file whose write failed, where the error names one."""
  for e in _chain(error):
    if isinstance(e, OSError) and e.filename:
      return os.fspath(e.filename)
    match = _QUOTED_PATH.search(str(e))
    if match:
      return match.group(1)
  return None


def _existing_ancestor(path: str) -> str:
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return path


def mount_point(path: str) -> str:
  path = _existing_ancestor(path)
  while not os.path.ismount(path):
    path = os.path.dirname(path)
  return path


def _size(num_bytes: int) -> str:
  for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
    if num_bytes < 1024 or unit == "TiB":
      return f"{num_bytes} {unit}" if unit == "bytes" else f"{num_bytes:.1f} {unit}"
    num_bytes /= 1024
  raise AssertionError("unreachable")


def free_space(path: str) -> str:
  """'4.0 KiB free of 4.0 MiB on the filesystem mounted at /mnt/x' for the filesystem holding `path`."""
  existing = _existing_ancestor(path)
  usage = shutil.disk_usage(existing)
  return f"{_size(usage.free)} free of {_size(usage.total)} on the filesystem mounted at {mount_point(existing)}"


def finished_steps(directory: str) -> list[int]:
  """The step directories orbax has committed (renamed from their temporary name) in `directory`."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def training_disk_full_error(error: BaseException, workdir: str) -> DiskFullError:
  """The one-line DiskFullError for a training run in `workdir` that `error` (is_disk_full) stopped."""
  workdir = os.path.abspath(workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  path = failed_path(error)
  what = f"writing {path}" if path else f"writing to {workdir}"
  steps = finished_steps(checkpoints)
  if steps:
    resume = (f"the last finished checkpoint, step {steps[-1]} in {checkpoints}, is intact: free space (or use "
              f"another --workdir) and run the same command to resume from it")
  else:
    resume = (f"{checkpoints} holds no finished checkpoint yet: free space (or use another --workdir) and run the "
              "same command to start again")
  return DiskFullError(f"disk full: no space left {what} ({free_space(workdir)}); {resume}", path)
