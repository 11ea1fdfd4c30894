"""PyTorch-exact building blocks, NHWC.

Every function here has a parity test against PyTorch in tests/test_layers.py. Conventions follow PyTorch's
documented semantics (torch.nn.ConvTranspose2d, torch.nn.functional.interpolate, MaxPool2d(ceil_mode=True)), not
jax.image, whose resize antialiases when shrinking and rounds 'nearest' differently.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fcnjax import windows

Array = jax.Array
PairLike = int | Sequence[int]


def _pair(value: PairLike) -> tuple[int, int]:
  if isinstance(value, int):
    return (value, value)
  value = tuple(int(v) for v in value)
  if len(value) != 2:
    raise ValueError(f"expected an int or a pair, got {value}")
  return value


# --------------------------------------------------------------------------------------------------------------------
# Transposed convolution


def torch_conv_transpose_weight_to_flax(weight: np.ndarray) -> np.ndarray:
  """torch ConvTranspose2d weight (in, out/groups, kh, kw) -> our kernel layout (kh, kw, in, out/groups)."""
  return np.transpose(np.asarray(weight), (2, 3, 0, 1))


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
  stride, padding, output_padding, dilation = map(_pair, (stride, padding, output_padding, dilation))
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
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups, precision=precision)
  if any(c for pair in crops for c in pair):
    (t, b), (l, r) = crops
    y = y[:, t:y.shape[1] - b, l:y.shape[2] - r, :]
  return y


def _conv_transpose_disjoint(x: Array, kernel: Array, *, padding: tuple[int, int],
                             output_padding: tuple[int, int], groups: int, precision: Any) -> Array:
  """conv_transpose where the kernel equals the stride (U-Net's 2x2 up-convolution): the windows of neighbouring
  input pixels do not overlap, so output pixel (s*h + i, s*w + j) is x[h, w] @ kernel[i, j] alone.

  One matmul and a pixel shuffle instead of a convolution over a stride-dilated input. Same values, but the
  gradients are matmuls too: XLA:CPU emits the dilated convolution's weight gradient as plain loops, which made
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
  filt = np.outer(bilinear_filter_1d(kh), bilinear_filter_1d(kw))
  kernel = np.zeros((kh, kw, in_ch, out_ch), dtype=np.float32)
  kernel[:, :, np.arange(in_ch), np.arange(out_ch)] = filt[:, :, None]
  return jnp.asarray(kernel, dtype=dtype)


def bilinear_filter_1d(size: int) -> np.ndarray:
  factor = (size + 1) // 2
  center = factor - 1 if size % 2 == 1 else factor - 0.5
  return (1 - np.abs(np.arange(size) - center) / factor).astype(np.float32)


class ConvTranspose(nn.Module):
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
    kh, kw = _pair(self.kernel_size)
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


# --------------------------------------------------------------------------------------------------------------------
# Resizing equal to torch.nn.functional.interpolate (no antialiasing), as separable interpolation matrices.


def _source_scale(in_size: int, out_size: int, align_corners: bool) -> np.float32:
  if align_corners:
    return np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0)
  return np.float32(in_size / out_size)


def interpolation_matrix(in_size: int, out_size: int, method: str = "bilinear",
                         align_corners: bool = False) -> np.ndarray:
  """(out_size, in_size) matrix M such that resizing one axis is M @ x, with F.interpolate's index arithmetic.

  Index arithmetic is done in float32 like PyTorch's CPU kernels, so 'nearest' picks the same pixels.
  """
  scale = _source_scale(in_size, out_size, align_corners)
  dst = np.arange(out_size, dtype=np.float32)
  matrix = np.zeros((out_size, in_size), dtype=np.float32)
  rows = np.arange(out_size)
  if method == "bilinear":
    if align_corners:
      src = dst * scale
    else:
      src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = (src - i0).astype(np.float32)
    np.add.at(matrix, (rows, i0), 1 - lam)
    np.add.at(matrix, (rows, i1), lam)
  elif method in ("nearest", "nearest-exact"):
    if align_corners:
      raise ValueError("align_corners only applies to linear modes, as in PyTorch")
    offset = np.float32(0.5) if method == "nearest-exact" else np.float32(0)
    src = np.floor((dst + offset) * scale).astype(np.int64)
    matrix[rows, np.minimum(src, in_size - 1)] = 1
  else:
    raise ValueError(f"unknown resize method {method!r}; expected 'bilinear', 'nearest' or 'nearest-exact'")
  return matrix


