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


@contextlib.contextmanager
def gemm_conv_transpose() -> Iterator[None]:
  """Traces every layers.ConvTranspose with conv_transpose_gemm while active (benchmarks only)."""
  with mock.patch.object(layers, "conv_transpose", conv_transpose_gemm):
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

    (_, ref), ref_grads = jax.value_and_grad(lambda *a: loss(layers.conv_transpose, *a), (0, 1), has_aux=True)(x, kernel)
    (_, ours), our_grads = jax.value_and_grad(lambda *a: loss(conv_transpose_gemm, *a), (0, 1), has_aux=True)(x, kernel)
    if ours.shape != ref.shape:
      raise AssertionError(f"conv_transpose_gemm: shape {ours.shape} != {ref.shape} for case {(n, h, w, c_in, c_out, k, s, p)}")
    for a, b in [(ours, ref), *zip(our_grads, ref_grads)]:
      diff = float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))
      worst = max(worst, diff)
      if diff > 1e-5:
        raise AssertionError(f"conv_transpose_gemm differs from layers.conv_transpose by {diff:.1e} (relative) "
                             f"in case (n, h, w, c_in, c_out, k, s, p) = {(n, h, w, c_in, c_out, k, s, p)}")
  return worst


def remat_apply(model, policy):
  """model.apply under jax.checkpoint(policy): the backward pass recomputes what the policy does not save."""

  def apply(variables, images, train=False, rngs=None, mutable=False):
    def forward(variables, images, rngs):
      return model.apply(variables, images, train=train, rngs=rngs, mutable=mutable)
    return jax.checkpoint(forward, policy=policy)(variables, images, rngs)

  return apply
