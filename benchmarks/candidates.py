"""Alternative formulations of fcnjax ops, measured by benchmarks/train_step_variants.py and conv_micro.py.

Each computes exactly the same function as the op it replaces (the same products, summed in another order), so a
model's results stay the same to float rounding; `check_conv_transpose` verifies this. They are proposals for
fcnjax.layers, kept here until measured on a quiet machine.
"""
from __future__ import annotations

import contextlib
from typing import Iterator
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from fcnjax import layers


def conv_transpose_gemm(x: jax.Array, kernel: jax.Array, *, stride=1, padding=0, output_padding=0, dilation=1,
                        groups: int = 1, precision=None) -> jax.Array:
  """layers.conv_transpose as one matmul and an overlap-add ("col2im"), for dilation 1 and groups 1.

  layers.conv_transpose lowers to a convolution over the input dilated by the stride, whose weight gradient is a
  window-dilated convolution that XLA:CPU emits as plain loops. Here every input pixel is multiplied by the whole
  kernel at once, z[n, h, w, i, j, :] = x[n, h, w, :] @ kernel[i, j], and output pixel (s*h + i, s*w + j) sums the
  z entries that land on it. With the kernel padded to a multiple m*s of the stride, that is m x m pixel-shuffled
  blocks of z added at offsets that are multiples of s. For U-Net's k = s = 2 it is a single matmul and a reshape
  (m = 1); for FCN's k = 2s upsampling, four shifted blocks. Gradients are matmuls and slices.
  """
  s_h, s_w = layers._pair(stride)  # pylint: disable=protected-access
  if layers._pair(dilation) != (1, 1) or groups != 1:  # pylint: disable=protected-access
    return layers.conv_transpose(x, kernel, stride=stride, padding=padding, output_padding=output_padding,
                                 dilation=dilation, groups=groups, precision=precision)
  p_h, p_w = layers._pair(padding)  # pylint: disable=protected-access
  op_h, op_w = layers._pair(output_padding)  # pylint: disable=protected-access
  n, h, w, _ = x.shape
  k_h, k_w, _, c_out = kernel.shape
  m_h, m_w = -(-k_h // s_h), -(-k_w // s_w)
  kernel = jnp.pad(kernel.astype(x.dtype), ((0, m_h * s_h - k_h), (0, m_w * s_w - k_w), (0, 0), (0, 0)))
  z = jnp.einsum("nhwc,ijcd->nhwijd", x, kernel, precision=precision)
  full_h, full_w = (h + m_h - 1) * s_h, (w + m_w - 1) * s_w
  y = None
  for a in range(m_h):
    for b in range(m_w):
      block = z[:, :, :, a * s_h:(a + 1) * s_h, b * s_w:(b + 1) * s_w, :]
      block = jnp.transpose(block, (0, 1, 3, 2, 4, 5)).reshape(n, h * s_h, w * s_w, c_out)
      block = jnp.pad(block, ((0, 0), (a * s_h, full_h - h * s_h - a * s_h), (b * s_w, full_w - w * s_w - b * s_w),
                              (0, 0)))
      y = block if y is None else y + block
  # torch's output size: (in - 1) * s - 2p + k + output_padding; the full map holds (in - 1) * s + m * s rows.
  out_h = (h - 1) * s_h - 2 * p_h + k_h + op_h
  out_w = (w - 1) * s_w - 2 * p_w + k_w + op_w
  extra_h, extra_w = max(p_h + out_h - full_h, 0), max(p_w + out_w - full_w, 0)
  if extra_h or extra_w:  # output_padding can reach past the full map: those rows get no contribution
    y = jnp.pad(y, ((0, 0), (0, extra_h), (0, extra_w), (0, 0)))
  return y[:, p_h:p_h + out_h, p_w:p_w + out_w, :]


def conv_transpose_gemm_if_disjoint(x: jax.Array, kernel: jax.Array, *, stride=1, padding=0, output_padding=0,
                                    dilation=1, groups: int = 1, precision=None) -> jax.Array:
  """conv_transpose_gemm where the kernel equals the stride (U-Net's 2x2, stride 2: the windows do not overlap and
  the overlap-add is a reshape), layers.conv_transpose elsewhere.

  For FCN's overlapping k = 2s kernels on 21 channels conv_micro measured the matmul + overlap-add slower than the
  dilated convolution (its intermediate has k*k*c_out values per input pixel), so only the disjoint case is proposed.
  """
  disjoint = tuple(kernel.shape[:2]) == layers._pair(stride)  # pylint: disable=protected-access
  fn = conv_transpose_gemm if disjoint else layers.conv_transpose
  return fn(x, kernel, stride=stride, padding=padding, output_padding=output_padding, dilation=dilation,
            groups=groups, precision=precision)


@contextlib.contextmanager
def gemm_conv_transpose(disjoint_only: bool = True) -> Iterator[None]:
  """Traces layers.ConvTranspose with conv_transpose_gemm while active (benchmarks only): only where the kernel
  equals the stride, or everywhere with disjoint_only=False."""
  fn = conv_transpose_gemm_if_disjoint if disjoint_only else conv_transpose_gemm
  with mock.patch.object(layers, "conv_transpose", fn):
    yield


def check_conv_transpose(cases=((1, 6, 5, 3, 4, 2, 2, 0), (2, 5, 5, 4, 4, 16, 8, 0), (1, 7, 6, 3, 2, 4, 2, 1),
                                (1, 4, 4, 2, 3, 3, 2, 1))) -> float:
  """Max |conv_transpose_gemm - layers.conv_transpose| over a few (n, h, w, c_in, c_out, k, s, p) cases, outputs
  and gradients; raises if they disagree beyond float32 rounding."""
  worst = 0.0
  rng = np.random.default_rng(0)
  for n, h, w, c_in, c_out, k, s, p in cases:
    x = jnp.asarray(rng.standard_normal((n, h, w, c_in), np.float32))
    kernel = jnp.asarray(rng.standard_normal((k, k, c_in, c_out), np.float32))

    def loss(fn, x, kernel, s=s, p=p):
      y = fn(x, kernel, stride=s, padding=p)
      return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))), y

    case = (n, h, w, c_in, c_out, k, s, p)
    (_, ref), ref_grads = jax.value_and_grad(lambda *a: loss(layers.conv_transpose, *a), (0, 1), has_aux=True)(
        x, kernel)
    (_, ours), our_grads = jax.value_and_grad(lambda *a: loss(conv_transpose_gemm, *a), (0, 1), has_aux=True)(
        x, kernel)
    if ours.shape != ref.shape:
      raise AssertionError(f"conv_transpose_gemm: shape {ours.shape} != {ref.shape} for case {case}")
    for a, b in [(ours, ref), *zip(our_grads, ref_grads)]:
      diff = float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))
      worst = max(worst, diff)
      if diff > 1e-5:
        raise AssertionError(f"conv_transpose_gemm differs from layers.conv_transpose by {diff:.1e} (relative) "
                             f"in case (n, h, w, c_in, c_out, k, s, p) = {case}")
  return worst


