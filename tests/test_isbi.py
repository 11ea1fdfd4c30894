"""The U-Net paper's tricks on the ISBI 2012 EM data: elastic deformation, the border weight map, and the whole
pipeline (elastic + weight map + weighted BCE + overlap-tile evaluation) on crops of real slices."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage.measure import label

from conftest import load_experiment, run_python
from fcnjax import data, metrics, reporting, training
from fcnjax.data import elastic, sources, transforms, weight_map
from fcnjax.segmenter import Segmenter


# --------------------------------------------------------------------------------------------------------------------
# Elastic deformation


def _random_pair(seed=0, size=(48, 40)):
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
  mask = rng.integers(0, 3, size, dtype=np.uint8)
  return image, mask


def test_elastic_zero_strength_is_identity():
  image, mask = _random_pair()
  warped_image, warped_mask = elastic.elastic_deform(image, mask, np.random.default_rng(0), sigma=0.0)
  np.testing.assert_array_equal(warped_image, image)
  np.testing.assert_array_equal(warped_mask, mask)


def test_displacement_field_passes_through_control_points():
  """Paper: Gaussian displacements on a coarse 3x3 grid, interpolated; the outer points sit on the corners."""
  h, w, sigma = 41, 61, 10.0  # odd sizes: the middle control point falls on pixel (20, 30)
  field = elastic.displacement_field((h, w), np.random.default_rng(5), sigma=sigma, grid_points=3)
  draws = np.random.default_rng(5).normal(size=(2, 3, 3)) * sigma
  np.testing.assert_allclose(field[:, ::20, ::30], draws, atol=1e-4)
  assert field.shape == (2, h, w) and field.dtype == np.float32
  # Smooth: neighbouring pixels move by much less than the displacements themselves.
  assert np.abs(np.diff(field, axis=1)).max() < 0.2 * np.abs(draws).max()


def test_elastic_mask_stays_a_label_map():
  rng = np.random.default_rng(1)
  mask = np.zeros((64, 64), np.uint8)
  mask[10:30, 8:40], mask[36:60, 20:56] = 1, 2
  mask[40:44, 0:8] = 255  # an ignore region travels too, and no pixel takes a value in between
  image = np.repeat(mask[..., None] * 40, 3, axis=-1).astype(np.uint8)
  warped_image, warped_mask = elastic.elastic_deform(image, mask, rng, sigma=4.0)
  assert warped_mask.dtype == np.uint8 and warped_mask.shape == mask.shape
  assert set(np.unique(warped_mask)) == {0, 1, 2, 255}
  assert np.mean(warped_mask != mask) > 0.01  # it did move
  assert warped_image.dtype == np.uint8 and warped_image.shape == image.shape


def _smooth_image(size=96, seed=0):
  rng = np.random.default_rng(seed)
  noise = ndimage.gaussian_filter(rng.normal(size=(size, size)), 6)
  grey = (noise - noise.min()) / (noise.max() - noise.min()) * 255
  return np.repeat(grey[..., None], 3, axis=-1).round().astype(np.uint8)


def test_elastic_moves_image_and_mask_together():
  """The mask is a threshold of the image; after the warp the warped mask is still the threshold of the warped
  image, except at the threshold's edge where bilinear and nearest sampling round differently."""
  image = _smooth_image()
  threshold = 128
  mask = (image[..., 0] > threshold).astype(np.uint8)
  warped_image, warped_mask = elastic.elastic_deform(image, mask, np.random.default_rng(3), sigma=10.0)
  agreement = np.mean((warped_image[..., 0] > threshold) == warped_mask)
  moved = np.mean(warped_mask != mask)
  assert moved > 0.05, moved
  assert agreement > 0.985, agreement
  # A mask warped with another draw does not agree: the check above would catch image and mask moving apart.
  _, other_mask = elastic.elastic_deform(image, mask, np.random.default_rng(4), sigma=10.0)
  assert np.mean((warped_image[..., 0] > threshold) == other_mask) < agreement - 0.03
  # Grey images are warped once and repeated; a colour image warps each channel the same way.
  colour = image.copy()
  colour[..., 1] = 255 - colour[..., 1]
  colour_image, colour_mask = elastic.elastic_deform(colour, mask, np.random.default_rng(3), sigma=10.0)
  np.testing.assert_array_equal(colour_image[..., 0], warped_image[..., 0])
  np.testing.assert_array_equal(colour_image[..., 1], 255 - warped_image[..., 1])
  np.testing.assert_array_equal(colour_mask, warped_mask)


