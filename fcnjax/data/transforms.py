"""Numpy transforms applied jointly to an image and its mask.

Resizing uses PIL -- bilinear for images, nearest for masks -- as torchvision's segmentation reference scripts do
(references/segmentation/transforms.py), so that class ids are never blended. Randomness comes only from the
np.random.Generator passed in, which the loader derives from (seed, global example index): the same example at the
same position of the stream is always augmented the same way, whichever process or worker prepares it.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from fcnjax.data import elastic as elastic_lib
from fcnjax.data import weight_map


def _hw(size) -> tuple[int, int]:
  return (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))


def resize_image(image: np.ndarray, size) -> np.ndarray:
  """uint8 (H, W, 3) -> uint8 (h, w, 3), bilinear; size is an int (square) or (height, width)."""
  h, w = _hw(size)
  if image.shape[:2] == (h, w):
    return image
  return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size) -> np.ndarray:
  """uint8 (H, W) -> uint8 (h, w), nearest neighbour."""
  h, w = _hw(size)
  if mask.shape == (h, w):
    return mask
  return np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))


def normalize_with(image: np.ndarray, mean, std) -> np.ndarray:
  """uint8 (..., 3) -> float32 (image / 255 - mean) / std, mean and std in [0, 1] units as torchvision's."""
  mean = np.asarray(mean, np.float32) * 255.0
  scale = 1.0 / (np.asarray(std, np.float32) * 255.0)
  return (image.astype(np.float32) - mean) * scale


def normalize(image: np.ndarray, cfg) -> np.ndarray:
  """uint8 (..., 3) -> float32, normalised with cfg.mean / cfg.std."""
  return normalize_with(image, cfg.mean, cfg.std)


def prepare_inference_image(image: np.ndarray, cfg) -> np.ndarray:
  """uint8 (H, W, 3) -> float32 (S, S, 3) resized to cfg.eval_size (kept at its own size when eval_size is 0)."""
  if cfg.eval_size:
    image = resize_image(image, cfg.eval_size)
  return normalize(image, cfg)


def random_scale(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, scale_range) -> tuple:
  low, high = scale_range
  if low == high == 1.0:
    return image, mask
  scale = rng.uniform(low, high)
  h, w = mask.shape
  size = max(1, round(h * scale)), max(1, round(w * scale))
  return resize_image(image, size), resize_mask(mask, size)


def pad_to(image: np.ndarray, mask: np.ndarray, size, ignore_index: int) -> tuple:
  """Pads bottom and right up to `size`: image with 0 (black, as torchvision's pad_if_smaller), mask with
  ignore_index so that padding never counts in the loss."""
  h, w = _hw(size)
  pad_h, pad_w = max(h - mask.shape[0], 0), max(w - mask.shape[1], 0)
  if pad_h or pad_w:
    image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=0)
    mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=ignore_index)
  return image, mask


def mirror_pad(image: np.ndarray, mask: np.ndarray, padding: int) -> tuple:
  """Image (H, W, 3) and mask (H, W) with `padding` pixels mirrored onto each side, the edge pixel repeated
  (numpy's 'symmetric'; torchvision's padding_mode='symmetric'), as overlap-tile inference pads an image."""
  if not padding:
    return image, mask
  return (np.pad(image, ((padding, padding), (padding, padding), (0, 0)), mode="symmetric"),
          np.pad(mask, padding, mode="symmetric"))


def random_crop(image: np.ndarray, mask: np.ndarray, size, rng: np.random.Generator, ignore_index: int) -> tuple:
  """A uniformly placed crop of `size`, padding first where the example is smaller."""
  h, w = _hw(size)
  image, mask = pad_to(image, mask, (h, w), ignore_index)
  top = int(rng.integers(0, mask.shape[0] - h + 1))
  left = int(rng.integers(0, mask.shape[1] - w + 1))
  return image[top:top + h, left:left + w], mask[top:top + h, left:left + w]


def elastic_deform(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, sigma: float = 10.0,
                   grid_points: int = 3) -> tuple:
  """The U-Net paper's elastic deformation (data.elastic=True), fcnjax.data.elastic.elastic_deform.

  Takes and returns (image uint8 (H, W, 3), mask uint8 (H, W)) of the same size; the image is sampled bilinearly,
  the mask with nearest neighbour, both mirrored where the warp leaves the crop (see fcnjax/data/elastic.py).
  """
  return elastic_lib.elastic_deform(image, mask, rng, sigma=sigma, grid_points=grid_points)


