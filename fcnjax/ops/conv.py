"""Convolution with lax.conv_general_dilated's signature and values; on CPU, each part in its fastest form.

`Conv` is flax's nn.Conv with this module's `conv_general_dilated`. A 2-D NHWC/HWIO convolution without input
dilation or groups goes through one custom VJP (`_conv`); for each of its parts (forward pass, input gradient,
weight gradient) `cpu_forms` names the form that computes it when compiling for CPU:
- "native" (fcnjax.ops.native's direct C++ kernels, `by_native`): stride-1 float32 convolutions with output
  channels in 16s and a kernel larger than 1x1 that are not a GEMM case (every 3x3 layer of the models), for all
  three parts (the input gradient as the native forward convolution of dy with the flipped kernel);
- "winograd" (`native.supports_winograd`): of those, a forward pass or input gradient that is a 3x3 convolution
  from 32 or more input channels in 16s, by F(2x2, 3x3): 1.5-2.2x the direct kernel on 64-2048-channel layers
  (2-core EPYC, AVX2);
- "gemm" (`by_gemm`): forward pass and input gradient of 1x1 kernels and of convolutions with no more output
  pixels than output channels: patches @ kernel, and dy @ kernel^T put back by col2im (reading the kernel in
  place, no flipped copy);
- "regions" (fcnjax.ops.tap_regions): a stride-1 convolution whose taps read padding at most of its pixels (a
  share of live (tap, pixel) pairs up to MAX_TAP_REGIONS_LIVE_SHARE: DeepLabV3's ASPP branches), one GEMM per tap
  over the output pixels where it reads the input; for all three parts, but the native weight gradient is kept;
- "strips" (`weight_grad_by_strips`): the weight gradient of the convolutions the native kernels do not take
  (strided, 1x1, few output pixels, or no compiler) with more than MAX_XLA_GRAD_OUT_CHANNELS output channels:
  patches(x)^T @ dy summed over strips of output rows, each strip's patch matrix small enough to stay in cache and
  feed one GEMM;
- "xla": everything else, lax's own.
Depthwise convolutions (one input channel per group) take fcnjax.ops.depthwise's sum over taps on CPU, for all three
parts; other grouped convolutions go to lax.
Every other backend (cuDNN) runs lax's own: lax.platform_dependent picks per platform when compiling.
Inside `fcnjax.ops.portable_forms()` every convolution is lax's own on every platform (what exported graphs hold).

Why: XLA:CPU runs 3x3 convolutions at 60-90% of PyTorch's speed, computes their weight gradient as a convolution
whose "kernel" is the whole output gradient (3-9x the forward's time), and runs convolutions with few output pixels
and many channels (fc6/fc7, 1x1 layers, a 14x14 bottleneck) at a fifth to two thirds of its GEMM speed
(benchmarks/conv_layers.py prints each part, XLA's against the form chosen here; README.md here has the figures).

Same values as lax up to float32 summation order (tests/test_conv.py checks every form against PyTorch).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from fcnjax.ops import depthwise, native, portable, tap_regions, windows
from fcnjax.ops.params import ShapeCheckedParams

Array = jax.Array
NHWC_HWIO = windows.NHWC_HWIO
# Rows of patches per GEMM: (strip rows x output width x batch) ~ STRIP_PATCH_BYTES / (bytes of one patch row),
# within [MIN, MAX]_STRIP_GEMM_ROWS. A 3x3, 64-channel strip is then ~1800 rows (4 MiB); a 512-channel one 512 rows.
# Against a fixed 4096 rows this is 1.1-1.4x faster from 112x112x128 to 28x28x512; below ~512 rows 14x14x1024
# slows down (benchmarks/conv_layers.py).
STRIP_PATCH_BYTES = 4 << 20
MIN_STRIP_GEMM_ROWS = 512
MAX_STRIP_GEMM_ROWS = 4096
# Kernels with at most this many output channels keep XLA's weight gradient: the strips' GEMM is then too narrow
# (16 columns), and XLA's own is 1.4-2x faster on the quickstart U-Net's 64x64, 16-channel layers
# (benchmarks/conv_layers.py, batch 16).
MAX_XLA_GRAD_OUT_CHANNELS = 16
# Up to this many output channels the strips' GEMM takes dy as its first operand (see weight_grad_by_strips).
MAX_DY_FIRST_OUT_CHANNELS = 128
# AVX-512 builds (16-float vectors): the native input gradient takes at most this many input channels (its output
# channels). It is a forward convolution with the kernel flipped and transposed in C++ each step, ~3-6 ns per kernel
# element; above 512 channels at 28x28 that copy makes it slower than XLA's (3x3x2048x512: 266 vs 193 ms on a
# 2-core Xeon), up to 512 it runs at 0.8-1.4x XLA's speed.
# AVX2 builds (8-float vectors): no limit; 3x3x2048x512 at 28x28 takes 175 ms against XLA's 234 (2-core EPYC).
# Figures from benchmarks/conv_layers.py, batch 2.
MAX_NATIVE_INPUT_GRAD_CHANNELS = 512
# A stride-1 convolution whose taps read the input at no more than this share of its (tap, output pixel) pairs runs
# as one GEMM per tap over the pixels where that tap reads the input. 3x3 2048 -> 256 at batch 2, ms, against the
# Winograd forward pass and XLA's input gradient: 28x28 at rate 12 (share 0.51) 101 -> 49 and 73 -> 46, rate 24
# (0.18) 102 -> 13 and 82 -> 15; 65x65 at rate 24 (0.57) 384 -> 256 and 427 -> 281, rate 36 (0.40) 213 -> 181 and
# 550 -> 205. At 0.66 (1024 -> 256 at rate 8 on 28x28) either is ahead from run to run. The weight gradient takes
# it where the native kernels do not (against the strips: 126 -> 97 at rate 12, 137 -> 29 at rate 24); the native
# one skips the padding itself and is as fast or faster (40 ms at rate 12, 19 at rate 24). 2-core Xeon (AVX-512),
# benchmarks/conv_layers.py's dilated rows.
MAX_TAP_REGIONS_LIVE_SHARE = 0.6


def max_native_input_grad_channels() -> int | None:
  """The most input channels whose input gradient the native kernels compute in this build (None: no limit)."""
  return MAX_NATIVE_INPUT_GRAD_CHANNELS if native.vector_lanes() == 16 else None


def strip_gemm_rows(kernel_shape: Sequence[int], itemsize: int) -> int:
  """Patch rows per GEMM for a kernel (kh, kw, cin, cout) and the activations' bytes per element."""
  kh, kw, cin, _ = kernel_shape
  return min(MAX_STRIP_GEMM_ROWS, max(MIN_STRIP_GEMM_ROWS, STRIP_PATCH_BYTES // (kh * kw * cin * itemsize)))


def conv_general_dilated(lhs: Array, rhs: Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision: Any = None, preferred_element_type: Any = None) -> Array:
  """lax.conv_general_dilated's signature (what flax's nn.Conv calls); 2-D NHWC/HWIO convolutions without input
  dilation take the CPU forms above, or fcnjax.ops.depthwise's when they are depthwise; anything else goes to lax
  unchanged."""
  nhwc_2d = (lhs.ndim == 4 and batch_group_count == 1 and preferred_element_type is None
             and all(d == 1 for d in (lhs_dilation or (1, 1)))
             and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
             == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC_HWIO))
  by_taps = nhwc_2d and depthwise.is_depthwise(lhs.shape, rhs.shape, feature_group_count)
  if not (nhwc_2d and feature_group_count == 1 or by_taps) or portable.enabled():
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                    feature_group_count, batch_group_count, precision, preferred_element_type)
  strides = tuple(int(s) for s in window_strides)
  dilation = tuple(int(d) for d in (rhs_dilation or (1, 1)))
  if isinstance(padding, str):
    window = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], dilation)]
    padding = lax.padtype_to_pads(lhs.shape[1:3], window, strides, padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  rhs, pads = drop_padding_taps(lhs.shape[1:3], rhs, strides, pads, dilation)
  if by_taps:
    return depthwise.depthwise_conv(lhs, rhs, strides, pads, dilation, precision)
  return _conv(lhs, rhs, strides, pads, dilation, precision)


def _live_taps(size: int, out: int, kernel: int, stride: int, pad_lo: int, dilation: int) -> list[int]:
  """The taps of one spatial axis (`out` output positions) that read at least one input row, not only padding."""
  live = []
  for tap in range(kernel):
    start = tap * dilation - pad_lo  # the input row this tap reads at output position 0
    first = -(start // stride) if start < 0 else 0  # the first output position where it reads a row >= 0
    if first < out and start + first * stride < size:
      live.append(tap)
  return live


def drop_padding_taps(in_hw, kernel: Array, strides, pads, dilation):
  """The kernel without its outer rows and columns of taps that read only padding, and the padding that keeps the
  output the same: (kernel, pads). Those taps add exact zeros; a dilated convolution on a map smaller than its rate
  (torchvision's ASPP rates 12/24/36 on a 14x14 map) then costs its live taps only, a 3x3 kernel often becoming a
  1x1 (a GEMM). The input's rows and columns are all still read, so the values and both gradients are unchanged
  (a dropped tap's weight gradient is zero either way). Kept as it is when no tap is dead or a padding would turn
  negative."""
  out = windows.out_hw(in_hw, kernel.shape[:2], strides, pads, dilation)
  new_pads, bounds = [], []
  for axis in range(2):
    k, (lo, hi) = kernel.shape[axis], pads[axis]
    live = _live_taps(in_hw[axis], out[axis], k, strides[axis], lo, dilation[axis])
    if not live:
      return kernel, pads
    first, last = live[0], live[-1]
    new_lo, new_hi = lo - first * dilation[axis], hi - (k - 1 - last) * dilation[axis]
    if new_lo < 0 or new_hi < 0:
      return kernel, pads
    new_pads.append((new_lo, new_hi))
    bounds.append((first, last + 1))
  if all(b == (0, k) for b, k in zip(bounds, kernel.shape[:2])):
    return kernel, pads
  (top, bottom), (left, right) = bounds
  return kernel[top:bottom, left:right], tuple(new_pads)


class Conv(ShapeCheckedParams, nn.Conv):
  """Flax's convolution through this module's forms: same parameters and names as nn.Conv."""
  conv_general_dilated: Callable = conv_general_dilated


def _lax_conv(x, kernel, strides, pads, dilation, precision):
  return lax.conv_general_dilated(x, kernel, strides, pads, rhs_dilation=dilation, dimension_numbers=NHWC_HWIO,
                                  precision=precision)


def by_gemm(x_shape, kernel_shape, strides, pads, dilation) -> bool:
  """Whether the forward pass and input gradient are one GEMM on CPU: for 1x1 kernels (no patches to build), and
  where the patch matrix (one row per output pixel) is no bigger than the kernel, i.e. n * out_h * out_w <= out
  channels: fc6/fc7, the U-Net's 14x14 bottleneck. There XLA:CPU's convolution runs at a fifth to two thirds of
  the GEMM's speed (benchmarks/conv_layers.py); at higher resolutions its own convolutions are faster."""
  kh, kw, _, cout = kernel_shape
  out_h, out_w = windows.out_hw(x_shape[1:3], kernel_shape[:2], strides, pads, dilation)
  return (kh, kw) == (1, 1) or x_shape[0] * out_h * out_w <= cout


def tap_regions_share(x_shape, kernel_shape, strides, pads, dilation) -> float | None:
  """The share of a stride-1 convolution's (tap, output pixel) pairs that read the input (None for a strided one or
  a 1x1 kernel: those have no taps that read padding at some pixels only)."""
  if tuple(strides) != (1, 1) or tuple(kernel_shape[:2]) == (1, 1):
    return None
  return tap_regions.live_share(x_shape[1:3], kernel_shape[:2], pads, dilation)


def by_native(x_shape, kernel_shape, strides, pads, dilation, dtype) -> bool:
  """Whether the native kernels compute this convolution on CPU (building them on first use): stride 1, float32,
  output channels a multiple of 16, a kernel larger than 1x1, and not a GEMM case (by_gemm)."""
  return (native.supports(dtype, kernel_shape[3], strides)
          and not by_gemm(x_shape, kernel_shape, strides, pads, dilation) and native.available())


def cpu_forms(x_shape, kernel_shape, strides, pads, dilation, dtype) -> dict[str, str]:
  """Which form computes each part of this convolution on CPU: "forward", "input_grad" and "weight_grad" each map
  to "native" (fcnjax.ops.native's direct kernels), "winograd" (its F(2x2, 3x3) kernels), "gemm" (conv_by_gemm,
  input_grad_by_gemm), "regions" (fcnjax.ops.tap_regions), "strips" (weight_grad_by_strips) or "xla" (lax's
  own)."""
  _, _, cin, cout = kernel_shape
  gemm = by_gemm(x_shape, kernel_shape, strides, pads, dilation)
  native_kernels = by_native(x_shape, kernel_shape, strides, pads, dilation, dtype)
  # The input gradient is a native forward convolution whose output channels are the input's.
  limit = max_native_input_grad_channels() if native_kernels else None
  native_input_grad = (native_kernels and cin % native.CHANNEL_MULTIPLE == 0 and (limit is None or cin <= limit))

  def native_form(flip):
    return "winograd" if native.supports_winograd(kernel_shape, flip) else "native"

  weight_grad = "native" if native_kernels else "strips" if cout > MAX_XLA_GRAD_OUT_CHANNELS else "xla"
  share = None if gemm else tap_regions_share(x_shape, kernel_shape, strides, pads, dilation)
  if share is not None and share <= MAX_TAP_REGIONS_LIVE_SHARE:
    # The native weight gradient skips the padding itself; strips and XLA's do not.
    return {"forward": "regions", "input_grad": "regions",
            "weight_grad": "native" if weight_grad == "native" else "regions"}
  return {"forward": native_form(False) if native_kernels else "gemm" if gemm else "xla",
          "input_grad": native_form(True) if native_input_grad else "gemm" if gemm else "xla",
          "weight_grad": weight_grad}


def _flipped_pads(kernel_hw, pads, dilation):
  """The padding that makes the stride-1 forward convolution of dy with the flipped kernel the input gradient."""
  return tuple(((k - 1) * d - lo, (k - 1) * d - hi) for k, (lo, hi), d in zip(kernel_hw, pads, dilation))


def input_grad_by_native(dy: Array, kernel: Array, pads, dilation, by_winograd: bool = False) -> Array:
  """d(loss)/d(x) of a stride-1 convolution: dy convolved with the kernel turned by 180 degrees, its in and out
  channels swapped (the native kernel flips it itself)."""
  return native.conv_forward(dy, kernel, _flipped_pads(kernel.shape[:2], pads, dilation), dilation, True,
                             by_winograd)


def _patches(x_padded, kernel_hw, out, strides, dilation) -> Array:
  """(n * out_h * out_w, kh * kw * cin) patch matrix of an already padded NHWC input, in HWIO's (kh, kw, cin)
  order: the window's taps side by side."""
  taps = windows.taps(x_padded, kernel_hw, out, strides, dilation)
  return (jnp.concatenate(taps, axis=-1) if len(taps) > 1 else taps[0]).reshape(-1, len(taps) * x_padded.shape[3])


def conv_by_gemm(x: Array, kernel: Array, strides, pads, dilation, precision=None) -> Array:
  """The convolution as patches(x) @ kernel (same values as lax's up to float32 summation order)."""
  kh, kw, cin, cout = kernel.shape
  out_h, out_w = windows.out_hw(x.shape[1:3], kernel.shape[:2], strides, pads, dilation)
  patches = _patches(windows.pad_hw(x, pads), (kh, kw), (out_h, out_w), strides, dilation)
  y = lax.dot(patches, kernel.reshape(kh * kw * cin, cout), precision=precision)
  return y.reshape(x.shape[0], out_h, out_w, cout)


def input_grad_by_gemm(dy: Array, kernel: Array, x_shape, strides, pads, dilation, precision=None) -> Array:
  """d(loss)/d(x) as one GEMM, dy @ kernel^T (a column per patch element), then each kernel tap's columns added
  back where that tap read the input (col2im). The kernel is read in place: no flipped copy of it."""
  kh, kw, cin, cout = kernel.shape
  n, out_h, out_w, _ = dy.shape
  columns = lax.dot_general(dy.reshape(-1, cout), kernel.reshape(kh * kw * cin, cout), (((1,), (1,)), ((), ())),
                            precision=precision).reshape(n, out_h, out_w, kh * kw, cin)
  return windows.fold([columns[:, :, :, tap] for tap in range(kh * kw)], (kh, kw), x_shape[1:3], strides, pads,
                      dilation)


def _on_cpu_else(cpu_fn, default_fn, *args):
  """cpu_fn(*args) when compiling for CPU, default_fn(*args) on every other platform (lax.platform_dependent)."""
  return lax.platform_dependent(*args, cpu=cpu_fn, default=default_fn)


def _forward(x, kernel, strides, pads, dilation, precision):
  form = cpu_forms(x.shape, kernel.shape, strides, pads, dilation, x.dtype)["forward"]
  cpu_forward = {"native": lambda x, k: native.conv_forward(x, k, pads, dilation),
                 "winograd": lambda x, k: native.conv_forward(x, k, pads, dilation, by_winograd=True),
                 "gemm": lambda x, k: conv_by_gemm(x, k, strides, pads, dilation, precision),
                 "regions": lambda x, k: tap_regions.conv(x, k, pads, dilation, precision)}.get(form)

  def xla_forward(x, kernel):
    return _lax_conv(x, kernel, strides, pads, dilation, precision)

  if cpu_forward is None:
    return xla_forward(x, kernel)
  return _on_cpu_else(cpu_forward, xla_forward, x, kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, kernel, strides, pads, dilation, precision):
  return _forward(x, kernel, strides, pads, dilation, precision)


def _conv_fwd(x, kernel, strides, pads, dilation, precision):
  return _forward(x, kernel, strides, pads, dilation, precision), (x, kernel)


def _conv_bwd(strides, pads, dilation, precision, residuals, dy):
  x, kernel = residuals

  def xla_input_grad(dy, kernel):
    # A forward convolution of dy with the flipped kernel, which XLA:CPU runs well at high resolutions.
    return jax.vjp(lambda x: _lax_conv(x, kernel, strides, pads, dilation, precision), x)[1](dy)[0]

  def gemm_input_grad(dy, kernel):
    return input_grad_by_gemm(dy, kernel, x.shape, strides, pads, dilation, precision)

  def xla_weight_grad(x, dy):
    return jax.vjp(lambda k: _lax_conv(x, k, strides, pads, dilation, precision), kernel)[1](dy)[0]

  def strip_weight_grad(x, dy):
    return weight_grad_by_strips(x, dy, kernel.shape, strides, pads, dilation, precision).astype(kernel.dtype)

  def native_input_grad(dy, kernel):
    return input_grad_by_native(dy, kernel, pads, dilation)

  def winograd_input_grad(dy, kernel):
    return input_grad_by_native(dy, kernel, pads, dilation, by_winograd=True)

  def native_weight_grad(x, dy):
    return native.conv_weight_grad(x, dy, kernel.shape, pads, dilation)

  def regions_input_grad(dy, kernel):
    return tap_regions.input_grad(dy, kernel, x.shape, pads, dilation, precision)

  def regions_weight_grad(x, dy):
    return tap_regions.weight_grad(x, dy, kernel.shape, pads, dilation, precision).astype(kernel.dtype)

  forms = cpu_forms(x.shape, kernel.shape, strides, pads, dilation, x.dtype)
  cpu_input_grad = {"native": native_input_grad, "winograd": winograd_input_grad,
                    "gemm": gemm_input_grad, "regions": regions_input_grad}.get(forms["input_grad"])
  cpu_weight_grad = {"native": native_weight_grad, "strips": strip_weight_grad,
                     "regions": regions_weight_grad}.get(forms["weight_grad"])
  dx = (xla_input_grad(dy, kernel) if cpu_input_grad is None
        else _on_cpu_else(cpu_input_grad, xla_input_grad, dy, kernel))
  dk = (xla_weight_grad(x, dy) if cpu_weight_grad is None
        else _on_cpu_else(cpu_weight_grad, xla_weight_grad, x, dy))
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
                          gemm_rows: int | None = None) -> Array:
  """d(loss)/d(kernel) of a NHWC/HWIO convolution, in float32: sum over strips of output rows of
  patches(strip)^T @ dy(strip), the patches gathered per strip (kh * kw strided slices side by side)."""
  kh, kw, cin, cout = kernel_shape
  n, out_h, out_w, _ = dy.shape
  (sh, _), (dh, _) = strides, dilation
  x = windows.pad_hw(x, pads)

  # XLA's GEMM wants its operands as (M, K) and (K, N); contracting both over their rows transposes the first one.
  # Putting dy first (accumulating d(kernel)^T) is 1.2-1.4x faster at 224x224 and 112x112 with 64-128 output
  # channels; with 256+ channels it is as often slower as faster, and fcn_resnet50's train step no faster
  # (benchmarks/conv_layers.py, benchmarks/compare_torch.py).
  dy_first = cout <= min(kh * kw * cin, MAX_DY_FIRST_OUT_CHANNELS)

  def strip_grad(x_rows, dy_rows):
    patches = _patches(x_rows, (kh, kw), (dy_rows.shape[1], out_w), strides, dilation)
    operands = (dy_rows.reshape(-1, cout), patches) if dy_first else (patches, dy_rows.reshape(-1, cout))
    return lax.dot_general(*operands, (((0,), (0,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)

  def input_rows(rows):  # input rows that `rows` output rows read
    return (rows - 1) * sh + (kh - 1) * dh + 1

  gemm_rows = gemm_rows or strip_gemm_rows(kernel_shape, x.dtype.itemsize)
  rows = strip_rows(out_h, gemm_rows // max(1, n * out_w))
  num_strips, tail = divmod(out_h, rows)

  def body(total, s):
    x_rows = lax.dynamic_slice_in_dim(x, s * rows * sh, input_rows(rows), axis=1)
    dy_rows = lax.dynamic_slice_in_dim(dy, s * rows, rows, axis=1)
    return total + strip_grad(x_rows, dy_rows), None

  if num_strips == 1:  # rows <= out_h: there is at least one strip
    total = strip_grad(x[:, :input_rows(rows)], dy[:, :rows])
  else:
    shape = (cout, kh * kw * cin) if dy_first else (kh * kw * cin, cout)
    total, _ = lax.scan(body, jnp.zeros(shape, jnp.float32), jnp.arange(num_strips))
  if tail:
    start = num_strips * rows
    total = total + strip_grad(x[:, start * sh:start * sh + input_rows(tail)], dy[:, start:])
  return (total.T if dy_first else total).reshape(kh, kw, cin, cout)
