"""torch.nn.BatchNorm2d on NHWC: PyTorch's statistics, flax's variable names."""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


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

