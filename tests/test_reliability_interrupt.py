"""Interruption: one training run's life with six interruptions, each a real process killed (SIGKILL) or stopped
(SIGTERM, SIGINT), each followed by the same command again.

After every interruption each step directory on disk must restore (none looks complete without being so), and the
run that finally finishes must have the parameters and the loss curve of a run that was never interrupted.
"""
import random
import re
import signal
import time

import numpy as np
import pytest

import reliability_helpers as h
from fcnjax import checkpoint

NUM_STEPS = 12
RUN = (f"--config.train.num_steps={NUM_STEPS}",)  # helper config: checkpoint every step, keep 2, evaluate every 4
STOPPED = re.compile(r"(SIGTERM|SIGINT): saved a checkpoint at step (\d+)")


def _readable_steps(workdir, when: str) -> list[int]:
  """Restores every step directory orbax would list in checkpoints/ and best/; returns the checkpoints/ steps."""
  found = {}
  for folder in ("checkpoints", "best"):
    for name in h.step_dirs(workdir / folder)["complete"]:
      try:
        state = h.read_state(workdir / folder, int(name))["state"]
      except Exception as e:  # pylint: disable=broad-except
        raise AssertionError(f"{when}: {folder}/{name} looks complete but does not restore: {e}") from e
      assert int(state["step"]) == int(name), f"{when}: {folder}/{name} holds step {state['step']}"
      assert h.all_finite(state["params"]), f"{when}: {folder}/{name}"
      found.setdefault(folder, []).append(int(name))
  return sorted(found.get("checkpoints", []))


def _steps_logged(workdir) -> int:
  return len(h.train_records(workdir))


def _start_and_wait_for_a_step(workdir, log=None):
  """Starts the same command again; returns once this process has logged a step (it is in the training loop)."""
  logged = _steps_logged(workdir)
  process = h.start_train(workdir, *RUN, log=log)
  h.wait_for(lambda: _steps_logged(workdir) > logged, process)
  return process


def _kill_before_commit(workdir, rng, tmp_path):
  # Step 4 fully written (commit_success.txt included) but not renamed, while best/4 (the evaluation at step 4) is
  # committed: the restart must ignore and remove the temporary step, and must not fail on saving best/4 again.
  result = h.run_train(workdir, *RUN, inject="kill_before_rename:checkpoints/4,best/4")
  assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
  assert any(".orbax-checkpoint-tmp" in name for name in h.step_dirs(workdir / "checkpoints")["partial"])
  return "SIGKILL before step 4's rename"


def _kill_while_deleting(workdir, rng, tmp_path):
  # Three files into the removal of a step past keep_checkpoints.
  result = h.run_train(workdir, *RUN, inject="kill_in_delete:3")
  assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
  return "SIGKILL halfway through deleting an old step"


def _kill_at_random(workdir, rng, tmp_path):
  delay = rng.uniform(0.0, 0.5)
  process = _start_and_wait_for_a_step(workdir)
  time.sleep(delay)
  process.kill()
  process.wait(timeout=60)
  return f"SIGKILL {delay:.2f}s after the first step"


def _temporary_steps(workdir) -> set[tuple[str, int]]:
  folder = workdir / "checkpoints"
  found = set()
  for name in h.step_dirs(folder)["partial"]:
    try:
      found.add((name, (folder / name).stat().st_ino))
    except FileNotFoundError:  # renamed (committed) or cleaned up since listed
      pass
  return found


def _kill_during_background_write(workdir, rng, tmp_path):
  stale = _temporary_steps(workdir)  # left by an earlier kill; a new write makes a new directory
  process = _start_and_wait_for_a_step(workdir)
  h.wait_for(lambda: _temporary_steps(workdir) - stale, process, poll=0.001)
  process.kill()
  process.wait(timeout=60)
  return "SIGKILL while orbax wrote a step"


def _stop_with(sig):
  def stop(workdir, rng, tmp_path):
    log = tmp_path / f"{sig.name}.log"
    with open(log, "w") as out:
      process = _start_and_wait_for_a_step(workdir, log=out)
      process.send_signal(sig)
      returncode = process.wait(timeout=h.TIMEOUT)
    output = log.read_text()
    assert returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig], output[-3000:]
    match = STOPPED.search(output)
    assert match and match.group(1) == sig.name, output[-3000:]
    step = int(match.group(2))
    assert _readable_steps(workdir, sig.name)[-1] == step, f"{sig.name}: printed step {step}, not the latest on disk"
    assert h.train_records(workdir)[-1]["step"] == step
    assert h.step_dirs(workdir / "checkpoints")["partial"] == []  # the save was waited for before exiting
    return f"{sig.name} (saved step {step})"
  return stop