def test_elastic_is_deterministic_given_the_rng():
  image, mask = _random_pair(seed=2, size=(50, 50))
  first = elastic.elastic_deform(image, mask, np.random.default_rng(7))
  again = elastic.elastic_deform(image, mask, np.random.default_rng(7))
  other = elastic.elastic_deform(image, mask, np.random.default_rng(8))
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert np.mean(first[1] != other[1]) > 0.1


# --------------------------------------------------------------------------------------------------------------------
# Border weight map


def _two_cells(gap=2):
  """Two 20x20 cells side by side, `gap` membrane pixels apart, in a 40 x 60 membrane canvas."""
  mask = np.zeros((40, 60), np.uint8)
  mask[10:30, 8:28] = 1
  mask[10:30, 28 + gap:48 + gap] = 1
  return mask


def test_weight_map_peaks_on_the_membrane_between_two_cells():
  mask = _two_cells(gap=2)
  w0, sigma = 10.0, 5.0
  border = weight_map.border_weights(mask, w0=w0, sigma=sigma)
  peak = np.unravel_index(np.argmax(border), border.shape)
  assert peak[1] in (28, 29) and 10 <= peak[0] < 30  # in the 2-pixel gap, alongside the cells
  # In the gap at column 28: d1 = 1 (the left cell's last column is 27), d2 = 2 (the right cell starts at 30).
  np.testing.assert_allclose(border[20, 28], w0 * np.exp(-(1 + 2) ** 2 / (2 * sigma ** 2)), rtol=1e-6)
  # Far from the gap the term vanishes: at corner (0, 59) d1 + d2 = 14.1 + 33.5, at (39, 0) 12.8 + 31.6.
  # Inside cells it is 0.
  assert border[0, 59] < 1e-3 and border[39, 0] < 1e-3
  assert np.all(border[mask == 1] == 0)

  weights = weight_map.unet_weight_map(mask, w0=w0, sigma=sigma)
  n, n_cell = mask.size, mask.sum()
  w_cell, w_membrane = n / (2 * n_cell), n / (2 * (n - n_cell))  # balanced: n / (K * n_k)
  np.testing.assert_allclose(weights[mask == 1], w_cell, rtol=1e-6)
  np.testing.assert_allclose(weights[0, 59], w_membrane, rtol=1e-3)
  np.testing.assert_allclose(weights[20, 28], w_membrane + border[20, 28], rtol=1e-6)
  np.testing.assert_allclose(weight_map.class_balance_weights(mask).mean(), 1.0, rtol=1e-6)
  fixed = weight_map.unet_weight_map(mask, w0=w0, sigma=sigma, class_weights=(1.0, 1.0))
  np.testing.assert_allclose(fixed, 1.0 + border, rtol=1e-6)


def test_weight_map_wider_gap_lower_peak_and_one_cell_none():
  peaks = [weight_map.border_weights(_two_cells(gap)).max() for gap in (1, 3, 6)]
  assert peaks[0] > peaks[1] > peaks[2]
  one_cell = np.zeros((30, 30), np.uint8)
  one_cell[5:20, 5:20] = 1
  assert np.all(weight_map.border_weights(one_cell) == 0)  # no second cell, no separation border


