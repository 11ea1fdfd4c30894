"""torch.nn.ConvTranspose2d on NHWC, and FCN's bilinear initialisation of its kernel (tests/test_layers.py)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fcnjax.ops.params import ShapeCheckedParams
from fcnjax.ops.windows import NHWC_HWIO, PairLike, pair

Array = jax.Array


def conv_transpose(x: Array, kernel: Array, *, stride: PairLike = 1, padding: PairLike = 0,
                   output_padding: PairLike = 0, dilation: PairLike = 1, groups: int = 1,
                   precision: Any = None) -> Array:
  """torch.nn.functional.conv_transpose2d on NHWC input.

  `kernel` is torch's weight with its axes moved to (kh, kw, in, out/groups). The output size is
  (in - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1, as in PyTorch.

  A transposed convolution is the gradient of a convolution: dilate the input by `stride` (zeros between pixels),
  pad by dilation*(k-1) - padding (plus output_padding on the far side), and correlate with the spatially flipped
  kernel whose in/out axes are swapped within each group.
  """
  stride, padding, output_padding, dilation = map(pair, (stride, padding, output_padding, dilation))
  kh, kw, in_ch, out_per_group = kernel.shape
  if x.shape[-1] != in_ch:
    raise ValueError(f"conv_transpose: input has {x.shape[-1]} channels, kernel expects {in_ch}")
  if in_ch % groups:
    raise ValueError(f"conv_transpose: {in_ch} input channels not divisible by groups={groups}")
  for op, s, d in zip(output_padding, stride, dilation):
    if op >= max(s, d):
      raise ValueError(f"output_padding {output_padding} must be smaller than stride {stride} or dilation {dilation}")
  if (kh, kw) == stride and dilation == (1, 1):
    return _conv_transpose_disjoint(x, kernel, padding=padding, output_padding=output_padding, groups=groups,
                                    precision=precision)
  # (kh, kw, in, out/g) -> (kh, kw, in/g, out): regroup so that lax's feature_group_count sees forward-conv layout.
  rhs = kernel.reshape(kh, kw, groups, in_ch // groups, out_per_group)
  rhs = jnp.transpose(rhs, (0, 1, 3, 2, 4)).reshape(kh, kw, in_ch // groups, groups * out_per_group)
  rhs = rhs[::-1, ::-1]
  pads, crops = [], []
  for k, p, op, d in zip((kh, kw), padding, output_padding, dilation):
    lo = d * (k - 1) - p
    hi = lo + op
    # Padding larger than the kernel's reach gives negative pads: pad by zero, then crop the rest away.
    pads.append((max(lo, 0), max(hi, 0)))
    crops.append((max(-lo, 0), max(-hi, 0)))
  y = jax.lax.conv_general_dilated(
      x, rhs.astype(x.dtype), window_strides=(1, 1), padding=pads, lhs_dilation=stride, rhs_dilation=dilation,
      dimension_numbers=NHWC_HWIO, feature_group_count=groups, precision=precision)
  if any(c for pair in crops for c in pair):
    (t, b), (l, r) = crops
    y = y[:, t:y.shape[1] - b, l:y.shape[2] - r, :]
  return y


def _conv_transpose_disjoint(x: Array, kernel: Array, *, padding: tuple[int, int],
                             output_padding: tuple[int, int], groups: int, precision: Any) -> Array:
  """conv_transpose where the kernel equals the stride (U-Net's 2x2 up-convolution): the windows of neighbouring
  input pixels do not overlap, so output pixel (s*h + i, s*w + j) is x[h, w] @ kernel[i, j] alone.

  One matmul and a pixel shuffle instead of a convolution over a stride-dilated input. Same values, but the
  gradients are matmuls too: XLA:CPU emits the dilated convolution's weight gradient as plain loops, which makes
  U-Net's four up-convolutions about half of its CPU train step (docs/performance.md).
  """
  n, h, w, in_ch = x.shape
  kh, kw, _, out_per_group = kernel.shape
  x = x.reshape(n, h, w, groups, in_ch // groups)
  kernel = kernel.astype(x.dtype).reshape(kh, kw, groups, in_ch // groups, out_per_group)
  z = jnp.einsum("nhwgc,ijgcd->nhiwjgd", x, kernel, precision=precision)
  y = z.reshape(n, h * kh, w * kw, groups * out_per_group)
  # PyTorch's padding crops the full output on both sides; output_padding extends the far side (with zeros here,
  # since no window reaches past h * k). lax.pad takes both as one (possibly negative) padding.
  (p_h, p_w), (op_h, op_w) = padding, output_padding
  if p_h == p_w == op_h == op_w == 0:
    return y
  return jax.lax.pad(y, jnp.zeros((), y.dtype), ((0, 0, 0), (-p_h, op_h - p_h, 0), (-p_w, op_w - p_w, 0), (0, 0, 0)))


def bilinear_upsample_init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
  """FCN's bilinear-interpolation kernel for a (kh, kw, channels, channels) transposed convolution.

  Channel i maps to channel i only (the kernel is diagonal in channels), as in FCN's surgery.interp and
  get_upsampling_weight: factor = (k + 1) // 2, centred at factor - 1 (odd k) or factor - 0.5 (even k).
  """
  del key
  kh, kw, in_ch, out_ch = shape
  if in_ch != out_ch:
    raise ValueError(f"bilinear_upsample_init needs as many input as output channels, got shape {tuple(shape)}")
  weights = np.outer(bilinear_filter_1d(kh), bilinear_filter_1d(kw))
  kernel = np.zeros((kh, kw, in_ch, out_ch), dtype=np.float32)
  kernel[:, :, np.arange(in_ch), np.arange(out_ch)] = weights[:, :, None]
  return jnp.asarray(kernel, dtype=dtype)


def bilinear_filter_1d(size: int) -> np.ndarray:
  factor = (size + 1) // 2
  center = factor - 1 if size % 2 == 1 else factor - 0.5
  return (1 - np.abs(np.arange(size) - center) / factor).astype(np.float32)


class ConvTranspose(ShapeCheckedParams, nn.Module):
  """nn.ConvTranspose2d with PyTorch's semantics; the kernel is torch's weight transposed to (kh, kw, in, out/g)."""
  features: int
  kernel_size: PairLike
  strides: PairLike = 1
  padding: PairLike = 0
  output_padding: PairLike = 0
  dilation: PairLike = 1
  groups: int = 1
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kh, kw = pair(self.kernel_size)
    in_ch = x.shape[-1]
    if self.features % self.groups:
      raise ValueError(f"features={self.features} not divisible by groups={self.groups}")
    kernel = self.param("kernel", self.kernel_init, (kh, kw, in_ch, self.features // self.groups), self.param_dtype)
    dtype = self.dtype or x.dtype
    y = conv_transpose(x.astype(dtype), kernel.astype(dtype), stride=self.strides, padding=self.padding,
                       output_padding=self.output_padding, dilation=self.dilation, groups=self.groups)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      y = y + bias.astype(dtype)
    return y
