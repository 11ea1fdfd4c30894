"""Crops and pads that align feature maps of different sizes (FCN's skips, U-Net's concatenations)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fcnjax.ops.windows import PairLike, pair

Array = jax.Array


def crop(x: Array, offset: PairLike, size: PairLike) -> Array:
  """x[:, oy:oy+h, ox:ox+w] with a clear error when the window does not fit."""
  (oy, ox), (h, w) = pair(offset), pair(size)
  if oy < 0 or ox < 0 or oy + h > x.shape[1] or ox + w > x.shape[2]:
    raise ValueError(f"crop of {h}x{w} at offset ({oy}, {ox}) does not fit in a {x.shape[1]}x{x.shape[2]} map")
  return x[:, oy:oy + h, ox:ox + w, :]


def center_crop(x: Array, size: PairLike) -> Array:
  h, w = pair(size)
  return crop(x, ((x.shape[1] - h) // 2, (x.shape[2] - w) // 2), (h, w))


def pad_or_crop_to(x: Array, size: PairLike) -> Array:
  """Zero-pad (or centre-crop) the spatial axes to `size`, the extra pixel going to the bottom/right.

  This is how U-Net implementations align an up-sampled map with its skip connection at odd sizes.
  """
  h, w = pair(size)
  dh, dw = h - x.shape[1], w - x.shape[2]
  if dh < 0 or dw < 0:
    x = center_crop(x, (min(h, x.shape[1]), min(w, x.shape[2])))
    dh, dw = h - x.shape[1], w - x.shape[2]
  if dh or dw:
    x = jnp.pad(x, ((0, 0), (dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2), (0, 0)))
  return x


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
  return math.floor((size + 2 * padding - dilation * (kernel - 1) - 1) / stride) + 1
