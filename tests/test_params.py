"""fcnjax.ops.params: the layers check their parameters' shapes on apply without tracing their initializers."""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import pytest

from fcnjax import ops


def _counting(init_fn):
  calls = []

  def counted(key, shape, dtype=jnp.float32):
    calls.append(tuple(shape))
    return init_fn(key, shape, dtype)
  return counted, calls


LAYERS = {
    "Conv": lambda init: ops.Conv(4, (3, 3), kernel_init=init),
    "ConvTranspose": lambda init: ops.ConvTranspose(4, 2, strides=2, kernel_init=init),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_initializer_runs_at_init_only(name):
  init, calls = _counting(jax.nn.initializers.lecun_normal())
  layer = LAYERS[name](init)
  x = jnp.ones((1, 8, 8, 3))
  variables = layer.init(jax.random.PRNGKey(0), x)
  assert len(calls) == 1
  jax.jit(layer.apply)(variables, x)
  layer.apply(variables, x)
  assert len(calls) == 1  # flax's own Module.param would trace it again on each apply


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_a_parameter_of_another_shape_is_still_refused(name):
  layer = LAYERS[name](jax.nn.initializers.lecun_normal())
  x = jnp.ones((1, 8, 8, 3))
  variables = layer.init(jax.random.PRNGKey(0), x)
  wrong = jax.tree.map(lambda a: a, variables)
  wrong["params"]["kernel"] = jnp.zeros((3, 3, 5, 4))
  with pytest.raises(flax.errors.ScopeParamShapeError, match="kernel"):
    layer.apply(wrong, x)


def test_batch_norm_scale_of_another_shape_is_refused():
  layer = ops.BatchNorm(use_running_average=True)
  x = jnp.ones((1, 4, 4, 3))
  variables = layer.init(jax.random.PRNGKey(0), x)
  variables["params"]["scale"] = jnp.ones((5,))
  with pytest.raises(flax.errors.ScopeParamShapeError, match="scale"):
    layer.apply(variables, x)
