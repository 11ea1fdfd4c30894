"""The taps of a sliding window over an NHWC map, and their adjoint.

A k x k window with strides s and dilation d visits, for its tap (i, j), the strided slice of the padded input that
starts at (i * d, j * d). Convolutions (fcnjax.conv) and max pooling (fcnjax.layers.max_pool) are written here as
sums or maxima over those slices; their input gradients put each tap's share back where the slice came from
(`untap`, a zero-padding with interior padding: the transpose of the strided slice).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def pad_hw(x: Array, pads: Sequence[tuple[int, int]], value=0) -> Array:
  """Pad (or, with negative widths, crop) the two spatial axes of an NHWC array."""
  return lax.pad(x, jnp.asarray(value, x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))


def out_hw(in_hw: Sequence[int], window: Sequence[int], strides: Sequence[int], pads: Sequence[tuple[int, int]],
           dilation: Sequence[int] = (1, 1)) -> tuple[int, int]:
  """Output height and width of a window sliding over an in_hw map padded by pads (floor mode)."""
  return tuple((size + lo + hi - (k - 1) * d - 1) // s + 1
               for size, k, s, (lo, hi), d in zip(in_hw, window, strides, pads, dilation))


def tap(x_padded: Array, i: int, j: int, out: Sequence[int], strides: Sequence[int],
        dilation: Sequence[int] = (1, 1)) -> Array:
  """(n, out_h, out_w, c): what tap (i, j) of the window sees at every output position."""
  (sh, sw), (dh, dw) = strides, dilation
  n, _, _, c = x_padded.shape
  return lax.slice(x_padded, (0, i * dh, j * dw, 0),
                   (n, i * dh + (out[0] - 1) * sh + 1, j * dw + (out[1] - 1) * sw + 1, c), (1, sh, sw, 1))


def untap(values: Array, i: int, j: int, padded_hw: Sequence[int], strides: Sequence[int],
          dilation: Sequence[int] = (1, 1)) -> Array:
  """The adjoint of `tap`: (n, padded_h, padded_w, c), zero except where tap (i, j) read, which holds values."""
  (sh, sw), (dh, dw) = strides, dilation
  _, out_h, out_w, _ = values.shape
  top, left = i * dh, j * dw
  return lax.pad(values, jnp.zeros((), values.dtype),
                 ((0, 0, 0), (top, padded_hw[0] - top - (out_h - 1) * sh - 1, sh - 1),
                  (left, padded_hw[1] - left - (out_w - 1) * sw - 1, sw - 1), (0, 0, 0)))
