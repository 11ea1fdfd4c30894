"""Prediction to PNGs: `python -m fcnjax.predict --workdir runs/quickstart --images DIR --out DIR`.

For each image it writes NAME_mask.png (class ids, palette PNG), NAME_overlay.png (colours over the image) and
NAME_panel.png (image | prediction | ground truth when --masks holds one, as in the seed articles).
"""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags, logging
from PIL import Image

from fcnjax import checkpoint, data, inference, models, parallel, visualize
from fcnjax.data import sources

FLAGS = flags.FLAGS


def define_inference_flags() -> None:
  flags.DEFINE_string("workdir", None, "Training workdir (its config.json and checkpoints).", required=True)
  flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint to use.")
  flags.DEFINE_integer("tile", 0, "Overlap-tile inference with tiles of this size (0: whole image).")
  flags.DEFINE_integer("tile_margin", -1, "Context discarded at each tile side (-1: tile // 8).")
  flags.DEFINE_bool("blend", False, "Blend half-overlapping tiles with a Gaussian window.")
  flags.DEFINE_bool("flip_tta", False, "Average with the horizontally flipped prediction.")


def load_run(workdir: str, which: str = "best") -> tuple[ml_collections.ConfigDict, Any, dict, int]:
  """The config, model and variables of a training run's checkpoint."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a directory written by fcnjax.train")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  model = models.build_model(config.model)
  ckpts = checkpoint.Checkpoints(workdir, keep=config.train.keep_checkpoints, keep_best=config.train.keep_best)
  variables, step = ckpts.restore_variables(checkpoint.model_record(config), which=which)
  ckpts.close()
  return config, model, variables, step


class Predictor:
  """Image (uint8, any size) -> logits at its own size, whole-image or overlap-tile."""

  def __init__(self, config, model, variables, tile: int = 0, tile_margin: int = -1, blend: bool = False,
               flip_tta: bool = False):
    self.data_config = data.resolve(config.data)
    self.variables = variables
    self.predict_fn = inference.make_predict_fn(model.apply)
    self.tile, self.blend, self.flip_tta = tile, blend, flip_tta
    self.tile_margin = tile // 8 if tile_margin < 0 else tile_margin

  def logits(self, image: np.ndarray) -> np.ndarray:
    normalized = data.normalize(image, self.data_config)
    if self.tile:
      return inference.predict_tiled(self.predict_fn, self.variables, normalized, self.tile, self.tile_margin,
                                     blend=self.blend, flip_tta=self.flip_tta)
    return inference.predict_whole(self.predict_fn, self.variables, normalized,
                                   input_size=self.data_config.eval_size or None, flip_tta=self.flip_tta)

  def labels(self, image: np.ndarray) -> np.ndarray:
    return inference.predict_labels(self.logits(image))


def write_prediction(out_dir: str, name: str, image: np.ndarray, prediction: np.ndarray,
                     ground_truth: np.ndarray | None, ignore_index: int) -> None:
  os.makedirs(out_dir, exist_ok=True)
  mask_png = Image.fromarray(prediction, mode="P")
  mask_png.putpalette(visualize.palette().reshape(-1).tolist())
  mask_png.save(os.path.join(out_dir, f"{name}_mask.png"))
  Image.fromarray(visualize.overlay(image, prediction)).save(os.path.join(out_dir, f"{name}_overlay.png"))
  panel = visualize.side_by_side(image, prediction, ground_truth, ignore_index)
  Image.fromarray(panel).save(os.path.join(out_dir, f"{name}_panel.png"))


def write_validation_predictions(config, variables, out_dir: str, count: int, **predictor_options) -> int:
  """PNGs for the first `count` validation examples (image | prediction | ground truth)."""
  predictor = Predictor(config, models.build_model(config.model), variables, **predictor_options)
  split = sources.load_split(predictor.data_config, "validation")
  written = 0
  for i in range(min(count, len(split.examples))):
    example = split.examples[i]
    name = split.examples.name(i) if hasattr(split.examples, "name") else f"{i:04d}"
    write_prediction(out_dir, os.path.splitext(os.path.basename(str(name)))[0], example["image"],
                     predictor.labels(example["image"]), example["mask"], predictor.data_config.ignore_index)
    written += 1
  return written


def _find_mask(mask_dir: str | None, image_path: str) -> str | None:
  if not mask_dir:
    return None
  stem = os.path.splitext(os.path.basename(image_path))[0]
  for candidate in sorted(os.listdir(mask_dir)):
    if os.path.splitext(candidate)[0] in (stem, f"{stem}_mask"):
      return os.path.join(mask_dir, candidate)
  return None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  parallel.quiet_logging()
  config, model, variables, step = load_run(FLAGS.workdir, FLAGS.checkpoint)
  predictor = Predictor(config, model, variables, FLAGS.tile, FLAGS.tile_margin, FLAGS.blend, FLAGS.flip_tta)
  paths = data.list_images(FLAGS.images)
  if not paths:
    raise app.UsageError(f"no images found in {FLAGS.images}")
  mask_mode = predictor.data_config.mask_mode
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  for path in tqdm(paths, desc="predict", unit="image"):
    image = data.read_image(path)
    mask_path = _find_mask(FLAGS.masks, path)
    ground_truth = data.read_mask(mask_path, mask_mode) if mask_path else None
    name = os.path.splitext(os.path.basename(path))[0]
    write_prediction(FLAGS.out, name, image, predictor.labels(image), ground_truth,
                     predictor.data_config.ignore_index)
  logging.info("wrote %d predictions of step %d to %s", len(paths), step, FLAGS.out)
  print(f"wrote predictions for {len(paths)} images (checkpoint step {step}) to {FLAGS.out}")


if __name__ == "__main__":
  define_inference_flags()
  flags.DEFINE_string("images", None, "Folder of images to segment.", required=True)
  flags.DEFINE_string("out", None, "Folder for the PNGs.", required=True)
  flags.DEFINE_string("masks", None, "Optional folder of ground-truth masks (same stem, or STEM_mask).")
  app.run(main)
