"""A stride-1 convolution as one GEMM per kernel tap, over the rectangle of output pixels where that tap reads the
input rather than its padding.

A dilated convolution on a map not much larger than its rate reads padding with most of its taps: torchvision's
ASPP branches at rates 12 and 24 on a 28x28 map (DeepLabV3 at 224x224) do 51% and 18% of a dense 3x3's
multiply-adds on real pixels. Summing, per tap, x[rectangle] @ kernel[tap] into the output costs those only, where
the direct and Winograd kernels pay for every tap at every pixel (fcnjax.ops.conv's "regions" form). The input
gradient puts dy[rectangle] @ kernel[tap]^T back where the tap read; the weight gradient of a tap is
x[rectangle]^T @ dy[rectangle]. Same values as lax's convolution up to float32 summation order.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from fcnjax.ops import windows

Array = jax.Array


class TapRegion(NamedTuple):
  tap: tuple[int, int]              # (row, column) of the kernel tap
  out_start: tuple[int, int]        # first output (row, column) where the tap reads the input
  size: tuple[int, int]             # rows and columns of the rectangle
  in_start: tuple[int, int]         # the input (row, column) the tap reads at out_start


def _live_interval(size: int, out: int, tap: int, pad_lo: int, dilation: int) -> tuple[int, int]:
  """[first, end) of the output positions where a stride-1 tap reads one of the axis' `size` input positions."""
  offset = tap * dilation - pad_lo  # the input position the tap reads at output position 0
  return max(0, -offset), min(out, size - offset)


def tap_regions(in_hw: Sequence[int], kernel_hw: Sequence[int], pads: Sequence[tuple[int, int]],
                dilation: Sequence[int]) -> list[TapRegion]:
  """The taps that read any input pixel, row by row, each with its output rectangle (stride 1)."""
  out = windows.out_hw(in_hw, kernel_hw, (1, 1), pads, dilation)
  intervals = [[_live_interval(in_hw[axis], out[axis], tap, pads[axis][0], dilation[axis])
                for tap in range(kernel_hw[axis])] for axis in range(2)]
  regions = []
  for i, (top, bottom) in enumerate(intervals[0]):
    for j, (left, right) in enumerate(intervals[1]):
      if bottom > top and right > left:
        regions.append(TapRegion((i, j), (top, left), (bottom - top, right - left),
                                 (top + i * dilation[0] - pads[0][0], left + j * dilation[1] - pads[1][0])))
  return regions


def live_share(in_hw, kernel_hw, pads, dilation) -> float:
  """The share of a dense convolution's (tap, output pixel) pairs that read the input: its useful work."""
  out = windows.out_hw(in_hw, kernel_hw, (1, 1), pads, dilation)
  live = sum(r.size[0] * r.size[1] for r in tap_regions(in_hw, kernel_hw, pads, dilation))
  return live / (kernel_hw[0] * kernel_hw[1] * out[0] * out[1])


def _rectangle(a: Array, start: Sequence[int], size: Sequence[int]) -> Array:
  n, _, _, c = a.shape
  return lax.slice(a, (0, start[0], start[1], 0), (n, start[0] + size[0], start[1] + size[1], c))


def _placed(part: Array, start: Sequence[int], hw: Sequence[int]) -> Array:
  """`part` zero-padded to an (n, *hw, c) map with its corner at `start`."""
  (top, left), (rows, cols) = start, part.shape[1:3]
  return windows.pad_hw(part, ((top, hw[0] - top - rows), (left, hw[1] - left - cols)))


def _sum(parts: list[Array], shape, dtype) -> Array:
  return sum(parts[1:], parts[0]) if parts else jnp.zeros(shape, dtype)


def conv(x: Array, kernel: Array, pads, dilation, precision=None) -> Array:
  """The stride-1 convolution, NHWC input and HWIO kernel."""
  n, cout = x.shape[0], kernel.shape[3]
  out = windows.out_hw(x.shape[1:3], kernel.shape[:2], (1, 1), pads, dilation)
  parts = [_placed(lax.dot_general(_rectangle(x, r.in_start, r.size), kernel[r.tap],
                                   (((3,), (0,)), ((), ())), precision=precision), r.out_start, out)
           for r in tap_regions(x.shape[1:3], kernel.shape[:2], pads, dilation)]
  return _sum(parts, (n, *out, cout), x.dtype)


def input_grad(dy: Array, kernel: Array, x_shape, pads, dilation, precision=None) -> Array:
  """d(loss)/d(x): each tap's dy[rectangle] @ kernel[tap]^T added where the tap read."""
  parts = [_placed(lax.dot_general(_rectangle(dy, r.out_start, r.size), kernel[r.tap],
                                   (((3,), (1,)), ((), ())), precision=precision), r.in_start, x_shape[1:3])
           for r in tap_regions(x_shape[1:3], kernel.shape[:2], pads, dilation)]
  return _sum(parts, x_shape, dy.dtype)


def weight_grad(x: Array, dy: Array, kernel_shape, pads, dilation, precision=None) -> Array:
  """d(loss)/d(kernel): per tap, x[rectangle]^T @ dy[rectangle] over the batch and the rectangle's pixels (zero for
  a tap that reads only padding)."""
  kh, kw, cin, cout = kernel_shape
  grads = {r.tap: lax.dot_general(_rectangle(x, r.in_start, r.size), _rectangle(dy, r.out_start, r.size),
                                  (((0, 1, 2), (0, 1, 2)), ((), ())), precision=precision)
           for r in tap_regions(x.shape[1:3], (kh, kw), pads, dilation)}
  zeros = jnp.zeros((cin, cout), jnp.result_type(x.dtype, dy.dtype))
  return jnp.stack([grads.get((i, j), zeros) for i in range(kh) for j in range(kw)]).reshape(kernel_shape)
