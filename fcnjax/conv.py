"""Convolution with the same forward pass and input gradient as lax.conv_general_dilated, and a faster weight
gradient on CPU.

XLA:CPU computes a convolution's weight gradient as a convolution whose "kernel" is the whole output gradient; on
this project's 2-core Xeon that is 3-9x the time of the forward convolution (docs/performance.md) and most of a CPU
train step. The weight gradient is one matrix product, patches(x)^T @ dy, but materialising every patch of a large
image (9x the input for a 3x3 kernel) costs more than it saves. So the product is accumulated over strips of output
rows: each strip's patches fit in cache and feed one GEMM, which XLA:CPU runs near its forward-convolution speed.
Other backends (cuDNN) keep XLA's own gradient: lax.platform_dependent picks per platform when compiling.

Same values as XLA's gradient up to float32 summation order (tests/test_conv.py checks both against PyTorch).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
NHWC = ("NHWC", "HWIO", "NHWC")
# Rows of patches per GEMM: (strip rows x output width x batch) ~ this. A 3x3, 64-channel strip is then ~2.4 MB,
# within one core's L2; 1024-8192 measured within 10% of each other, 50k+ (whole images) 2x slower.
STRIP_GEMM_ROWS = 4096


def conv_general_dilated(lhs: Array, rhs: Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision: Any = None, preferred_element_type: Any = None) -> Array:
  """lax.conv_general_dilated's signature (what flax's nn.Conv calls); 2-D NHWC/HWIO convolutions without input
  dilation or groups take the strip-wise weight gradient, anything else goes to lax unchanged."""
  plain = (lhs.ndim == 4 and feature_group_count == 1 and batch_group_count == 1 and preferred_element_type is None
           and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
           == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC))
  if not plain:
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                    feature_group_count, batch_group_count, precision, preferred_element_type)
  strides = tuple(int(s) for s in window_strides)
  dilation = tuple(int(d) for d in (rhs_dilation or (1, 1)))
  if isinstance(padding, str):
    window = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], dilation)]
    padding = lax.padtype_to_pads(lhs.shape[1:3], window, strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _conv(lhs, rhs, strides, pads, dilation, precision)


# Flax's convolution with this weight gradient: same parameters and names as nn.Conv.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


def _lax_conv(x, kernel, strides, pads, dilation, precision):
  return lax.conv_general_dilated(x, kernel, strides, pads, rhs_dilation=dilation, dimension_numbers=NHWC,
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, kernel, strides, pads, dilation, precision):
  return _lax_conv(x, kernel, strides, pads, dilation, precision)


def _conv_fwd(x, kernel, strides, pads, dilation, precision):
  return _lax_conv(x, kernel, strides, pads, dilation, precision), (x, kernel)


def _conv_bwd(strides, pads, dilation, precision, residuals, dy):
  x, kernel = residuals
  # The input gradient is a forward convolution of dy with the flipped kernel, which XLA:CPU runs well: keep it.
  dx = jax.vjp(lambda x: _lax_conv(x, kernel, strides, pads, dilation, precision), x)[1](dy)[0]

  def xla_weight_grad(x, dy):
    return jax.vjp(lambda k: _lax_conv(x, k, strides, pads, dilation, precision), kernel)[1](dy)[0]

  def strip_weight_grad(x, dy):
    return weight_grad_by_strips(x, dy, kernel.shape, strides, pads, dilation, precision).astype(kernel.dtype)

  dk = lax.platform_dependent(x, dy, cpu=strip_weight_grad, default=xla_weight_grad)
  return dx, dk


_conv.defvjp(_conv_fwd, _conv_bwd)


def strip_rows(out_h: int, target: int) -> int:
  """Output rows per strip: at most `target`, dividing out_h when that costs at most half the strip (a remainder
  strip is one more GEMM shape to compile)."""
  target = max(1, min(out_h, target))
  divisor = max(d for d in range(1, target + 1) if out_h % d == 0)
  return divisor if 2 * divisor >= target else target


def weight_grad_by_strips(x: Array, dy: Array, kernel_shape: Sequence[int], strides: Sequence[int],
                          pads: Sequence[tuple[int, int]], dilation: Sequence[int], precision: Any = None,
                          gemm_rows: int = STRIP_GEMM_ROWS) -> Array:
  """d(loss)/d(kernel) of a NHWC/HWIO convolution, in float32: sum over strips of output rows of
  patches(strip)^T @ dy(strip), the patches gathered per strip (kh * kw strided slices side by side)."""
  kh, kw, cin, cout = kernel_shape
  n, out_h, out_w, _ = dy.shape
  (sh, sw), (dh, dw) = strides, dilation
  x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))

  def strip_grad(x_rows, dy_rows):
    rows = dy_rows.shape[1]
    taps = [lax.slice(x_rows, (0, i * dh, j * dw, 0), (n, i * dh + (rows - 1) * sh + 1, j * dw + (out_w - 1) * sw + 1,
                                                       cin), (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]
    patches = (jnp.concatenate(taps, axis=-1) if len(taps) > 1 else taps[0]).reshape(-1, kh * kw * cin)
    return lax.dot_general(patches, dy_rows.reshape(-1, cout), (((0,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)

  def input_rows(rows):  # input rows that `rows` output rows read
    return (rows - 1) * sh + (kh - 1) * dh + 1

  rows = strip_rows(out_h, gemm_rows // max(1, n * out_w))
  num_strips, tail = divmod(out_h, rows)

  def body(total, s):
    x_rows = lax.dynamic_slice_in_dim(x, s * rows * sh, input_rows(rows), axis=1)
    dy_rows = lax.dynamic_slice_in_dim(dy, s * rows, rows, axis=1)
    return total + strip_grad(x_rows, dy_rows), None

  total = jnp.zeros((kh * kw * cin, cout), jnp.float32)
  if num_strips == 1:
    total = strip_grad(x[:, :input_rows(rows)], dy[:, :rows])
  elif num_strips > 1:
    total, _ = lax.scan(body, total, jnp.arange(num_strips))
  if tail:
    start = num_strips * rows
    total = total + strip_grad(x[:, start * sh:start * sh + input_rows(tail)], dy[:, start:])
  return total.reshape(kh, kw, cin, cout)