_lax_conv = jax.lax.conv_general_dilated

# Rewrites of jax.lax.conv_general_dilated that `rewritten_convs` can switch on, each for NHWC/HWIO convolutions
# without input dilation or feature groups (every convolution flax's nn.Conv makes in fcnjax's models):
#   'dot_1x1'       1x1 kernels (any stride, no padding) as an einsum. XLA:CPU turns a 1x1 convolution's weight
#                   gradient into a convolution whose "batch" is the input channels and whose "features" are the
#                   batch, which needs the activations transposed to (C, H, W, N) and runs with N innermost. As an
#                   einsum, the weight gradient is a matmul over N*H*W with channels innermost in both operands.
#   'im2col_large'  stride-1 VALID kernels of 5x5 and more (FCN's fc6, 7x7 on a 7+ pixel map) as patches @ kernel:
#                   few output pixels and a huge kernel make a poor convolution but a plain matmul; the kernel
#                   reshapes to (kh*kw*c_in, c_out) without a copy, and the patches are kh*kw small slices.
#   'explicit_pad'  padding wider than the kernel (FCN's conv1_1 pads by 100) done by jnp.pad before a VALID
#                   convolution: the weight gradient of the padded convolution gets negative padding, which
#                   XLA:CPU only runs as plain loops.
CONV_REWRITES = ("dot_1x1", "im2col_large", "explicit_pad")


def _explicit_padding(padding, kernel_hw, window_strides, lhs_hw) -> list[tuple[int, int]] | None:
  if isinstance(padding, str):
    if padding.upper() == "VALID":
      return [(0, 0), (0, 0)]
    return None  # 'SAME' is resolved by lax; only the 1x1 case below needs it, where it means no padding
  return [tuple(p) for p in padding]


def _plain_nhwc(lhs, rhs, lhs_dilation, dimension_numbers, feature_group_count, batch_group_count) -> bool:
  if lhs.ndim != 4:
    return False
  dims = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  return (dims == nhwc and all(d == 1 for d in (lhs_dilation or (1, 1))) and feature_group_count == 1
          and batch_group_count == 1)


