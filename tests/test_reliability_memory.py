"""Memory: fcnjax.memory's figures and budget search, through `python -m benchmarks.memory`, and the message an
out-of-device-memory error gives.

Out-of-memory is injected (XLA's RESOURCE_EXHAUSTED error raised where it would come from), never provoked.
"""
import json
import signal
import sys

import jax
import numpy as np
import pytest

import reliability_helpers as h
from fcnjax import memory, steps, training

TINY_UNET = {"model.base_width": 2, "model.depth": 1}
TINY_UNET_FLAGS = ("--models=unet", "--image_size=16", *[f"--set={k}={v}" for k, v in TINY_UNET.items()])
XLA_OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123456789 bytes."


@pytest.mark.slow
def test_memory_table_and_budget_search():
  """The command that OutOfDeviceMemoryError's message names, from the repository root."""
  budget_gb = 0.0005  # ~0.5 MB: a batch of about ten 16x16 images for this U-Net of width 2
  result = h.run_together(([sys.executable, "-m", "benchmarks.memory", *TINY_UNET_FLAGS, "--batch_sizes=1,2",
                            f"--budget_gb={budget_gb}", "--json"], h.env()))[0]
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
  rows = {r["batch_size"]: r for r in lines if r["kind"] == "row"}
  (search,) = [r for r in lines if r["kind"] == "budget"]

  # Known values: the step's arguments are the train state plus the batch, byte for byte, and the whole (donated)
  # state is updated in place.
  config, size = memory.experiment_config(h.REPO_ROOT / "experiments" / "pet_unet.py", 16, "", TINY_UNET)
  assert (size, config.model.base_width, config.model.depth, config.model.pretrained) == (16, 2, 1, "")
  state = memory.TrainStep(config, size).abstract_state  # shapes only, nothing compiled
  state_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))
  for batch_size, row in rows.items():
    batch_bytes = batch_size * size * size * (3 * 4 + 4)  # float32 RGB image + int32 mask
    assert row["argument_bytes"] == state_bytes + batch_bytes, (batch_size, row, state_bytes)
    assert row["alias_bytes"] == state_bytes
    assert row["host_peak_rss_bytes"] > 50 * 2 ** 20  # at least the interpreter with jax loaded
  assert rows[2]["temp_bytes"] > rows[1]["temp_bytes"]  # activations grow with the batch

  budget = budget_gb * 2 ** 30
  assert search["largest_batch"] >= 2
  assert search["bytes_at_largest"] <= budget < search["bytes_above"], search


def test_experiment_config_copies_the_config_and_refuses_unknown_keys(tmp_path):
  given = h.get_config()
  config, size = memory.experiment_config(given, dtype="bfloat16", overrides={"model.base_width": 8})
  assert size == given.data.image_size == 32  # no crop size: the images' size
  assert (config.model.dtype, config.model.base_width) == ("bfloat16", 8)
  assert (given.model.dtype, given.model.base_width) == ("float32", 4)  # the caller's config is left as it was
  assert memory.experiment_config(given, image_size=24)[1] == 24
  with pytest.raises(KeyError, match="'model.base_widht': no such key; model has .*base_width"):
    memory.experiment_config(given, overrides={"model.base_widht": 8})
  with pytest.raises(KeyError, match="the config has no 'modle'"):
    memory.experiment_config(given, overrides={"modle.base_width": 8})
  with pytest.raises(FileNotFoundError, match="no_such_experiment.py: no such file"):
    memory.experiment_config(tmp_path / "no_such_experiment.py")


def test_budget_search_agrees_with_brute_force():
  """The search's logic against every batch size tried in turn, for a memory curve that is not linear (XLA's
  temporaries jump where it changes strategy), on 1 and 4 devices."""
  for devices in (1, 4):
    need = lambda b, d=devices: 1000 + 300 * b + (4000 if b >= 8 * d else 0) + 7 * b * b  # noqa: E731

    class FakeStep:
      config = type("C", (), {"model": type("M", (), {"name": "fake"})})()
      device_count = devices

      def compile(self, batch_size):
        assert batch_size % devices == 0 and batch_size > 0
        return type("Compiled", (), {"memory_analysis": lambda self, b=batch_size: type("A", (), dict(
            argument_size_in_bytes=need(b), output_size_in_bytes=0, alias_size_in_bytes=0,
            temp_size_in_bytes=0))()})()

    for budget in (900, 1300, 5000, 7000, 12000, 40000, 10 ** 6):
      found = memory.largest_batch(FakeStep(), budget)
      brute = max([b for b in range(devices, 1000 * devices, devices) if need(b) <= budget], default=0)
      assert found["largest_batch"] == brute, (devices, budget, found)
      # About twice log2 of the answer: a search, not a scan.
      assert found["compiles"] <= 2 * np.log2(brute / devices + 1) + 6, (devices, budget, found)


def test_out_of_memory_names_the_settings_to_lower(tmp_path, monkeypatch):
  def exhausted(*args, **kwargs):
    raise jax.errors.JaxRuntimeError(XLA_OOM)

  monkeypatch.setattr(steps, "init_variables", exhausted)
  with pytest.raises(training.OutOfDeviceMemoryError) as error:
    training.train_and_evaluate(h.get_config(), str(tmp_path / "oom"))
  message = str(error.value)
  for text in ("--config.train.batch_size", "train.batch_size=8", "--config.model.dtype=bfloat16",
               "python -m benchmarks.memory --budget_gb=", XLA_OOM):
    assert text in message, message
  assert isinstance(error.value.__cause__, jax.errors.JaxRuntimeError)

  def other_failure(*args, **kwargs):
    raise jax.errors.JaxRuntimeError("INTERNAL: something else")

  monkeypatch.setattr(steps, "init_variables", other_failure)
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL: something else"):  # passed on untouched
    training.train_and_evaluate(h.get_config(), str(tmp_path / "other"))


@pytest.mark.slow
def test_out_of_memory_in_the_training_loop_through_the_command_line(tmp_path):
  workdir = tmp_path / "run"
  result = h.run_train(workdir, inject="oom_at_step:3")
  assert result.returncode == 1, result.stderr[-3000:]
  assert "OutOfDeviceMemoryError" in result.stderr and "--config.train.batch_size" in result.stderr
  assert "--config.model.dtype=bfloat16" in result.stderr
  assert result.returncode != -signal.SIGKILL
  assert h.step_dirs(workdir / "checkpoints") == {"complete": ["1", "2"], "partial": []}
  assert h.all_finite(h.params_of(workdir / "checkpoints", 2))