def ignore_margin(mask: np.ndarray, margin: int, ignore_index: int) -> np.ndarray:
  """A copy of `mask` (H, W) with its outer `margin` pixels on each side set to ignore_index."""
  height, width = mask.shape[:2]
  out = np.full_like(mask, ignore_index)
  out[margin:height - margin, margin:width - margin] = mask[margin:height - margin, margin:width - margin]
  return out


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """Random scale -> (mirror padding) -> pad/crop -> flips -> 90-degree rotation -> (elastic) -> normalise.
  Picklable for workers.

  With mirror_padding p, p pixels are mirrored onto each side of the example before the crop, so crops reach
  past its edge: its edge pixels are then trained with the mirrored context that overlap-tile inference gives
  them, and crops cover them as often as, without the padding, they cover the pixels p inside the edge.

  With border_weight, the example also gets 'weight', the U-Net paper's weight map (fcnjax.data.weight_map) of
  the mask as it leaves the augmentation, so that its distances are those of the deformed membranes the network
  sees (warping a precomputed map instead would stretch the weights with the membranes and lose that).
  With ignore_margin m, the mask's outer m pixels on each side are set to ignore_index after that: the loss then
  scores only pixels with at least m pixels of the crop around them, as the U-Net paper's unpadded convolutions
  score only the pixels whose context lies in the tile.
  """
  crop_size: tuple[int, int]
  scale_range: tuple[float, float] = (1.0, 1.0)
  hflip: bool = True
  vflip: bool = False
  rot90: bool = False
  elastic: bool = False
  elastic_sigma: float = elastic_lib.DEFAULT_SIGMA
  elastic_grid_points: int = elastic_lib.DEFAULT_GRID_POINTS
  border_weight: bool = False
  border_w0: float = weight_map.DEFAULT_W0
  border_sigma: float = weight_map.DEFAULT_SIGMA
  border_class_weights: tuple[float, ...] = ()   # () = balanced per mask
  ignore_margin: int = 0
  mirror_padding: int = 0
  mean: tuple[float, ...] = (0.485, 0.456, 0.406)
  std: tuple[float, ...] = (0.229, 0.224, 0.225)
  ignore_index: int = 255

  def __call__(self, example: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    image, mask = random_scale(example["image"], example["mask"], rng, self.scale_range)
    image, mask = mirror_pad(image, mask, self.mirror_padding)
    image, mask = random_crop(image, mask, self.crop_size, rng, self.ignore_index)
    if self.hflip and rng.random() < 0.5:
      image, mask = image[:, ::-1], mask[:, ::-1]
    if self.vflip and rng.random() < 0.5:
      image, mask = image[::-1], mask[::-1]
    if self.rot90:
      k = int(rng.integers(4))
      image, mask = np.rot90(image, k), np.rot90(mask, k)
    if self.elastic:
      image, mask = elastic_deform(np.ascontiguousarray(image), np.ascontiguousarray(mask), rng,
                                   sigma=self.elastic_sigma, grid_points=self.elastic_grid_points)
    out = {"image": normalize_with(image, self.mean, self.std), "mask": mask.astype(np.int32)}
    if self.border_weight:
      out["weight"] = weight_map.unet_weight_map(
          np.ascontiguousarray(mask), w0=self.border_w0, sigma=self.border_sigma,
          class_weights=tuple(self.border_class_weights) or None, ignore_index=self.ignore_index)
    if self.ignore_margin:
      out["mask"] = ignore_margin(out["mask"], self.ignore_margin, self.ignore_index)
    return out


@dataclasses.dataclass(frozen=True)
class EvalTransform:
  """Resize the image for the model; keep the mask at its original resolution, top-left on a fixed canvas.

  Evaluation resizes the logits back to 'size' inside the canvas and scores against the original mask, so the
  metric is the one at the data's own resolution. A mask larger than the canvas is shrunk (nearest) to fit, with
  a warning: the score is then taken at that smaller size.
  """
  eval_size: tuple[int, int] | None        # None: the image keeps its own size (fixed-size sets)
  canvas: tuple[int, int]
  mean: tuple[float, ...] = (0.485, 0.456, 0.406)
  std: tuple[float, ...] = (0.229, 0.224, 0.225)
  ignore_index: int = 255

  def __call__(self, example: dict[str, Any], valid: bool = True) -> dict[str, np.ndarray]:
    image, mask = example["image"], example["mask"]
    if self.eval_size is not None:
      image = resize_image(image, self.eval_size)
    h, w = mask.shape
    ch, cw = self.canvas
    if h > ch or w > cw:
      factor = min(ch / h, cw / w)
      fitted = max(1, int(h * factor)), max(1, int(w * factor))
      logging.warning("eval mask of %dx%d does not fit the %dx%d eval_canvas; scored at %dx%d (raise "
                      "data.eval_canvas to score it at full size)", h, w, ch, cw, *fitted)
      mask = resize_mask(mask, fitted)
      h, w = fitted
    canvas = np.full((ch, cw), self.ignore_index, np.int32)
    if valid:  # padding examples keep an all-ignore mask, so they count nowhere even if 'valid' is overlooked
      canvas[:h, :w] = mask
    return {"image": normalize_with(image, self.mean, self.std), "mask": canvas,
            "size": np.array([h, w], np.int32), "valid": np.bool_(valid)}
