"""The taps of a sliding window over an NHWC map, and their adjoint.

A k x k window with strides s and dilation d visits, for its tap (i, j), the strided slice of the padded input that
starts at (i * d, j * d). Convolutions (fcnjax.ops.conv) and max pooling (fcnjax.ops.pooling) are written here as
sums or maxima over those slices (`taps`); their input gradients put each tap's share back where the slice came from
(`fold`: per tap a zero-padding with interior padding, the transpose of the strided slice, summed, then the
input's padding cut off).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

NHWC_HWIO = ("NHWC", "HWIO", "NHWC")  # lax dimension numbers of fcnjax's convolutions: input, kernel, output

Array = jax.Array
PairLike = int | Sequence[int]


def pair(value: PairLike) -> tuple[int, int]:
  """(value, value) for an int, else the value as a tuple of two ints (PyTorch's _pair)."""
  if isinstance(value, int):
    return (value, value)
  value = tuple(int(v) for v in value)
  if len(value) != 2:
    raise ValueError(f"expected an int or a pair, got {value}")
  return value


def pad_hw(x: Array, pads: Sequence[tuple[int, int]], value=0) -> Array:
  """Pad (or, with negative widths, crop) the two spatial axes of an NHWC array."""
  return lax.pad(x, jnp.asarray(value, x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))


def out_hw(in_hw: Sequence[int], window: Sequence[int], strides: Sequence[int], pads: Sequence[tuple[int, int]],
           dilation: Sequence[int] = (1, 1)) -> tuple[int, int]:
  """Output height and width of a window sliding over an in_hw map padded by pads (floor mode)."""
  return tuple((size + lo + hi - (k - 1) * d - 1) // s + 1
               for size, k, s, (lo, hi), d in zip(in_hw, window, strides, pads, dilation))


def taps(x_padded: Array, window: Sequence[int], out: Sequence[int], strides: Sequence[int],
         dilation: Sequence[int] = (1, 1)) -> list[Array]:
  """For each tap (i, j) of the window, row by row: the (n, out_h, out_w, c) slice of an already padded map that
  the tap sees at every output position."""
  (sh, sw), (dh, dw) = strides, dilation
  n, _, _, c = x_padded.shape
  return [lax.slice(x_padded, (0, i * dh, j * dw, 0),
                    (n, i * dh + (out[0] - 1) * sh + 1, j * dw + (out[1] - 1) * sw + 1, c), (1, sh, sw, 1))
          for i in range(window[0]) for j in range(window[1])]


def fold(tap_values: Sequence[Array], window: Sequence[int], in_hw: Sequence[int], strides: Sequence[int],
         pads: Sequence[tuple[int, int]], dilation: Sequence[int] = (1, 1)) -> Array:
  """The adjoint of pad_hw(x, pads) followed by `taps`: each tap's (n, out_h, out_w, c) values added back where
  that tap read, as an (n, in_h, in_w, c) array (what fell on the padding is dropped)."""
  (sh, sw), (dh, dw) = strides, dilation
  padded_h, padded_w = (size + lo + hi for size, (lo, hi) in zip(in_hw, pads))
  total = 0
  for index, values in enumerate(tap_values):
    top, left = (index // window[1]) * dh, (index % window[1]) * dw
    _, out_h, out_w, _ = values.shape
    total = total + lax.pad(values, jnp.zeros((), values.dtype),
                            ((0, 0, 0), (top, padded_h - top - (out_h - 1) * sh - 1, sh - 1),
                             (left, padded_w - left - (out_w - 1) * sw - 1, sw - 1), (0, 0, 0)))
  return pad_hw(total, tuple((-lo, -hi) for lo, hi in pads))
