"""torch.nn.BatchNorm2d on NHWC: PyTorch's statistics, flax's variable names."""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcnjax.ops.params import ShapeCheckedParams

Array = jax.Array


def _affine(x, mean, var, scale, bias, epsilon):
  return (x - mean) * (scale * jax.lax.rsqrt(var + epsilon)) + bias


def normalize_two_pass(x: Array, scale: Array, bias: Array, epsilon: float):
  """Training-mode batch normalisation of float32 `x` over every axis but the last: (y, mean, biased variance).

  The variance takes two passes, as PyTorch's (no E[x^2] - E[x]^2 cancellation). This is the formula JAX
  differentiates by itself; BatchNorm uses normalize_with_batch_statistics, the same values with the closed-form
  gradient (tests/test_layers.py checks one against the other, benchmarks/batch_norm.py times both).
  """
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axis=axes)
  var = jnp.mean(jnp.square(x - mean), axis=axes)
  return _affine(x, mean, var, scale, bias, epsilon), mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize_with_batch_statistics(x: Array, scale: Array, bias: Array, epsilon: float):
  """normalize_two_pass with PyTorch's closed-form gradient: two sums over the batch and one element-wise pass,
      dx = scale / sigma * (dy - mean(dy) - x_hat * mean(dy * x_hat)),
  where differentiating the two-pass variance adds a reduction and several element-wise passes over the
  activations. The returned statistics feed the running averages only and carry no gradient, as under
  jax.lax.stop_gradient.
  """
  return normalize_two_pass(x, scale, bias, epsilon)


def _normalize_forward(x, scale, bias, epsilon):
  y, mean, var = normalize_two_pass(x, scale, bias, epsilon)
  return (y, mean, var), (x, mean, jax.lax.rsqrt(var + epsilon), scale)


def _normalize_backward(epsilon, residuals, cotangents):
  del epsilon
  x, mean, inverse_std, scale = residuals
  dy = cotangents[0]  # the statistics' cotangents are ignored: they carry no gradient
  axes = tuple(range(x.ndim - 1))
  x_hat = (x - mean) * inverse_std
  dy_mean = jnp.mean(dy, axis=axes)
  dy_x_hat_mean = jnp.mean(dy * x_hat, axis=axes)
  dx = (scale * inverse_std) * (dy - dy_mean - x_hat * dy_x_hat_mean)
  count = math.prod(x.shape[:-1])
  return dx, dy_x_hat_mean * count, dy_mean * count


normalize_with_batch_statistics.defvjp(_normalize_forward, _normalize_backward)


class BatchNorm(ShapeCheckedParams, nn.Module):
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
    scale32, bias32 = scale.astype(jnp.float32), bias.astype(jnp.float32)
    if self.use_running_average:
      y = _affine(x32, running_mean.value, running_var.value, scale32, bias32, self.epsilon)
      return y.astype(self.dtype or x.dtype)
    y, mean, var = normalize_with_batch_statistics(x32, scale32, bias32, self.epsilon)
    if not self.is_initializing():
      count = math.prod(x.shape[:-1])
      unbiased = var * (count / max(count - 1, 1))
      running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
      running_var.value = (1 - self.momentum) * running_var.value + self.momentum * unbiased
    return y.astype(self.dtype or x.dtype)
