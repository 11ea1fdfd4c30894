"""Interruption: real training processes killed (SIGKILL at seeded random moments and at the worst moments of a
checkpoint write) or stopped (SIGTERM, SIGINT), then restarted with the same command.

Each kill must leave only readable checkpoints (every step directory on disk restores), and the restarted run must
end with the parameters of a run that was never interrupted (exact resume).
"""
import random
import re
import signal
import time

import numpy as np
import pytest

import reliability_helpers as h

NUM_STEPS = 16
RUN = (f"--config.train.num_steps={NUM_STEPS}",)  # plus the helper config: checkpoint every step, keep 2, eval every 4


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
  h.use_session_compile_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result = h.run_train(workdir, *RUN)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def _losses_by_step(workdir) -> dict[int, float]:
  # A replayed step appends its record again; the last one is the run that went on.
  return {r["step"]: r["loss"] for r in h.train_records(workdir)}


def _assert_checkpoints_readable(workdir, when: str) -> list[int]:
  """Every step directory orbax would list (checkpoints/ and best/) restores; returns the checkpoints/ steps."""
  steps = {}
  for folder in ("checkpoints", "best"):
    for name in h.step_dirs(workdir / folder)["complete"]:
      try:
        state = h.read_state(workdir / folder, int(name))["state"]
      except Exception as e:  # pylint: disable=broad-except
        raise AssertionError(f"{when}: {folder}/{name} looks complete but does not restore: {e}") from e
      assert int(state["step"]) == int(name), f"{when}: {folder}/{name} holds step {state['step']}"
      assert h.all_finite(state["params"])
      steps.setdefault(folder, []).append(int(name))
  return sorted(steps.get("checkpoints", []))


def _assert_same_as_reference(workdir, reference):
  final = h.step_dirs(workdir / "checkpoints")["complete"]
  assert str(NUM_STEPS) in final, final
  diff = h.max_abs_diff(h.params_of(reference / "checkpoints", NUM_STEPS), h.params_of(workdir / "checkpoints",
                                                                                       NUM_STEPS))
  assert diff <= 1e-6, f"resumed run differs from the uninterrupted run by {diff}"
  expected, got = _losses_by_step(reference), _losses_by_step(workdir)
  assert sorted(got) == list(range(1, NUM_STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(expected)], rtol=1e-5)


def test_sigkill_anywhere_leaves_readable_checkpoints_and_resume_is_exact(tmp_path, reference):
  """Five kills in one run's life, then the same command: it resumes from the last complete step and finishes with
  the uninterrupted run's parameters. Two kills are placed by faults patched into the process (the moments a
  timed kill rarely hits), two at seeded random times, one while a checkpoint is being written in the background."""
  workdir = tmp_path / "killed"
  rng = random.Random(20240611)
  events = []

  def check(name):
    steps = _assert_checkpoints_readable(workdir, f"after {name}")
    events.append((name, steps, h.step_dirs(workdir / "checkpoints")["partial"]))
    return steps

  # 1. Step 4 written completely (commit_success.txt included) but not yet renamed, and best/4 already committed:
  #    the restart must ignore (and remove) the temporary step and must not fail on re-saving best/4.
  result = h.run_train(workdir, *RUN, inject="kill_before_rename:checkpoints/4,best/4")
  assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
  assert check("kill before commit of step 4") == [2, 3]
  assert "4.orbax-checkpoint-tmp" in " ".join(events[-1][2]), events[-1]

  # 2. Half of an old step's files removed (orbax's retention clean-up) when the kill comes.
  result = h.run_train(workdir, *RUN, inject="kill_in_delete:3")
  assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
  check("kill while deleting an old step")

  # 3-4. Seeded random moments inside the training loop.
  for attempt in range(2):
    process = h.start_train(workdir, *RUN)
    delay = rng.uniform(0.0, 0.6)
    done_before = len(h.train_records(workdir))
    h.wait_for(lambda: len(h.train_records(workdir)) > done_before, process)
    time.sleep(delay)
    process.kill()
    process.wait(timeout=60)
    check(f"random kill {attempt + 1} ({delay:.2f}s in)")

  # 5. While orbax writes a step in the background: kill as soon as a temporary step directory appears.
  process = h.start_train(workdir, *RUN)
  done_before = len(h.train_records(workdir))  # stale temporary steps of earlier kills are not this one's
  h.wait_for(lambda: len(h.train_records(workdir)) > done_before and h.step_dirs(workdir / "checkpoints")["partial"],
             process)
  process.kill()
  process.wait(timeout=60)
  check("kill during a background write")

  result = h.run_train(workdir, *RUN)
  assert result.returncode == 0, (events, result.stderr[-3000:])
  assert h.step_dirs(workdir / "checkpoints")["partial"] == [] and h.step_dirs(workdir / "best")["partial"] == []
  assert not any((workdir / folder / "_to_delete").glob("*") for folder in ("checkpoints", "best"))
  _assert_checkpoints_readable(workdir, "after the final run")
  _assert_same_as_reference(workdir, reference)


STOPPED = re.compile(r"(SIGTERM|SIGINT): saved a checkpoint at step (\d+)")


@pytest.mark.parametrize("signals", [(signal.SIGTERM, signal.SIGINT)], ids=["sigterm_then_sigint"])
def test_sigterm_and_sigint_save_exit_and_resume(tmp_path, reference, signals):
  """SIGTERM (preemption) and SIGINT (Ctrl-C) save at the next step boundary and exit 143 / 130; the step the
  process prints is the step on disk; the same command then finishes the run exactly."""
  workdir = tmp_path / "stopped"
  stopped_at = []
  for sig in signals:
    log = tmp_path / f"{sig.name}.log"
    with open(log, "w") as out:
      process = h.start_train(workdir, *RUN, log=out)
      done_before = len(h.train_records(workdir))
      h.wait_for(lambda: len(h.train_records(workdir)) > done_before, process)
      process.send_signal(sig)
      returncode = process.wait(timeout=h.TIMEOUT)
    output = log.read_text()
    assert returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig], output[-3000:]
    match = STOPPED.search(output)
    assert match and match.group(1) == sig.name, output[-3000:]
    step = int(match.group(2))
    assert done_before < step < NUM_STEPS, (done_before, step)
    saved = _assert_checkpoints_readable(workdir, f"after {sig.name}")
    assert saved[-1] == step, f"printed step {step}, latest checkpoint on disk {saved}"
    assert h.train_records(workdir)[-1]["step"] == step
    assert h.step_dirs(workdir / "checkpoints")["partial"] == []  # the save was waited for before exiting
    stopped_at.append(step)
  assert stopped_at[0] < stopped_at[1]
  result = h.run_train(workdir, *RUN)
  assert result.returncode == 0, result.stderr[-3000:]
  _assert_same_as_reference(workdir, reference)
