"""A full disk while saving: the run stops with one line that says the disk is full, where and how much is free; the
last finished checkpoint stays readable (the save in flight never looks finished); the same command, once space is
freed, resumes from it and finishes.

The disk fills for real on a 4 MiB tmpfs where this process may mount one (root), and otherwise by a write that fails
with ENOSPC half-way through a checkpoint save (reliability_helpers' enospc_in_save), which every CI runs.
"""
import errno
import os
import re
import shutil
import subprocess
import sys

import pytest

import reliability_helpers as h
from fcnjax import diskspace

NUM_STEPS = 12
RUN = (f"--config.train.num_steps={NUM_STEPS}",)  # helper config: checkpoint every step, keep 2, evaluate every 4


def test_full_disk_recognised_in_python_and_tensorstore_errors():
  python_error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/run/metrics.jsonl")
  tensorstore_error = ValueError(
      'RESOURCE_EXHAUSTED: Error writing local file "/data/run/checkpoints/5.orbax-checkpoint-tmp/state/_sharding": '
      "Failed to write 30665 bytes to file 7: No space left on device [os_error_code='28']")
  try:
    try:
      raise tensorstore_error
    except ValueError as e:
      raise RuntimeError("background save failed") from e
  except RuntimeError as e:
    wrapped = e
  for error in (python_error, tensorstore_error, wrapped, OSError(errno.EDQUOT, "Disk quota exceeded")):
    assert diskspace.is_disk_full(error), error
  for error in (OSError(errno.EACCES, "Permission denied", "/x"), ValueError("RESOURCE_EXHAUSTED: out of memory")):
    assert not diskspace.is_disk_full(error), error
  assert diskspace.failed_path(python_error) == "/data/run/metrics.jsonl"
  assert diskspace.failed_path(wrapped) == "/data/run/checkpoints/5.orbax-checkpoint-tmp/state/_sharding"


def test_full_disk_message_names_the_checkpoint_to_resume_from(tmp_path):
  for name in ("3", "4", "5.orbax-checkpoint-tmp", "_to_delete"):
    (tmp_path / "checkpoints" / name).mkdir(parents=True)
  error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp"))
  message = str(diskspace.training_disk_full_error(error, str(tmp_path)))
  assert "\n" not in message
  assert message.startswith(f"disk full: no space left writing {tmp_path}/checkpoints/5.orbax-checkpoint-tmp")
  assert re.search(r"\(\d+(\.\d)? (bytes|KiB|MiB|GiB|TiB) free of \d+(\.\d)? (bytes|KiB|MiB|GiB|TiB) on the "
                   f"filesystem mounted at {diskspace.mount_point(str(tmp_path))}\\)", message), message
  assert f"step 4 in {tmp_path}/checkpoints, is intact" in message and "resume" in message
  empty = tmp_path / "fresh"
  assert "holds no finished checkpoint yet" in str(diskspace.training_disk_full_error(error, str(empty)))


# The metric writer on a disk that fills after its first record: every later flush fails with ENOSPC.
_FILLING_WRITER = """
import errno, sys
from tensorboardX import record_writer
from fcnjax import reporting
writer = reporting.MetricWriter(sys.argv[1])
writer.write("train", 1, {"loss": 1.0})
def flush(self):
  raise OSError(errno.ENOSPC, "No space left on device")
record_writer.RecordWriter.flush = flush
for call in (lambda: writer.write("train", 2, {"loss": 0.5}), writer.close):
  try:
    call()
  except OSError as e:
    print("raised", e.errno)
"""


def test_metric_writer_on_a_full_disk_closes_without_exit_noise(tmp_path):
  """The writer's error reaches the caller once; at exit neither tensorboardX's hook nor its thread prints."""
  result = subprocess.run([sys.executable, "-c", _FILLING_WRITER, str(tmp_path)], env=h.env(), cwd=h.REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split("\n")[:2] == [f"raised {errno.ENOSPC}"] * 2, result.stdout
  assert result.stderr.strip() == "", result.stderr[-3000:]


def _assert_stopped_on_full_disk(result, workdir, last_step: int, mount: str):
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
  assert lines[0].startswith("DiskFullError: disk full: no space left writing "), lines[0]
  assert f"on the filesystem mounted at {mount}" in lines[0], lines[0]
  assert f"step {last_step} in {workdir / 'checkpoints'}, is intact" in lines[0], lines[0]
  steps = [int(s) for s in h.step_dirs(workdir / "checkpoints")["complete"]]
  assert max(steps) == last_step, steps
  state = h.read_state(workdir / "checkpoints", last_step)["state"]
  assert int(state["step"]) == last_step and h.all_finite(state["params"])


def _assert_resumes_and_finishes(workdir, last_step: int):
  logged = len(h.metrics(workdir))
  result = h.run_train(workdir, *RUN)
  assert result.returncode == 0, result.stderr[-3000:]
  resumed = [r["step"] for r in h.metrics(workdir)[logged:] if r["kind"] == "train"]
  assert resumed == list(range(last_step + 1, NUM_STEPS + 1)), resumed
  assert h.step_dirs(workdir / "checkpoints") == {"complete": [str(NUM_STEPS - 1), str(NUM_STEPS)], "partial": []}


@pytest.mark.slow
def test_write_failing_with_enospc_mid_save_stops_and_resumes(tmp_path):
  workdir = tmp_path / "run"
  result = h.run_train(workdir, *RUN, inject="enospc_in_save:checkpoints/5")
  _assert_stopped_on_full_disk(result, workdir, last_step=4, mount=diskspace.mount_point(str(tmp_path)))
  assert f"writing {workdir}/checkpoints/5.orbax-checkpoint-tmp" in result.stderr
  _assert_resumes_and_finishes(workdir, last_step=4)


@pytest.fixture
def small_filesystem(tmp_path):
  """A 4 MiB tmpfs, mounted for the test and unmounted after it; skips where mounting is not allowed."""
  mount = tmp_path / "small"
  mount.mkdir()
  if not shutil.which("mount") or os.geteuid() != 0:
    pytest.skip("mounting a tmpfs needs root")
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                           text=True)
  if mounted.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
  try:
    yield mount
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_filesystem_filling_up_stops_and_resumes_after_space_is_freed(small_filesystem):
  workdir = small_filesystem / "run"
  result = h.run_train(workdir, *RUN, "--config.train.max_steps_per_run=4")
  assert result.returncode == 0, result.stderr[-3000:]
  finished = {folder: h.tree_digest(workdir / folder / "4") for folder in ("checkpoints", "best")}
  filler = small_filesystem / "filler"
  # 100 KiB left: less than a checkpoint of the tiny U-Net (about 370 KiB), more than its metrics records.
  with open(filler, "wb") as f:
    f.write(b"\0" * (shutil.disk_usage(small_filesystem).free - 100 * 1024))
  result = h.run_train(workdir, *RUN)
  _assert_stopped_on_full_disk(result, workdir, last_step=4, mount=str(small_filesystem))
  assert {folder: h.tree_digest(workdir / folder / "4") for folder in finished} == finished
  filler.unlink()
  _assert_resumes_and_finishes(workdir, last_step=4)
