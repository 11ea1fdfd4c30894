"""Segmenter: a trained or converted model as a function from images to class maps.

  seg = fcnjax.Segmenter.from_run("runs/pet_fcn8s")               # best checkpoint of a training run
  labels = seg.predict("photo.jpg")                               # uint8 (H, W) class ids at the photo's size
  probabilities = seg.predict(photos, probabilities=True)         # a list of float32 (H, W, C) maps

Images are normalised as the model was trained (the run's data config; ImageNet statistics for converted weights),
predicted whole or by overlap tiles, and the logits come back at each image's own size. A model built for another
number of image channels (smp's in_channels) takes (H, W, C) uint8 arrays; with one channel, also grey (H, W)
arrays, and paths and PIL images read as grey.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np

from fcnjax import data, inference, models, pretrained, runs
from fcnjax.data.config import IMAGENET_MEAN, IMAGENET_STD
from fcnjax.data.transforms import normalize_with

ImageLike = Any  # a path, a PIL image, or an (H, W, channels) uint8 array
# Converted weights for images of other than 3 channels are normalised, unless told, with ImageNet's statistics
# averaged over R, G and B, for each channel: smp's first-conv adaptation sums (1 channel) or repeats the RGB filters.
GREY_MEAN = float(np.mean(IMAGENET_MEAN))
GREY_STD = float(np.mean(IMAGENET_STD))


class Segmenter:
  """Predicts class ids (or probabilities) for images of any size.

  The model is compiled once per input shape: a stream of photos of many sizes compiles once per size, unless
  `bucket=B` pads each image (mirroring its edges) up to multiples of B pixels, so that sizes share compilations;
  the padding is cut from the logits. With `tile=T` every image is predicted by overlap tiles of T x T (one
  compilation in all; `tile_margin`, `blend`: see fcnjax.inference.predict_tiled). `tta` averages the logits over
  transformed copies of each image: "flip" with its mirror image, "d4" over the 8 symmetries of the square.

  A one-logit (binary) model calls a pixel foreground where its logit is above `threshold` (0: probability 0.5;
  fcnjax.evaluation.calibrate_threshold chooses one on the training images of the data config).

  Images have the model's `in_channels` channels (3 unless the model says otherwise) and are normalised with `mean`
  and `std` (one value per channel, in [0, 1] units), the data config's unless given.

  `executables`, a folder, keeps the compiled model there for the next process that predicts with the same model
  and input shape (fcnjax.executable_cache; for fcnjax's own models, as the entry points use it).
  """

  def __init__(self, model, variables: dict, data_config=None, *, tile: int = 0, tile_margin: int = -1,
               blend: bool = False, tta: str = "none", bucket: int = 0, mean=None, std=None, threshold: float = 0.0,
               executables=None):
    if bucket < 0 or tile < 0:
      raise ValueError(f"Segmenter: bucket={bucket} and tile={tile} must be >= 0")
    if not np.isfinite(threshold):
      raise ValueError(f"Segmenter: threshold={threshold} must be a finite logit")
    inference.tta_symmetries(tta)  # an unknown mode is an error here, before anything compiles
    self.model = model
    self.variables = variables
    self.data_config = data.resolve(data_config)
    self.channels = _image_channels(model)
    self.mean, self.std = _statistics(self.data_config, self.channels, mean, std)
    self.tile, self.blend, self.tta, self.bucket, self.threshold = tile, blend, tta, bucket, float(threshold)
    self.tile_margin = tile // 8 if tile_margin < 0 else tile_margin
    self._predict_fn = inference.make_predict_fn(model, executables)

  @classmethod
  def from_run(cls, workdir: str, checkpoint: str = "best", **options) -> "Segmenter":
    """The best (by validation mIoU) or latest checkpoint of a training run's workdir, with its data config."""
    run = runs.load_run(workdir, checkpoint)
    return cls(run.model, run.variables, run.config.data, **options)

  @classmethod
  def from_weights(cls, path: str, model: str, num_classes: int | None = None, model_options: dict | None = None,
                   **options) -> "Segmenter":
    """Converted weights (conversions/convert_torchvision.py's --out) for the zoo model `model`; the number of
    classes, and the image channels of a model that has `in_channels` (smp's), are read from the weights unless
    given. Images are normalised with ImageNet statistics (GREY_MEAN / GREY_STD per channel for other than 3
    channels) unless `mean` and `std` are given."""
    variables = pretrained.load_variables(path)
    config = {"name": model, **(model_options or {})}
    if num_classes is not None:
      config["num_classes"] = num_classes
    built = models.build_model(config)
    expected = _variable_shapes(built)
    mismatched = _shape_differences(expected, variables)
    if mismatched:
      read = {"num_classes": _class_count(expected, variables) if num_classes is None else None,
              "in_channels": (_input_channels(expected, variables, built.in_channels)
                              if hasattr(built, "in_channels") and "in_channels" not in config else None)}
      config.update({key: value for key, value in read.items() if value is not None})
      built = models.build_model(config)
      expected = _variable_shapes(built)
      mismatched = _shape_differences(expected, variables)
    if mismatched:
      raise ValueError(f"{path}: not weights of {config}: " + "; ".join(mismatched[:8]))
    return cls(built, variables, None, **options)

  def predict(self, images: ImageLike | Sequence[ImageLike] | np.ndarray, probabilities: bool = False):
    """Class ids, uint8 (H, W), for one image (a path, a PIL image or an (H, W, channels) uint8 array); a list of
    them for a list of images; (N, H, W) for an (N, H, W, channels) array. probabilities=True gives the softmax
    (sigmoid for a one-logit binary model) maps instead, float32 (H, W, K)."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
      return np.stack([self._predict_one(image, probabilities) for image in images])
    if isinstance(images, (list, tuple)):
      return [self._predict_one(self._as_array(image), probabilities) for image in images]
    return self._predict_one(self._as_array(images), probabilities)

  def logits(self, image: np.ndarray) -> np.ndarray:
    """float32 (H, W, K) logits of one uint8 (H, W, channels) image, at its size."""
    normalized = normalize_with(image, self.mean, self.std)
    if self.tile:
      return inference.predict_tiled(self._predict_fn, self.variables, normalized, self.tile, self.tile_margin,
                                     blend=self.blend, tta=self.tta)
    h, w = normalized.shape[:2]
    if self.bucket:
      padded_h, padded_w = (-(-size // self.bucket) * self.bucket for size in (h, w))
      normalized = np.pad(normalized, ((0, padded_h - h), (0, padded_w - w), (0, 0)), mode="symmetric")
    logits = inference.predict_whole(self._predict_fn, self.variables, normalized,
                                     input_size=self.data_config.eval_size or None, tta=self.tta)
    return logits[:h, :w]

  def labels(self, image: np.ndarray) -> np.ndarray:
    """uint8 (H, W) class ids of one uint8 (H, W, channels) image."""
    return self._labels_of(self.logits(image))

  def _labels_of(self, logits: np.ndarray) -> np.ndarray:
    if self.threshold and logits.shape[-1] != 1:
      raise ValueError(f"Segmenter: threshold={self.threshold} is for one-logit binary models; this one has "
                       f"{logits.shape[-1]} classes")
    return inference.predict_labels(logits, self.threshold)

  def _as_array(self, image: ImageLike) -> np.ndarray:
    """An (H, W, channels) array, grey for a one-channel model: paths and PIL images read as RGB or as grey."""
    if isinstance(image, (str, os.PathLike)):
      image = data.read_image(image)
      return _grey(image) if self.channels == 1 else image
    if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
      if self.channels == 1:
        return np.asarray(image.convert("L"))[..., None]
      return np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    return image[..., None] if self.channels == 1 and image.ndim == 2 else image

  def _predict_one(self, image: np.ndarray, probabilities: bool) -> np.ndarray:
    if image.ndim != 3 or image.shape[-1] != self.channels or image.dtype != np.uint8:
      raise ValueError(f"Segmenter.predict: expected an (H, W, {self.channels}) uint8 image, got {image.dtype} "
                       f"{image.shape}")
    logits = self.logits(image)
    if not probabilities:
      return self._labels_of(logits)
    if logits.shape[-1] == 1:
      return np.asarray(jax.nn.sigmoid(logits), np.float32)
    return np.asarray(jax.nn.softmax(logits, axis=-1), np.float32)


def _grey(rgb: np.ndarray) -> np.ndarray:
  """uint8 (H, W, 3) -> (H, W, 1) luma (ITU-R 601, as PIL's "L"); a grey image read as RGB keeps its values."""
  luma = rgb.astype(np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32)
  return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]


def _statistics(data_config, channels: int, mean, std) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """The per-channel mean and std images are normalised with; ValueError when they do not fit the channels."""
  if mean is None:
    mean = data_config.mean if channels == 3 else (GREY_MEAN,) * channels
  if std is None:
    std = data_config.std if channels == 3 else (GREY_STD,) * channels
  mean, std = tuple(float(v) for v in np.atleast_1d(mean)), tuple(float(v) for v in np.atleast_1d(std))
  if len(mean) != channels or len(std) != channels or min(std) <= 0:
    raise ValueError(f"Segmenter: mean={mean} and std={std} need {channels} values each (the model's image "
                     "channels), std > 0")
  return mean, std


def _image_channels(model) -> int:
  """The channels of the images a model takes: its in_channels where it has them (smp's), else RGB."""
  return int(getattr(model, "in_channels", 3))


def _variable_shapes(model):
  images = np.zeros((1, 224, 224, _image_channels(model)), np.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), images)


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


def _class_count(expected, variables) -> int | None:
  """The weights' number of classes: the last dimension of the first head kernel whose shape differs only there;
  None when none does (the model's own count, or weights of another model)."""
  want, have = _flat_shapes(expected), _flat_shapes(variables)
  for key in sorted(set(want) & set(have)):
    if want[key] != have[key] and want[key][:-1] == have[key][:-1]:
      return int(have[key][-1])
  return None


def _input_channels(expected, variables, model_channels: int) -> int | None:
  """The weights' image channels: the input dimension of the one convolution kernel that differs from the model's
  there alone, where the model takes `model_channels`; None when there is no such kernel."""
  want, have = _flat_shapes(expected), _flat_shapes(variables)
  found = {have[key][-2] for key in set(want) & set(have)
           if len(want[key]) == 4 and want[key][-2] == model_channels and len(have[key]) == 4
           and have[key][:-2] == want[key][:-2] and have[key][-1] == want[key][-1] and have[key][-2] != model_channels}
  return int(found.pop()) if len(found) == 1 else None
