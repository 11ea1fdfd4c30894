"""End-to-end training: learning happens, resume is exact, data parallelism changes nothing, every experiment runs."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import record_parity, run_python
from fcnjax import checkpoint, data, reporting, training
from fcnjax.data import sources
from reliability_helpers import tiny_config

pytestmark = pytest.mark.slow  # every test here trains, or runs a command on a trained workdir


def final_params(workdir):
  config = train_config_of(workdir)
  ckpts = checkpoint.Checkpoints(str(workdir))
  variables, step = ckpts.restore_variables(checkpoint.model_record(config), which="latest")
  ckpts.close()
  return variables, step


def train_config_of(workdir):
  import ml_collections
  with open(os.path.join(workdir, "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))


def train_losses(workdir):
  return {r["step"]: r["loss"] for r in reporting.read_metrics(str(workdir)) if r["kind"] == "train"}


def test_loss_falls_and_miou_rises(tmp_path):
  config = tiny_config(num_steps=80, log_every=10, eval_every=20)
  config.model.base_width = 8
  summary = training.train_and_evaluate(config, str(tmp_path))
  losses = train_losses(tmp_path)
  evals = [r for r in reporting.read_metrics(str(tmp_path)) if r["kind"] == "eval"]
  assert losses[80] < 0.6 * losses[10], losses
  assert [r["step"] for r in evals] == [20, 40, 60, 80]
  assert evals[-1]["miou"] > evals[0]["miou"] + 0.05, evals
  assert summary["miou"] == pytest.approx(evals[-1]["miou"])
  assert (tmp_path / "curves.png").exists()


def test_resume_equals_uninterrupted(tmp_path):
  """Three runs of 3 + 3 + 2 steps reach the parameters of one run of 8 steps (same data, RNG, schedule)."""
  config = tiny_config(num_steps=8)
  config.optim.schedule = "cosine"  # the schedule must continue where it stopped, too
  training.train_and_evaluate(config, str(tmp_path / "whole"))
  config.train.max_steps_per_run = 3
  for expected_stop in (3, 6):
    summary = training.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert summary["interrupted_at"] == expected_stop
  training.train_and_evaluate(config, str(tmp_path / "resumed"))
  (whole, whole_step), (resumed, resumed_step) = final_params(tmp_path / "whole"), final_params(tmp_path / "resumed")
  assert whole_step == resumed_step == 8
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), whole, resumed))
  assert max(diffs) <= 1e-6, f"resumed run differs from uninterrupted run by {max(diffs)}"
  assert train_losses(tmp_path / "whole") == pytest.approx(train_losses(tmp_path / "resumed"), rel=1e-5)


DEVICE_SCRIPT = """
import json
import jax
from reliability_helpers import tiny_config
from fcnjax import reporting, training
assert jax.device_count() == {devices}, jax.devices()
config = tiny_config(num_steps=6)
training.train_and_evaluate(config, {workdir!r})
losses = [r["loss"] for r in reporting.read_metrics({workdir!r}) if r["kind"] == "train"]
print("LOSSES", json.dumps(losses))
"""


def _losses_on(devices, workdir):
  script = DEVICE_SCRIPT.format(devices=devices, workdir=str(workdir))
  result = run_python("-c", script, num_devices=devices, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith("LOSSES")][-1]
  return json.loads(line.split(" ", 1)[1])


def test_one_device_equals_eight_devices(tmp_path):
  """The batch sharded over 8 (fake CPU) devices gives the loss curve of 1 device: BatchNorm and the loss see the
  global batch either way."""
  one, eight = _losses_on(1, tmp_path / "one"), _losses_on(8, tmp_path / "eight")
  assert len(one) == len(eight) == 6
  record_parity("train: loss curve on 8 devices vs 1", float(np.max(np.abs(np.subtract(eight, one)))),
                float(np.max(np.abs(one))))
  np.testing.assert_allclose(eight, one, rtol=1e-4)


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  config = tiny_config(num_steps=4)
  config.train.num_predictions = 2
  training.train_and_evaluate(config, str(workdir))
  return workdir


def test_training_writes_predictions(trained_workdir):
  panels = sorted((trained_workdir / "predictions").glob("*_panel.png"))
  assert len(panels) == 2
  # image | prediction | ground truth with 4-pixel gaps
  assert Image.open(panels[0]).size == (3 * 32 + 2 * 4, 32)


def test_evaluate_cli_prints_table(trained_workdir):
  result = run_python("-m", "fcnjax.evaluate", f"--workdir={trained_workdir}", "--checkpoint=latest")
  assert result.returncode == 0, result.stderr[-3000:]
  for name in ("background", "circle", "rectangle", "triangle"):
    assert name in result.stdout
  record = json.loads((trained_workdir / "evaluation.json").read_text())
  # The checkpoint of step 4 on the validation set that training scored at step 4: the same numbers.
  (trained,) = [r for r in reporting.read_metrics(str(trained_workdir)) if r["kind"] == "eval"]
  assert record["step"] == trained["step"] == 4
  for key in ("miou", "pixel_accuracy", "mean_dice"):
    assert record[key] == pytest.approx(trained[key], abs=1e-6), key
  assert f"{100 * record['miou']:.2f}" in result.stdout


def test_predict_cli_writes_pngs(trained_workdir, tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  for name, size in (("a", (40, 52)), ("b", (31, 17))):  # sizes other than the training size
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(images / f"{name}.png")
  out = tmp_path / "out"
  result = run_python("-m", "fcnjax.predict", f"--workdir={trained_workdir}", f"--images={images}", f"--out={out}",
                      "--checkpoint=latest")
  assert result.returncode == 0, result.stderr[-3000:]
  mask = Image.open(out / "b_mask.png")
  assert mask.size == (17, 31) and mask.mode == "P"
  assert Image.open(out / "a_overlay.png").size == (52, 40)
  assert Image.open(out / "a_panel.png").size == (2 * 52 + 4, 40)


def test_evaluate_cli_scores_a_folder_of_images_and_masks(trained_workdir, tmp_path):
  """--images/--masks: the validation images written as PNG files score as the validation split does (same
  checkpoint, whole images, no training split needed); a folder without masks is named in one line."""
  config = tiny_config(num_steps=4)
  split = sources.load_split(data.resolve(config.data), "validation")
  (tmp_path / "images").mkdir()
  (tmp_path / "masks").mkdir()
  for i in range(len(split.examples)):
    example = split.examples[i]
    Image.fromarray(example["image"]).save(tmp_path / "images" / f"{i:03d}.png")
    Image.fromarray(example["mask"].astype(np.uint8)).save(tmp_path / "masks" / f"{i:03d}.png")
  result = run_python("-m", "fcnjax.evaluate", f"--workdir={trained_workdir}", "--checkpoint=latest",
                      f"--images={tmp_path / 'images'}", f"--masks={tmp_path / 'masks'}")
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads((trained_workdir / "evaluation.json").read_text())
  (trained,) = [r for r in reporting.read_metrics(str(trained_workdir)) if r["kind"] == "eval"]
  assert record["images"] == str(tmp_path / "images")
  for key in ("miou", "pixel_accuracy", "mean_dice"):
    assert record[key] == pytest.approx(trained[key], abs=1e-6), key
  result = run_python("-m", "fcnjax.evaluate", f"--workdir={trained_workdir}", f"--images={tmp_path / 'images'}",
                      f"--masks={tmp_path / 'nowhere'}")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == f"FileNotFoundError: {tmp_path / 'nowhere'}: no such folder (--masks)"
