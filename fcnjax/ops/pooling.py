"""torch.nn.MaxPool2d (ceil_mode, -inf padding, PyTorch's gradient) on NHWC, as a maximum over the window's taps."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from fcnjax.ops import portable, windows
from fcnjax.ops.windows import PairLike, pair

Array = jax.Array


def max_pool(x: Array, window: PairLike, stride: PairLike | None = None, padding: PairLike = 0,
             ceil_mode: bool = False) -> Array:
  """nn.MaxPool2d(window, stride, padding, ceil_mode) on NHWC input (padding counts as -inf, as in PyTorch)."""
  window = pair(window)
  stride = pair(stride if stride is not None else window)
  padding = pair(padding)
  pads = []
  for size, k, s, p in zip(x.shape[1:3], window, stride, padding):
    span = size + 2 * p - k
    out = (-(-span // s) if ceil_mode else span // s) + 1
    # PyTorch drops a last window that would start inside the right padding.
    if ceil_mode and (out - 1) * s >= size + p:
      out -= 1
    pads.append((p, max((out - 1) * s + k - size - p, 0)))
  if portable.enabled():
    return _max_pool_planes(x, window, stride, tuple(pads))
  return _max_pool(x, window, stride, tuple(pads))


def _max_pool_planes(x, window, strides, pads):
  """The same maximum as one reduce_window over (N*C, H, W) planes: exporters turn a reduce_window into a pooling
  over all of its window's axes, and ONNX Runtime pools over at most three."""
  n, h, w, c = x.shape
  planes = jnp.transpose(x, (0, 3, 1, 2)).reshape(-1, h, w)
  y = lax.reduce_window(planes, -jnp.inf, lax.max, (1, *window), (1, *strides), ((0, 0), *pads))
  return jnp.transpose(y.reshape(n, c, *y.shape[1:]), (0, 2, 3, 1))


# Written as a maximum over the window's taps, with its own gradient: JAX's gradient of reduce_window (value and
# index pairs through select_and_gather_add) takes 74 ms for a 2x2 pool of a 224x224x64 batch of two on XLA:CPU,
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
