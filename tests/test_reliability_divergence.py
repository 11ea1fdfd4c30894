"""Divergence: a loss that becomes NaN/Inf stops the run before the bad state reaches a checkpoint
(train.on_nonfinite='stop'), or is skipped without touching the state (on_nonfinite='skip')."""
import re

import jax
import numpy as np
import pytest

import reliability_helpers as h

pytestmark = pytest.mark.slow  # training command-line runs

NON_FINITE = re.compile(r"NonFiniteLossError: step (\d+): loss is (\S+)")


def _assert_stopped_at(result, workdir, step=None) -> int:
  """The run failed naming the non-finite step; the checkpoint before it is the latest, complete and finite."""
  assert result.returncode != 0, result.stdout[-2000:]
  match = NON_FINITE.search(result.stderr)
  assert match, result.stderr[-3000:]
  bad_step = int(match.group(1))
  assert step is None or bad_step == step, match.group(0)
  assert not np.isfinite(float(match.group(2)) if match.group(2) != "None" else np.nan), match.group(0)
  steps = [int(s) for s in h.step_dirs(workdir / "checkpoints")["complete"]]
  assert steps and max(steps) == bad_step - 1, f"latest checkpoint {steps}, non-finite step {bad_step}"
  assert all(int(s) < bad_step for s in h.step_dirs(workdir / "best")["complete"])
  assert h.step_dirs(workdir / "checkpoints")["partial"] == []
  good = h.read_state(workdir / "checkpoints", bad_step - 1)["state"]
  assert int(good["step"]) == bad_step - 1 and h.all_finite(good["params"]) and h.all_finite(good["opt_state"])
  return bad_step


def test_non_finite_loss_stops_at_its_step_keeping_the_last_good_checkpoint(tmp_path):
  """Two ways to diverge, run side by side: a learning rate of 1e30 (Adam's first update moves every weight by
  about the learning rate, so activations overflow float32 a step later), and NaN images in step 3's batch."""
  blowup, poisoned = tmp_path / "blowup", tmp_path / "poisoned"
  blowup_result, poisoned_result = h.run_together(
      (h.train_command(blowup, "--config.optim.learning_rate=1e30"), h.env()),
      (h.train_command(poisoned, inject="nan_at_step:3"), h.env()))
  assert _assert_stopped_at(blowup_result, blowup) >= 2
  assert "Lower optim.learning_rate" in blowup_result.stderr
  _assert_stopped_at(poisoned_result, poisoned, step=3)
  assert [r["step"] for r in h.train_records(poisoned)] == [1, 2]  # nothing logged for the bad step either


def test_nan_batch_skipped_leaves_the_state_as_it_was(tmp_path):
  workdir = tmp_path / "run"
  result = h.run_train(workdir, "--config.train.on_nonfinite=skip", "--config.train.num_steps=5",
                       "--config.train.keep_checkpoints=5", inject="nan_at_step:3")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "step 3: non-finite loss/gradients" in result.stderr
  records = h.train_records(workdir)
  assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1]
  assert records[2]["loss"] is None and all(np.isfinite(r["loss"]) for i, r in enumerate(records) if i != 2)
  before, skipped, after = (h.read_state(workdir / "checkpoints", s)["state"] for s in (2, 3, 4))
  for name in ("params", "opt_state", "batch_stats"):  # the skipped step changed nothing but the step counter
    assert h.max_abs_diff(before[name], skipped[name]) == 0.0, name
  assert int(skipped["step"]) == 3
  assert h.max_abs_diff(skipped["params"], after["params"]) > 0  # and training went on after it
  final = h.read_state(workdir / "checkpoints", 5)["state"]
  assert h.all_finite(final["params"]) and h.all_finite(final["opt_state"])
  assert jax.tree.structure(final["params"]) == jax.tree.structure(before["params"])