FAULTS = [_kill_before_commit, _kill_while_deleting, _kill_at_random, _kill_during_background_write,
          _stop_with(signal.SIGTERM), _stop_with(signal.SIGINT)]


@pytest.mark.slow
def test_interrupted_run_resumes_exactly(tmp_path):
  workdir, reference = tmp_path / "interrupted", tmp_path / "uninterrupted"
  rng = random.Random(20240611)
  history = []
  with open(tmp_path / "uninterrupted.log", "w") as reference_log:
    uninterrupted = None
    try:
      for fault in FAULTS:
        what = fault(workdir, rng, tmp_path)
        if uninterrupted is None:  # started once the first run has filled the compilation cache; CI has 2 cores
          uninterrupted = h.start_train(reference, *RUN, log=reference_log)
        steps = _readable_steps(workdir, what)
        history.append((what, steps, h.step_dirs(workdir / "checkpoints")["partial"]))
        assert steps and steps[-1] < NUM_STEPS, history  # each interruption came before the end
      assert history[0][1] == [2, 3], history

      # The last run goes to the end, while a reader opens the workdir's checkpoints whenever a step is being
      # written (as `fcnjax.predict --workdir` during training does): opening them must not disturb the writer.
      with open(tmp_path / "final.log", "w") as final_log:
        final = h.start_train(workdir, *RUN, log=final_log)
        opened, deadline = 0, time.monotonic() + h.TIMEOUT
        while final.poll() is None and time.monotonic() < deadline:
          if h.step_dirs(workdir / "checkpoints")["partial"]:
            reader = checkpoint.Checkpoints(str(workdir))
            assert reader.latest_step() is not None
            reader.close()
            opened += 1
          time.sleep(0.005)
        final.wait(timeout=1)  # raises if the run outlived its time
      assert final.returncode == 0, (history, (tmp_path / "final.log").read_text()[-3000:])
      assert opened > 0
      assert uninterrupted.wait(timeout=h.TIMEOUT) == 0, (tmp_path / "uninterrupted.log").read_text()[-3000:]
    finally:
      if uninterrupted is not None and uninterrupted.poll() is None:
        uninterrupted.kill()
        uninterrupted.wait()
  for folder in ("checkpoints", "best"):
    assert h.step_dirs(workdir / folder)["partial"] == [], folder  # temporary steps removed by the restarts
    assert list((workdir / folder / "_to_delete").glob("*")) == [], folder  # retired steps removed
  assert _readable_steps(workdir, "the finished run")[-1] == NUM_STEPS
  diff = h.max_abs_diff(h.params_of(reference / "checkpoints", NUM_STEPS),
                        h.params_of(workdir / "checkpoints", NUM_STEPS))
  assert diff <= 1e-6, f"resumed run differs from the uninterrupted run by {diff}; {history}"
  # A replayed step logs again; the last record of each step is that of the run that went on.
  expected = {r["step"]: r["loss"] for r in h.train_records(reference)}
  got = {r["step"]: r["loss"] for r in h.train_records(workdir)}
  assert sorted(got) == sorted(expected) == list(range(1, NUM_STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(got)], rtol=1e-5)


def test_reader_lists_again_when_a_step_is_retired_meanwhile(tmp_path, monkeypatch):
  """Orbax lists the step directories and then reads each one; a step that the training run retires in between
  raises FileNotFoundError or NotADirectoryError (both seen). A reader tries again; the training run does not."""
  real_manager, to_raise, raised = checkpoint.ocp.CheckpointManager, [], []

  def flaky_manager(directory, **kwargs):
    if to_raise:
      raised.append(to_raise.pop(0))
      raise raised[-1](f"{directory}/8")
    return real_manager(directory, **kwargs)

  checkpoint.Checkpoints(str(tmp_path / "run"), writable=True)  # creates the directories read below
  monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", flaky_manager)
  monkeypatch.setattr(checkpoint.time, "sleep", lambda s: None)
  to_raise[:] = [FileNotFoundError, NotADirectoryError]
  reader = checkpoint.Checkpoints(str(tmp_path / "run"))
  assert raised == [FileNotFoundError, NotADirectoryError] and reader.latest_step() is None
  to_raise[:] = [NotADirectoryError]
  with pytest.raises(NotADirectoryError):
    checkpoint.Checkpoints(str(tmp_path / "run"), writable=True)
