"""Inference on single images of any size: whole-image, or overlap-tile (Ronneberger et al. 2015, fig. 2).

Overlap-tile: the image is mirror-padded by `margin`; each tile of `tile_size` sees `margin` pixels of context on
every side and contributes only its centre (tile_size - 2 * margin) square, so every output pixel is predicted with
full context and the model only ever sees one fixed input shape (one compilation, bounded memory). With
`blend=True` tiles step by half a centre and overlapping centres are averaged with a Gaussian window, which hides
seams for models that are not translation-equivariant.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fcnjax import executable_cache, metrics, ops, steps


def make_predict_fn(model, executables=None) -> executable_cache.CachedJit:
  """jitted (variables, images NHWC float32) -> float32 logits of a Flax model; compiled once per input shape, and
  kept in the folder `executables` if given (fcnjax.executable_cache)."""
  return executable_cache.CachedJit(functools.partial(steps.predict_step, apply_fn=model.apply),
                                    f"fcnjax.steps.predict_step model={executable_cache.describe_module(model)}",
                                    executables)


# Test-time augmentation: the prediction averaged over transformed copies of the input, each mapped back.
# "flip": the image and its left-right mirror; "d4": the 8 symmetries of the square (4 rotations by 90 degrees, each
# with and without the mirror), for images with no orientation such as EM or satellite tiles. A non-square input
# rotated by 90 degrees has another shape, so whole-image "d4" compiles the model for both.
TTA_MODES = ("none", "flip", "d4")


def tta_symmetries(tta: str) -> list[tuple[int, bool]]:
  """(quarter turns, mirrored) of each transformed copy."""
  if tta not in TTA_MODES:
    raise ValueError(f"tta={tta!r}: expected one of {', '.join(TTA_MODES)}")
  turns = range(4) if tta == "d4" else range(1)
  mirrors = (False, True) if tta in ("flip", "d4") else (False,)
  return [(k, mirrored) for k in turns for mirrored in mirrors]


def _with_tta(predict_fn, variables, images: np.ndarray, tta: str) -> np.ndarray:
  """Mean logits over the transformed copies of an NHWC batch, each mapped back to the input's frame."""
  total = None
  symmetries = tta_symmetries(tta)
  for turns, mirrored in symmetries:
    transformed = images[:, :, ::-1] if mirrored else images
    transformed = np.ascontiguousarray(np.rot90(transformed, turns, axes=(1, 2)))
    logits = np.rot90(np.asarray(predict_fn(variables, transformed)), -turns, axes=(1, 2))
    logits = logits[:, :, ::-1] if mirrored else logits
    total = logits if total is None else total + logits
  return np.ascontiguousarray(total / len(symmetries)) if len(symmetries) > 1 else np.asarray(total)


def predict_whole(predict_fn, variables, image: np.ndarray, input_size: int | None = None,
                  tta: str = "none") -> np.ndarray:
  """Logits (H, W, C) at the image's own size for a normalised (H, W, 3) image.

  With `input_size`, the image is resized to input_size^2 for the model and the logits are resized back
  bilinearly (align_corners=False), as in evaluation.
  """
  h, w = image.shape[:2]
  batch = image[None]
  if input_size:
    batch = np.asarray(ops.resize(jnp.asarray(batch), (input_size, input_size), "bilinear"))
  logits = _with_tta(predict_fn, variables, batch, tta)
  if logits.shape[1:3] != (h, w):
    logits = np.asarray(ops.resize(jnp.asarray(logits), (h, w), "bilinear"))
  return logits[0]


def _tile_starts(length: int, tile: int, step: int) -> list[int]:
  starts = list(range(0, max(length - tile, 0) + 1, step))
  if starts[-1] + tile < length:
    starts.append(length - tile)
  return starts


def _gaussian_window(size: int) -> np.ndarray:
  x = np.arange(size, dtype=np.float32) - (size - 1) / 2
  return np.exp(-0.5 * (x / (size / 4)) ** 2)


def predict_tiled(predict_fn, variables, image: np.ndarray, tile_size: int, margin: int, batch_size: int = 4,
                  blend: bool = False, tta: str = "none") -> np.ndarray:
  """Overlap-tile logits (H, W, C) for a normalised (H, W, 3) image of any size."""
  if not 0 <= 2 * margin < tile_size:
    raise ValueError(f"tile margin {margin} leaves no centre in a {tile_size}-pixel tile")
  core = tile_size - 2 * margin
  h, w = image.shape[:2]
  # Mirror padding gives border pixels context (the paper's choice); enough extra so tiles cover the image.
  pad_h, pad_w = max(core - h, 0), max(core - w, 0)
  padded = np.pad(image, ((margin, margin + pad_h), (margin, margin + pad_w), (0, 0)), mode="symmetric")
  out_h, out_w = h + pad_h, w + pad_w
  step = core // 2 if blend else core
  starts = [(y, x) for y in _tile_starts(out_h, core, max(step, 1)) for x in _tile_starts(out_w, core, max(step, 1))]
  window = np.outer(_gaussian_window(core), _gaussian_window(core)) if blend else np.ones((core, core), np.float32)

  accumulated, weights = None, np.zeros((out_h, out_w, 1), np.float32)
  for first in range(0, len(starts), batch_size):
    chunk = starts[first:first + batch_size]
    tiles = np.stack([padded[y:y + tile_size, x:x + tile_size] for y, x in chunk])
    if len(chunk) < batch_size:  # keep one input shape: one compilation
      tiles = np.concatenate([tiles, np.repeat(tiles[-1:], batch_size - len(chunk), axis=0)])
    logits = _with_tta(predict_fn, variables, tiles, tta)
    if accumulated is None:
      accumulated = np.zeros((out_h, out_w, logits.shape[-1]), np.float32)
    for (y, x), tile_logits in zip(chunk, logits):
      centre = tile_logits[margin:margin + core, margin:margin + core]
      if blend:
        accumulated[y:y + core, x:x + core] += centre * window[..., None]
        weights[y:y + core, x:x + core] += window[..., None]
      else:  # each pixel belongs to exactly one tile centre (the last tile may overlap the one before)
        accumulated[y:y + core, x:x + core] = centre
        weights[y:y + core, x:x + core] = 1
  return (accumulated / weights)[:h, :w]


def predict_labels(logits: np.ndarray, threshold: float = 0.0) -> np.ndarray:
  """(H, W, C) logits -> uint8 class ids, as the evaluation scores them (metrics.predictions; `threshold` is a
  one-logit model's)."""
  return np.asarray(metrics.predictions(jnp.asarray(logits)[None], threshold)[0]).astype(np.uint8)