def test_weight_map_matches_brute_force_distances():
  """The per-cell windowed distance transforms equal sorting full-image distance transforms of every cell, up to
  the documented cut-off (w0 * exp(-18))."""
  rng = np.random.default_rng(0)
  noise = ndimage.gaussian_filter(rng.normal(size=(80, 90)), 3)
  mask = (noise > 0.02).astype(np.uint8)
  mask[:3, :5] = 255
  cells, num = label((mask == 1), connectivity=1, return_num=True)
  assert num >= 5
  distances = np.sort(np.stack([ndimage.distance_transform_edt(cells != i) for i in range(1, num + 1)]), axis=0)
  d1, d2 = distances[0], distances[1]
  expected = np.where(mask == 0, 10.0 * np.exp(-(d1 + d2) ** 2 / (2 * 5.0 ** 2)), 0.0)
  np.testing.assert_allclose(weight_map.border_weights(mask), expected, atol=10.0 * np.exp(-18) + 1e-6, rtol=1e-5)
  weights = weight_map.unet_weight_map(mask)
  assert np.all(weights[mask == 255] == 0)


def test_train_transform_weight_map_is_that_of_the_augmented_mask():
  image = _smooth_image(64, seed=1)
  mask = (image[..., 0] > 120).astype(np.uint8)
  transform = transforms.TrainTransform(crop_size=(48, 48), vflip=True, rot90=True, elastic=True, border_weight=True,
                                        border_class_weights=(1.0, 1.0))
  out = transform({"image": image, "mask": mask}, np.random.default_rng(0))
  assert out["weight"].shape == out["mask"].shape == (48, 48) and out["weight"].dtype == np.float32
  np.testing.assert_allclose(out["weight"], weight_map.unet_weight_map(out["mask"].astype(np.uint8),
                                                                       class_weights=(1.0, 1.0)))
  assert out["weight"].max() > 2.0  # some separation border in the crop


# --------------------------------------------------------------------------------------------------------------------
# The pipeline on real slices


def test_isbi_config_trains_on_slices_00_to_19_and_validates_on_20_to_23(shared_data):
  config = load_experiment("isbi_unet")
  config.data.root = str(shared_data / "isbi2012-em")
  cfg = data.resolve(config.data)
  train_split, val_split = (sources.load_split(cfg, split) for split in ("train", "validation"))
  assert [Path(train_split.examples.name(i)).name for i in range(len(train_split.examples))] == [
      f"{i:02d}.png" for i in range(20)]
  assert [Path(val_split.examples.name(i)).name for i in range(len(val_split.examples))] == [
      f"{i:02d}.png" for i in range(20, 24)]
  info = data.dataset_info(config.data)
  assert info.binary and info.class_names == ["background", "foreground"]
  training.check_config(config, info)  # one sigmoid logit, a binary loss

  # Training crops of 256^2 with 0/1 masks and the border weight map of each augmented crop.
  batch = next(data.build_train_data(config.data, batch_size=config.train.batch_size, seed=0).iterator(0))
  assert batch["image"].shape == (4, 256, 256, 3) and set(np.unique(batch["mask"])) == {0, 1}
  for mask, weight in zip(batch["mask"], batch["weight"]):
    np.testing.assert_allclose(weight, weight_map.unet_weight_map(
        mask.astype(np.uint8), w0=config.data.border_w0, sigma=config.data.border_sigma,
        class_weights=config.data.border_class_weights), rtol=1e-6)
  assert batch["weight"].max() > 2.0  # cells touch somewhere in four crops of EM: the separation border is there
  # Whole 512^2 slices to validate, cell interior (255) as foreground.
  evald = data.build_eval_data(config.data, batch_size=config.eval.batch_size)
  assert evald.num_examples == 4 and evald.eval_size is None and evald.canvas == (512, 512)
  first = next(iter(evald))
  np.testing.assert_array_equal(first["mask"][0], np.asarray(Image.open(shared_data / "isbi2012-em" / "masks" /
                                                                        "20.png")) > 127)


