"""Resizing equal to torch.nn.functional.interpolate (no antialiasing), as separable interpolation matrices.

jax.image.resize antialiases when shrinking and rounds 'nearest' differently, so fcnjax resizes with these
(tests/test_layers.py checks them against F.interpolate).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fcnjax.ops.windows import PairLike, pair

Array = jax.Array


def _source_scale(in_size: int, out_size: int, align_corners: bool) -> np.float32:
  if align_corners:
    return np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0)
  return np.float32(in_size / out_size)


def _bilinear_rows(xp, in_size: int, dst, scale, align_corners: bool):
  """(len(dst), in_size) bilinear weights of output positions `dst` (float32) given F.interpolate's float32 `scale`,
  with its index arithmetic: each row holds 1 - lam at the source index i0 and lam at i1 = i0 + 1 (both clamped to
  the last pixel). `xp` is numpy (static sizes) or jax.numpy (a traced scale); both give the same bits."""
  if align_corners:
    src = dst * scale
  else:
    src = xp.maximum(scale * (dst + xp.float32(0.5)) - xp.float32(0.5), xp.float32(0))
  i0 = xp.minimum(xp.floor(src).astype(xp.int32), in_size - 1)
  i1 = xp.minimum(i0 + 1, in_size - 1)
  lam = src - i0.astype(xp.float32)
  cols = xp.arange(in_size)
  return (cols[None, :] == i0[:, None]) * (1 - lam)[:, None] + (cols[None, :] == i1[:, None]) * lam[:, None]


def interpolation_matrix(in_size: int, out_size: int, method: str = "bilinear",
                         align_corners: bool = False) -> np.ndarray:
  """(out_size, in_size) matrix M such that resizing one axis is M @ x, with F.interpolate's index arithmetic.

  Index arithmetic is done in float32 like PyTorch's CPU kernels, so 'nearest' picks the same pixels.
  """
  scale = _source_scale(in_size, out_size, align_corners)
  dst = np.arange(out_size, dtype=np.float32)
  if method == "bilinear":
    return _bilinear_rows(np, in_size, dst, scale, align_corners)
  if method in ("nearest", "nearest-exact"):
    if align_corners:
      raise ValueError("align_corners only applies to linear modes, as in PyTorch")
    offset = np.float32(0.5) if method == "nearest-exact" else np.float32(0)
    src = np.floor((dst + offset) * scale).astype(np.int64)
    matrix = np.zeros((out_size, in_size), dtype=np.float32)
    matrix[np.arange(out_size), np.minimum(src, in_size - 1)] = 1
    return matrix
  raise ValueError(f"unknown resize method {method!r}; expected 'bilinear', 'nearest' or 'nearest-exact'")


def resize(x: Array, size: PairLike, method: str = "bilinear", align_corners: bool = False) -> Array:
  """F.interpolate(x, size=size, mode=method, align_corners=align_corners) for NHWC `x`."""
  out_h, out_w = pair(size)
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
  matrix = _bilinear_rows(jnp, in_size, jnp.arange(canvas, dtype=jnp.float32), scale, align_corners=False)
  return jnp.where((jnp.arange(canvas) < out_size)[:, None], matrix, 0.0)


def resize_bilinear_to_sizes(x: Array, sizes: Array, canvas: PairLike) -> Array:
  """Resize each image of NHWC `x` bilinearly to its own (h, w) in `sizes` (N, 2), inside a (canvas_h, canvas_w)."""
  canvas_h, canvas_w = pair(canvas)
  _, in_h, in_w, _ = x.shape
  rows = jax.vmap(lambda s: bilinear_matrix_to_size(in_h, s, canvas_h))(sizes[:, 0])
  cols = jax.vmap(lambda s: bilinear_matrix_to_size(in_w, s, canvas_w))(sizes[:, 1])
  precision = jax.lax.Precision.HIGHEST
  y = jnp.einsum("noh,nhwc->nowc", rows.astype(x.dtype), x, precision=precision)
  return jnp.einsum("npw,nowc->nopc", cols.astype(x.dtype), y, precision=precision)
