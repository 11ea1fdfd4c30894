"""Depthwise convolution (one input channel per group: MobileNetV3's inverted residuals, smp's separable convs) on CPU
as a sum over the window's taps.

Each tap (i, j) of a k x k window reads a strided slice of the padded input (fcnjax.ops.windows.taps); the output is
the sum over taps of that slice times the tap's per-channel weights. Channels are the last, contiguous axis, so
every term is an element-wise multiply-add that XLA fuses into one vectorised loop. Its gradients are written the
same way: the input gradient puts dy times each tap's weights back where the tap read (windows.fold), the weight
gradient of a tap is its slice times dy summed over batch and positions. XLA:CPU runs these sums 2-14x slower than
PyTorch runs the layers (the weight gradient is a column reduction), so in float32, where fcnjax's C++ kernels are
built, all three are theirs (fcnjax.ops.native.depthwise_forward, depthwise_input_grad, depthwise_weight_grad;
docs/performance.md has the figures per layer); the sums by taps remain for other dtypes and without the kernels.

Why: XLA:CPU lowers a grouped convolution with as many groups as channels to a generic loop that runs these layers
at a small fraction of PyTorch's speed, and its gradients slower still (benchmarks/depthwise_layers.py prints each
part per layer against PyTorch). Every other backend keeps lax's grouped convolution (lax.platform_dependent),
and so does fcnjax.ops.portable_forms() (what exported graphs hold).

Values equal lax's up to float32 summation order; half-precision inputs are summed in float32.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from fcnjax.ops import native, windows

Array = jax.Array


def is_depthwise(lhs_shape: Sequence[int], rhs_shape: Sequence[int], feature_group_count: int) -> bool:
  """An NHWC/HWIO convolution with one group per input channel and one output channel per group."""
  return (len(lhs_shape) == 4 and feature_group_count > 1 and rhs_shape[2] == 1
          and rhs_shape[3] == feature_group_count == lhs_shape[3])


def _accumulation_dtype(dtype) -> jnp.dtype:
  return jnp.promote_types(dtype, jnp.float32)


def _tap_weights(kernel: Array, dtype) -> Array:
  """(kh * kw, c): each tap's per-channel weights, row-major over the window as windows.taps orders the taps."""
  kh, kw, _, c = kernel.shape
  return kernel.reshape(kh * kw, c).astype(dtype)


def depthwise_by_taps(x: Array, kernel: Array, strides, pads, dilation) -> Array:
  """sum over taps t of taps(x)[t] * kernel[t]: the depthwise convolution of x (n, h, w, c) with kernel
  (kh, kw, 1, c), padded by pads (per spatial axis, (low, high))."""
  window = kernel.shape[:2]
  out = windows.out_hw(x.shape[1:3], window, strides, pads, dilation)
  accumulate = _accumulation_dtype(x.dtype)
  weights = _tap_weights(kernel, accumulate)
  total = None
  for tap, values in enumerate(windows.taps(windows.pad_hw(x, pads), window, out, strides, dilation)):
    term = values.astype(accumulate) * weights[tap]
    total = term if total is None else total + term
  return total.astype(x.dtype)


def input_grad_by_taps(x: Array, kernel: Array, dy: Array, strides, pads, dilation) -> Array:
  """d/dx of depthwise_by_taps for the output gradient dy."""
  window = kernel.shape[:2]
  accumulate = _accumulation_dtype(x.dtype)
  weights = _tap_weights(kernel, accumulate)
  dy_wide = dy.astype(accumulate)
  dx = windows.fold([dy_wide * weights[tap] for tap in range(weights.shape[0])], window, x.shape[1:3], strides,
                    pads, dilation)
  return dx.astype(x.dtype)


def weight_grad_by_taps(x: Array, kernel: Array, dy: Array, strides, pads, dilation) -> Array:
  """d/dkernel of depthwise_by_taps for the output gradient dy."""
  accumulate = _accumulation_dtype(x.dtype)
  dy_wide = dy.astype(accumulate)
  tap_values = windows.taps(windows.pad_hw(x, pads), kernel.shape[:2], dy.shape[1:3], strides, dilation)
  dk = jnp.stack([jnp.sum(values.astype(accumulate) * dy_wide, axis=(0, 1, 2)) for values in tap_values])
  return dk.reshape(kernel.shape).astype(kernel.dtype)


def _native_takes(*operands: Array, pads=((0, 0), (0, 0))) -> bool:
  """Whether fcnjax's C++ depthwise kernels take these operands: float32, no negative padding, kernels built and
  enabled where this is traced."""
  return (all(a.dtype == jnp.float32 for a in operands) and min(min(p) for p in pads) >= 0
          and native.available())


def forward_on_cpu(x: Array, kernel: Array, strides, pads, dilation) -> Array:
  """The depthwise convolution by fcnjax's C++ kernel where it takes the operands, else by taps."""
  if _native_takes(x, kernel, pads=pads):
    return native.depthwise_forward(x, kernel, strides, pads, dilation)
  return depthwise_by_taps(x, kernel, strides, pads, dilation)


def input_grad_on_cpu(x: Array, kernel: Array, dy: Array, strides, pads, dilation) -> Array:
  """d/dx by fcnjax's C++ kernel where it takes the operands, else by taps."""
  if _native_takes(x, kernel, dy, pads=pads):
    return native.depthwise_input_grad(dy, kernel, x.shape, strides, pads, dilation)
  return input_grad_by_taps(x, kernel, dy, strides, pads, dilation)


def weight_grad_on_cpu(x: Array, kernel: Array, dy: Array, strides, pads, dilation) -> Array:
  """d/dkernel by fcnjax's C++ kernel where it takes the operands (float32, kernels built and enabled when
  traced), else by taps."""
  if _native_takes(x, kernel, dy, pads=pads):
    return native.depthwise_weight_grad(x, dy, kernel.shape, strides, pads, dilation)
  return weight_grad_by_taps(x, kernel, dy, strides, pads, dilation)


def _lax_depthwise(x, kernel, strides, pads, dilation, precision):
  return lax.conv_general_dilated(x, kernel, strides, pads, rhs_dilation=dilation, dimension_numbers=windows.NHWC_HWIO,
                                  feature_group_count=x.shape[3], precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def depthwise_conv(x: Array, kernel: Array, strides: tuple[int, int], pads: tuple[tuple[int, int], ...],
                   dilation: tuple[int, int], precision=None) -> Array:
  """The depthwise convolution by taps when compiling for CPU, lax's grouped convolution elsewhere."""
  return lax.platform_dependent(
      x, kernel, cpu=lambda x, k: forward_on_cpu(x, k, strides, pads, dilation),
      default=lambda x, k: _lax_depthwise(x, k, strides, pads, dilation, precision))


def _depthwise_fwd(x, kernel, strides, pads, dilation, precision):
  return depthwise_conv(x, kernel, strides, pads, dilation, precision), (x, kernel)


def _depthwise_bwd(strides, pads, dilation, precision, residuals, dy):
  x, kernel = residuals

  def lax_grads(x, kernel, dy):
    return jax.vjp(lambda x, k: _lax_depthwise(x, k, strides, pads, dilation, precision), x, kernel)[1](dy)

  def cpu_grads(x, kernel, dy):
    return (input_grad_on_cpu(x, kernel, dy, strides, pads, dilation),
            weight_grad_on_cpu(x, kernel, dy, strides, pads, dilation))

  return lax.platform_dependent(x, kernel, dy, cpu=cpu_grads, default=lax_grads)


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)