def test_isbi_config_without_its_data_names_the_flag_to_set(tmp_path, monkeypatch):
  """The default data.root is relative to the working directory: from anywhere else the run stops at once."""
  monkeypatch.chdir(tmp_path)
  config = load_experiment("isbi_unet")
  with pytest.raises(data.DataRootNotFoundError) as error:
    training.train_and_evaluate(config, str(tmp_path / "run"))
  assert str(error.value).startswith(
      f"data.root=../shared/data/isbi2012-em: no such folder (relative to the working directory {tmp_path}); set "
      "--config.data.root=DIR, a folder holding images/ + masks/"), str(error.value)
  assert list((tmp_path / "run").iterdir()) == []


@pytest.fixture(scope="module")
def isbi_crops(tmp_path_factory, shared_data):
  """Two real slices (00 and 01), each cut into two 64x64 crops: 3 train, 1 validation (sorted last)."""
  source = shared_data / "isbi2012-em"
  root = tmp_path_factory.mktemp("isbi")
  (root / "images").mkdir()
  (root / "masks").mkdir()
  for slice_name in ("00", "01"):
    image = np.asarray(Image.open(source / "images" / f"{slice_name}.png"))
    mask = np.asarray(Image.open(source / "masks" / f"{slice_name}.png"))
    for corner, (y, x) in enumerate(((100, 100), (300, 260))):
      Image.fromarray(image[y:y + 64, x:x + 64]).save(root / "images" / f"{slice_name}_{corner}.png")
      Image.fromarray(mask[y:y + 64, x:x + 64]).save(root / "masks" / f"{slice_name}_{corner}.png")
  return root


@pytest.fixture(scope="module")
def isbi_run(isbi_crops, tmp_path_factory):
  """The ISBI experiment (elastic deformation, border weights, weighted BCE) on the crops, 40 steps of a small
  U-Net."""
  config = load_experiment("isbi_unet")
  config.data.border_weight = True
  config.model.base_width = 8
  config.model.depth = 2
  config.data.root = str(isbi_crops)
  config.data.val_count = 1
  config.data.crop_size = 48
  config.data.read_threads = 1
  config.optim.learning_rate = 1e-2
  config.optim.warmup_steps = 0
  config.train.batch_size = 4
  config.train.num_steps = 40
  config.train.log_every = 5
  config.train.eval_every = 40
  config.train.num_predictions = 0
  config.train.progress = False
  config.eval.batch_size = 1
  config.eval.tile = 32
  workdir = tmp_path_factory.mktemp("isbi_run")
  training.train_and_evaluate(config, str(workdir))
  return config, workdir


@pytest.mark.slow
def test_isbi_pipeline_trains_with_border_weights(isbi_run, isbi_crops):
  _, workdir = isbi_run
  records = reporting.read_metrics(str(workdir))
  losses = [r["loss"] for r in records if r["kind"] == "train"]
  assert len(losses) == 8 and all(np.isfinite(losses))
  assert np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2]), losses
  (evaluated,) = [r for r in records if r["kind"] == "eval"]
  assert evaluated["step"] == 40
  # Scored on the validation crop (01_1, sorted last) and nothing else: the frequency-weighted IoU weighs each
  # class's IoU by that crop's own class frequencies.
  foreground = np.mean(np.asarray(Image.open(isbi_crops / "masks" / "01_1.png")) > 127)
  background_iou, foreground_iou = evaluated["per_class_iou"]
  assert evaluated["fw_iou"] == pytest.approx((1 - foreground) * background_iou + foreground * foreground_iou,
                                              rel=1e-9)