def resize(x: Array, size: PairLike, method: str = "bilinear", align_corners: bool = False) -> Array:
  """F.interpolate(x, size=size, mode=method, align_corners=align_corners) for NHWC `x`."""
  out_h, out_w = _pair(size)
  _, in_h, in_w, _ = x.shape
  if (in_h, in_w) == (out_h, out_w):
    return x
  rows = jnp.asarray(interpolation_matrix(in_h, out_h, method, align_corners), dtype=x.dtype)
  cols = jnp.asarray(interpolation_matrix(in_w, out_w, method, align_corners), dtype=x.dtype)
  # HIGHEST keeps float32 exact on accelerators that would otherwise multiply in reduced precision.
  precision = jax.lax.Precision.HIGHEST
  y = jnp.einsum("oh,nhwc->nowc", rows, x, precision=precision)
  return jnp.einsum("pw,nowc->nopc", cols, y, precision=precision)


def bilinear_matrix_to_size(in_size: int, out_size: Array, canvas: int) -> Array:
  """Bilinear (align_corners=False) matrix of shape (canvas, in_size) for a traced `out_size` <= canvas.

  Rows at or beyond `out_size` are zero. Used to resize logits to each image's own original size inside a jitted
  evaluation step, where shapes must be static: the result lives in a fixed canvas and the rest is ignored.
  """
  out_size = jnp.asarray(out_size)
  scale = jnp.float32(in_size) / out_size.astype(jnp.float32)
  dst = jnp.arange(canvas, dtype=jnp.float32)
  src = jnp.maximum(scale * (dst + 0.5) - 0.5, 0.0)
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), in_size - 1)
  i1 = jnp.minimum(i0 + 1, in_size - 1)
  lam = src - i0.astype(jnp.float32)
  cols = jnp.arange(in_size)
  matrix = ((cols[None, :] == i0[:, None]) * (1 - lam)[:, None] + (cols[None, :] == i1[:, None]) * lam[:, None])
  return jnp.where((jnp.arange(canvas) < out_size)[:, None], matrix, 0.0)


def resize_bilinear_to_sizes(x: Array, sizes: Array, canvas: PairLike) -> Array:
  """Resize each image of NHWC `x` bilinearly to its own (h, w) in `sizes` (N, 2), inside a (canvas_h, canvas_w)."""
  canvas_h, canvas_w = _pair(canvas)
  _, in_h, in_w, _ = x.shape
  rows = jax.vmap(lambda s: bilinear_matrix_to_size(in_h, s, canvas_h))(sizes[:, 0])
  cols = jax.vmap(lambda s: bilinear_matrix_to_size(in_w, s, canvas_w))(sizes[:, 1])
  precision = jax.lax.Precision.HIGHEST
  y = jnp.einsum("noh,nhwc->nowc", rows.astype(x.dtype), x, precision=precision)
  return jnp.einsum("npw,nowc->nopc", cols.astype(x.dtype), y, precision=precision)


# --------------------------------------------------------------------------------------------------------------------
# Batch normalisation


class BatchNorm(nn.Module):
  """nn.BatchNorm2d over the last (channel) axis, with PyTorch's statistics.

  Training normalises with the batch's biased variance and updates the running variance with the unbiased one
  (n / (n - 1)), as PyTorch does; flax.linen.BatchNorm stores the biased one, which drifts from PyTorch on small
  maps. `momentum` is PyTorch's (weight of the new statistic). Statistics are computed in float32 whatever the
  compute dtype. Variables have flax's names (params scale/bias, batch_stats mean/var), so converted torchvision
  weights load unchanged. Under jit with a sharded batch the means run over the global batch (synchronised BN).
  """
  use_running_average: bool
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    running_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
    scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      count = math.prod(x.shape[:-1])
      mean = jnp.mean(x32, axis=axes)
      var = jnp.mean(jnp.square(x32 - mean), axis=axes)  # two passes, as PyTorch: no E[x^2] - E[x]^2 cancellation
      if not self.is_initializing():
        unbiased = var * (count / max(count - 1, 1))
        running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
        running_var.value = (1 - self.momentum) * running_var.value + self.momentum * unbiased
    multiplier = scale.astype(jnp.float32) * jax.lax.rsqrt(var + self.epsilon)
    y = (x32 - mean) * multiplier + bias.astype(jnp.float32)
    return y.astype(self.dtype or x.dtype)