def rewritten_conv(rewrites):
  """A drop-in jax.lax.conv_general_dilated applying the named CONV_REWRITES where they fit."""
  unknown = set(rewrites) - set(CONV_REWRITES)
  if unknown:
    raise ValueError(f"unknown conv rewrites {sorted(unknown)}; expected some of {CONV_REWRITES}")

  def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
           feature_group_count=1, batch_group_count=1, precision=None, preferred_element_type=None):
    def original(lhs, padding):
      return _lax_conv(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                       dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                       batch_group_count=batch_group_count, precision=precision,
                       preferred_element_type=preferred_element_type)

    if not _plain_nhwc(lhs, rhs, lhs_dilation, dimension_numbers, feature_group_count, batch_group_count):
      return original(lhs, padding)
    k_h, k_w = rhs.shape[:2]
    undilated = all(d == 1 for d in (rhs_dilation or (1, 1)))
    pads = _explicit_padding(padding, (k_h, k_w), window_strides, lhs.shape[1:3])
    if "dot_1x1" in rewrites and (k_h, k_w) == (1, 1) and (pads is None or not any(map(any, pads))):
      s_h, s_w = window_strides
      x = lhs[:, ::s_h, ::s_w, :] if (s_h, s_w) != (1, 1) else lhs
      return jnp.einsum("nhwc,cd->nhwd", x, rhs[0, 0], precision=precision,
                        preferred_element_type=preferred_element_type)
    if ("explicit_pad" in rewrites and pads is not None and undilated
        and any(lo > k - 1 or hi > k - 1 for (lo, hi), k in zip(pads, (k_h, k_w)))):
      lhs = jnp.pad(lhs, ((0, 0), *pads, (0, 0)))
      pads = [(0, 0), (0, 0)]
      if "im2col_large" not in rewrites or k_h * k_w < 25:
        return original(lhs, pads)
    if ("im2col_large" in rewrites and k_h * k_w >= 25 and tuple(window_strides) == (1, 1) and undilated
        and pads == [(0, 0), (0, 0)]):
      out_h, out_w = lhs.shape[1] - k_h + 1, lhs.shape[2] - k_w + 1
      patches = jnp.concatenate([lhs[:, i:i + out_h, j:j + out_w, :] for i in range(k_h) for j in range(k_w)],
                                axis=-1)
      return jnp.einsum("nhwp,pd->nhwd", patches, rhs.reshape(-1, rhs.shape[-1]), precision=precision,
                        preferred_element_type=preferred_element_type)
    return original(lhs, padding if pads is None else pads)

  return conv


@contextlib.contextmanager
def rewritten_convs(rewrites) -> Iterator[None]:
  """While active, every jax.lax.conv_general_dilated call (flax's nn.Conv's included) goes through
  rewritten_conv(rewrites) -- for benchmarks only."""
  with mock.patch.object(jax.lax, "conv_general_dilated", rewritten_conv(tuple(rewrites))):
    yield


def check_conv_rewrites() -> float:
  """Max relative |rewritten - lax| over outputs and both gradients of cases each rewrite applies to."""
  rng = np.random.default_rng(0)
  cases = [((2, 9, 7, 5), (1, 1, 5, 4), (1, 1), [(0, 0), (0, 0)]),        # dot_1x1
           ((2, 9, 7, 5), (1, 1, 5, 4), (2, 2), "VALID"),                 # dot_1x1, strided
           ((1, 10, 9, 3), (7, 7, 3, 4), (1, 1), "VALID"),                # im2col_large
           ((1, 6, 5, 3), (3, 3, 3, 4), (1, 1), [(5, 5), (4, 6)])]        # explicit_pad
  worst = 0.0
  dims = ("NHWC", "HWIO", "NHWC")
  for x_shape, w_shape, strides, padding in cases:
    x = jnp.asarray(rng.standard_normal(x_shape, np.float32))
    w = jnp.asarray(rng.standard_normal(w_shape, np.float32))
    fast = rewritten_conv(CONV_REWRITES)

    def run(fn, x, w, strides=strides, padding=padding):
      y = fn(x, w, strides, padding, dimension_numbers=dims)
      return jnp.sum(y * jnp.sin(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))), y

    (_, ref), ref_grads = jax.value_and_grad(lambda *a: run(_lax_conv, *a), (0, 1), has_aux=True)(x, w)
    (_, ours), our_grads = jax.value_and_grad(lambda *a: run(fast, *a), (0, 1), has_aux=True)(x, w)
    for a, b in [(ours, ref), *zip(our_grads, ref_grads)]:
      diff = float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))
      worst = max(worst, diff)
      if a.shape != b.shape or diff > 1e-5:
        raise AssertionError(f"rewritten conv differs from lax ({a.shape} vs {b.shape}, {diff:.1e}) for case "
                             f"x {x_shape}, kernel {w_shape}, strides {strides}, padding {padding}")
  return worst


def remat_apply(model, policy):
  """model.apply under jax.checkpoint(policy): the backward pass recomputes what the policy does not save."""

  def apply(variables, images, train=False, rngs=None, mutable=False):
    def forward(variables, images, rngs):
      return model.apply(variables, images, train=train, rngs=rngs, mutable=mutable)
    return jax.checkpoint(forward, policy=policy)(variables, images, rngs)

  return apply