@pytest.mark.slow
def test_isbi_tiled_validation_during_training_scores_as_evaluate_tile_does(isbi_run):
  """eval.tile=32: the loop's validation is `fcnjax.evaluate --tile=32` of the checkpoint it scored, challenge
  metrics included."""
  _, workdir = isbi_run
  (trained,) = [r for r in reporting.read_metrics(str(workdir)) if r["kind"] == "eval"]
  result = run_python("-m", "fcnjax.evaluate", f"--workdir={workdir}", "--tile=32", "--checkpoint=latest")
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads((workdir / "evaluation.json").read_text())
  assert record["step"] == trained["step"] == 40
  for key in ("pixel_error", "rand_error", "foreground_iou", "miou", "per_class_iou"):
    np.testing.assert_allclose(trained[key], record[key], atol=1e-9, err_msg=key)


@pytest.mark.slow
def test_isbi_evaluate_tiled_prints_challenge_metrics(isbi_run):
  _, workdir = isbi_run
  result = run_python("-m", "fcnjax.evaluate", f"--workdir={workdir}", "--tile=32", "--tta=d4", "--checkpoint=latest")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "pixel_error" in result.stdout and "rand_error" in result.stdout
  record = json.loads((workdir / "evaluation.json").read_text())
  assert record["tile"] == 32 and record["tta"] == "d4"
  # benchmarks/binary_errors.py takes the same logits: its pixel error at logit 0 is evaluate's.
  analysis = run_python("-m", "benchmarks.binary_errors", f"--workdir={workdir}", "--tile=32", "--tta=d4",
                        "--checkpoint=latest")
  assert analysis.returncode == 0, analysis.stderr[-3000:]
  assert f"pixel error {record['pixel_error']:.4f}" in analysis.stdout, analysis.stdout
  assert f"| +0.00 | {record['pixel_error']:.4f} |" in analysis.stdout, analysis.stdout
  # The challenge metrics (from the label maps) and the confusion matrix's scores are two counts of the same
  # predictions: they agree on the binary problem.
  np.testing.assert_allclose(record["pixel_error"], 1.0 - record["pixel_accuracy"], atol=1e-9)
  np.testing.assert_allclose(record["foreground_iou"], record["per_class_iou"][1], atol=1e-9)
  np.testing.assert_allclose(record["foreground_dice"], record["per_class_dice"][1], atol=1e-9)


@pytest.mark.slow
def test_isbi_evaluate_with_the_threshold_chosen_on_the_training_images(isbi_run):
  """--threshold=train: the threshold with the fewest wrong pixels on the training crops, predicted as evaluation
  predicts (tiles, TTA), then applied to the validation crop."""
  _, workdir = isbi_run
  result = run_python("-m", "fcnjax.evaluate", f"--workdir={workdir}", "--tile=32", "--tta=flip",
                      "--checkpoint=latest", "--threshold=train")
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads((workdir / "evaluation.json").read_text())
  segmenter = Segmenter.from_run(str(workdir), "latest", tile=32, tta="flip")
  logits = {}
  for split in ("train", "validation"):
    examples = sources.load_split(segmenter.data_config, split).examples
    logits[split] = [(segmenter.logits(examples[i]["image"])[..., 0], examples[i]["mask"])
                     for i in range(len(examples))]
  assert len(logits["train"]) == 3 and len(logits["validation"]) == 1
  expected, train_error = metrics.best_binary_threshold(np.stack([l for l, _ in logits["train"]]),
                                                        np.stack([m for _, m in logits["train"]]))
  assert record["threshold"] == pytest.approx(expected, abs=1e-6) and expected != 0.0
  assert f"threshold {expected:+.4f} (logit), chosen on the training images: pixel error {train_error:.4f}" in \
      result.stdout
  (validation_logits, validation_mask), = logits["validation"]
  np.testing.assert_allclose(record["pixel_error"], np.mean((validation_logits > expected) != validation_mask),
                             atol=1e-9)
  bad = run_python("-m", "fcnjax.evaluate", f"--workdir={workdir}", "--threshold=high")
  assert bad.returncode != 0 and "--threshold=high: expected a logit (a finite number) or 'train'" in bad.stderr