# --------------------------------------------------------------------------------------------------------------------
# Pooling, cropping and padding for skip connections


def max_pool(x: Array, window: PairLike, stride: PairLike | None = None, padding: PairLike = 0,
             ceil_mode: bool = False) -> Array:
  """nn.MaxPool2d(window, stride, padding, ceil_mode) on NHWC input (padding counts as -inf, as in PyTorch)."""
  window = _pair(window)
  stride = _pair(stride if stride is not None else window)
  padding = _pair(padding)
  pads = []
  for size, k, s, p in zip(x.shape[1:3], window, stride, padding):
    span = size + 2 * p - k
    out = (-(-span // s) if ceil_mode else span // s) + 1
    # PyTorch drops a last window that would start inside the right padding.
    if ceil_mode and (out - 1) * s >= size + p:
      out -= 1
    pads.append((p, max((out - 1) * s + k - size - p, 0)))
  return _max_pool(x, window, stride, tuple(pads))


# Written as a maximum over the window's taps, with its own gradient: JAX's gradient of reduce_window (value and
# index pairs through select_and_gather_add) took 74 ms for a 2x2 pool of a 224x224x64 batch of two on XLA:CPU,
# this one 3 ms, with the same values.
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, pads):
  return _max_pool_fwd(x, window, strides, pads)[0]


def _pool_taps(x, window, strides, pads):
  out = windows.out_hw(x.shape[1:3], window, strides, pads)
  return windows.taps(windows.pad_hw(x, pads, -jnp.inf), window, out, strides)


def _max_pool_fwd(x, window, strides, pads):
  y = functools.reduce(jnp.maximum, _pool_taps(x, window, strides, pads))
  return y, (x, y)


def _max_pool_bwd(window, strides, pads, residuals, dy):
  x, y = residuals
  taken, shares = jnp.zeros(y.shape, bool), []
  for value in _pool_taps(x, window, strides, pads):
    # As PyTorch: the whole gradient goes to the first maximum in window order (a NaN counts as a maximum).
    hit = ((value == y) | jnp.isnan(value)) & ~taken
    taken = taken | hit
    shares.append(jnp.where(hit, dy, 0))
  return (windows.fold(shares, window, x.shape[1:3], strides, pads),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def crop(x: Array, offset: PairLike, size: PairLike) -> Array:
  """x[:, oy:oy+h, ox:ox+w] with a clear error when the window does not fit."""
  (oy, ox), (h, w) = _pair(offset), _pair(size)
  if oy < 0 or ox < 0 or oy + h > x.shape[1] or ox + w > x.shape[2]:
    raise ValueError(f"crop of {h}x{w} at offset ({oy}, {ox}) does not fit in a {x.shape[1]}x{x.shape[2]} map")
  return x[:, oy:oy + h, ox:ox + w, :]


def center_crop(x: Array, size: PairLike) -> Array:
  h, w = _pair(size)
  return crop(x, ((x.shape[1] - h) // 2, (x.shape[2] - w) // 2), (h, w))


def pad_or_crop_to(x: Array, size: PairLike) -> Array:
  """Zero-pad (or centre-crop) the spatial axes to `size`, the extra pixel going to the bottom/right.

  This is how U-Net implementations align an up-sampled map with its skip connection at odd sizes.
  """
  h, w = _pair(size)
  dh, dw = h - x.shape[1], w - x.shape[2]
  if dh < 0 or dw < 0:
    x = center_crop(x, (min(h, x.shape[1]), min(w, x.shape[2])))
    dh, dw = h - x.shape[1], w - x.shape[2]
  if dh or dw:
    x = jnp.pad(x, ((0, 0), (dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2), (0, 0)))
  return x


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
  return math.floor((size + 2 * padding - dilation * (kernel - 1) - 1) / stride) + 1
