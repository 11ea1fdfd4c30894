"""Segmenter: a trained or converted model as a function from images to class maps.

  seg = fcnjax.Segmenter.from_run("runs/pet_fcn8s")               # best checkpoint of a training run
  labels = seg.predict("photo.jpg")                               # uint8 (H, W) class ids at the photo's size
  probabilities = seg.predict(photos, probabilities=True)         # a list of float32 (H, W, C) maps

Images are normalised as the model was trained (the run's data config; ImageNet statistics for converted weights),
predicted whole or by overlap tiles, and the logits come back at each image's own size.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np

from fcnjax import data, inference, models, pretrained, runs

ImageLike = Any  # a path, a PIL image, or an (H, W, 3) uint8 array


class Segmenter:
  """Predicts class ids (or probabilities) for images of any size.

  The model is compiled once per input shape: a stream of photos of many sizes compiles once per size, unless
  `bucket=B` pads each image (mirroring its edges) up to multiples of B pixels, so that sizes share compilations;
  the padding is cut from the logits. With `tile=T` every image is predicted by overlap tiles of T x T (one
  compilation in all; `tile_margin`, `blend`: see fcnjax.inference.predict_tiled). `flip_tta` averages with the
  prediction of the horizontally flipped image.
  """

  def __init__(self, model, variables: dict, data_config=None, *, tile: int = 0, tile_margin: int = -1,
               blend: bool = False, flip_tta: bool = False, bucket: int = 0):
    if bucket < 0 or tile < 0:
      raise ValueError(f"Segmenter: bucket={bucket} and tile={tile} must be >= 0")
    self.model = model
    self.variables = variables
    self.data_config = data.resolve(data_config)
    self.tile, self.blend, self.flip_tta, self.bucket = tile, blend, flip_tta, bucket
    self.tile_margin = tile // 8 if tile_margin < 0 else tile_margin
    self._predict_fn = inference.make_predict_fn(model.apply)

  @classmethod
  def from_run(cls, workdir: str, checkpoint: str = "best", **options) -> "Segmenter":
    """The best (by validation mIoU) or latest checkpoint of a training run's workdir, with its data config."""
    run = runs.load_run(workdir, checkpoint)
    return cls(run.model, run.variables, run.config.data, **options)

  @classmethod
  def from_weights(cls, path: str, model: str, num_classes: int | None = None, model_options: dict | None = None,
                   **options) -> "Segmenter":
    """Converted weights (conversions/convert_torchvision.py's --out) for the zoo model `model`; the number of
    classes is read from the weights unless given. Images are normalised with ImageNet statistics."""
    variables = pretrained.load_variables(path)
    config = {"name": model, **(model_options or {})}
    if num_classes is not None:
      config["num_classes"] = num_classes
    built = models.build_model(config)
    expected = jax.eval_shape(built.init, jax.random.PRNGKey(0), np.zeros((1, 224, 224, 3), np.float32))
    mismatched = _shape_differences(expected, variables)
    if mismatched and num_classes is None:
      try:
        config["num_classes"] = _class_count(expected, variables)
      except ValueError:
        raise ValueError(f"{path}: not weights of {config}: " + "; ".join(mismatched[:8])) from None
      built = models.build_model(config)
      expected = jax.eval_shape(built.init, jax.random.PRNGKey(0), np.zeros((1, 224, 224, 3), np.float32))
      mismatched = _shape_differences(expected, variables)
    if mismatched:
      raise ValueError(f"{path}: not weights of {config}: " + "; ".join(mismatched[:8]))
    return cls(built, variables, None, **options)

  def predict(self, images: ImageLike | Sequence[ImageLike] | np.ndarray, probabilities: bool = False):
    """Class ids, uint8 (H, W), for one image (a path, a PIL image or an (H, W, 3) uint8 array); a list of them for
    a list of images; (N, H, W) for an (N, H, W, 3) array. probabilities=True gives the softmax (sigmoid for a
    one-logit binary model) maps instead, float32 (H, W, C)."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
      return np.stack([self._predict_one(image, probabilities) for image in images])
    if isinstance(images, (list, tuple)):
      return [self._predict_one(_as_array(image), probabilities) for image in images]
    return self._predict_one(_as_array(images), probabilities)

  def logits(self, image: np.ndarray) -> np.ndarray:
    """float32 (H, W, C) logits of one uint8 (H, W, 3) image, at its size."""
    normalized = data.normalize(image, self.data_config)
    if self.tile:
      return inference.predict_tiled(self._predict_fn, self.variables, normalized, self.tile, self.tile_margin,
                                     blend=self.blend, flip_tta=self.flip_tta)
    h, w = normalized.shape[:2]
    if self.bucket:
      padded_h, padded_w = (-(-size // self.bucket) * self.bucket for size in (h, w))
      normalized = np.pad(normalized, ((0, padded_h - h), (0, padded_w - w), (0, 0)), mode="symmetric")
    logits = inference.predict_whole(self._predict_fn, self.variables, normalized,
                                     input_size=self.data_config.eval_size or None, flip_tta=self.flip_tta)
    return logits[:h, :w]

  def labels(self, image: np.ndarray) -> np.ndarray:
    """uint8 (H, W) class ids of one uint8 (H, W, 3) image."""
    return inference.predict_labels(self.logits(image))

  def _predict_one(self, image: np.ndarray, probabilities: bool) -> np.ndarray:
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise ValueError(f"Segmenter.predict: expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    logits = self.logits(image)
    if not probabilities:
      return inference.predict_labels(logits)
    if logits.shape[-1] == 1:
      return np.asarray(jax.nn.sigmoid(logits), np.float32)
    return np.asarray(jax.nn.softmax(logits, axis=-1), np.float32)


def _as_array(image: ImageLike) -> np.ndarray:
  if isinstance(image, (str, os.PathLike)):
    return data.read_image(image)
  if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
    return np.asarray(image.convert("RGB"))
  return np.asarray(image)


def _flat_shapes(tree, prefix: str = "") -> dict[str, tuple[int, ...]]:
  if hasattr(tree, "items"):
    return {k: v for key, sub in tree.items() for k, v in _flat_shapes(sub, f"{prefix}{key}/").items()}
  return {prefix.rstrip("/"): tuple(tree.shape)}


def _shape_differences(expected, variables) -> list[str]:
  want, have = _flat_shapes(expected), _flat_shapes(variables)
  missing = [f"{k} missing" for k in sorted(set(want) - set(have))]
  unexpected = [f"{k} unexpected" for k in sorted(set(have) - set(want))]
  shapes = [f"{k}: {have[k]} where the model has {want[k]}" for k in sorted(set(want) & set(have))
            if want[k] != have[k]]
  return missing + unexpected + shapes


def _class_count(expected, variables) -> int:
  """The weights' number of classes: the last dimension of the first head kernel whose shape differs only there."""
  want, have = _flat_shapes(expected), _flat_shapes(variables)
  for key in sorted(set(want) & set(have)):
    if want[key] != have[key] and want[key][:-1] == have[key][:-1]:
      return int(have[key][-1])
  raise ValueError("no head kernel differs from the model's in its number of classes alone")
