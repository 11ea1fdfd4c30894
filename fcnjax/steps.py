"""Train state and the pure, jittable train/eval steps: (state, batch) -> (state, metrics)."""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from fcnjax import executable_cache, losses, metrics, ops, optim


class TrainState(train_state.TrainState):
  """Params, optimiser state and step (from flax), plus BatchNorm statistics and the run's base RNG key.

  Per-step randomness is fold_in(rng, step), so a resumed run draws the same dropout masks as an uninterrupted one.
  """
  batch_stats: Any
  rng: jax.Array


def model_variables(params, batch_stats) -> dict:
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


# The initialiser runs once, so its compilation is most of its time: LLVM's level 1 compiles it about 3x faster
# than the default level 2 and gives bit-identical values (smp_unet resnet34: 16.8 s -> 6.1 s, U-Net 13.2 s -> 4.0 s,
# LR-ASPP 21.3 s -> 10.8 s, each running within 0.1 s of level 2; 2-core AMD EPYC Zen 2, AVX2).
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def init_variables(model: nn.Module, rng: jax.Array, image_shape: tuple[int, ...], executables=None) -> dict:
  """The model's initial variables for images of `image_shape`; with `executables`, a folder, the compiled
  initialiser is kept there for the next run (fcnjax.executable_cache)."""
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  init = functools.partial(model.init, train=False)
  if isinstance(rng, jax.core.Tracer):  # traced inside another function: compiled, if at all, with its caller
    return flax.core.unfreeze(init({"params": rng}, dummy))
  compiled_init = executable_cache.CachedJit(
      init, f"fcnjax.steps.init_variables model={executable_cache.describe_module(model)}", executables,
      compiler_options=INIT_COMPILER_OPTIONS)
  return flax.core.unfreeze(compiled_init({"params": rng}, dummy))


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, variables: dict,
                       rng: jax.Array) -> TrainState:
  """Step 0 of training: the variables, the optimiser's initial state and the run's key, made by one jitted program.
  Made eagerly, each array of the optimiser's state is a small program of its own, compiled (or loaded from the
  persistent cache) once per parameter shape: lraspp_mobilenet_v3_large with Adam takes 2.1-2.4 s that way and
  0.6-0.7 s jitted (2-core Xeon, AVX-512)."""

  def create(variables, rng):
    return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                             batch_stats=variables.get("batch_stats", {}), rng=rng)

  return jax.jit(create)(variables, rng)


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_step(state: TrainState, batch: dict, *, loss_config: ml_collections.ConfigDict,
               learning_rate_fn: Callable[[jax.Array], jax.Array], skip_nonfinite: bool = False
               ) -> tuple[TrainState, dict]:
  """One optimiser step on a (sharded) global batch.

  With skip_nonfinite, a step whose loss or gradients are NaN/Inf leaves params, optimiser and BatchNorm state as
  they were (the step counter still advances so the data order stays that of an uninterrupted run).
  """
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    outputs, new_model_state = state.apply_fn(
        model_variables(params, state.batch_stats), batch["image"], train=True,
        rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
    loss, parts = losses.segmentation_loss(outputs, batch["mask"], loss_config, weights=batch.get("weight"))
    return loss, (parts, new_model_state)

  (loss, (parts, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=new_model_state.get("batch_stats", state.batch_stats))
  finite = jnp.isfinite(loss) & _all_finite(grads)
  if skip_nonfinite:
    kept = state.replace(step=new_state.step)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, kept)
  step_metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "finite": finite,
                  "learning_rate": learning_rate_fn(state.step), **parts}
  return new_state, step_metrics


def jit_train_step(config: ml_collections.ConfigDict, total_steps: int, replicated: jax.sharding.Sharding,
                   executables=None) -> executable_cache.CachedJit:
  """train_step for `config` and a run of `total_steps` (its learning-rate schedule), jitted as training runs it:
  the state donated, the batch sharded as it comes, every output replicated; kept in the folder `executables` if
  given (fcnjax.executable_cache), under the config and total_steps, which define the step."""
  step = functools.partial(train_step, loss_config=config.loss,
                           learning_rate_fn=optim.learning_rate_schedule(config.optim, total_steps),
                           skip_nonfinite=config.train.on_nonfinite == "skip")
  return executable_cache.CachedJit(
      step, f"fcnjax.steps.train_step total_steps={total_steps} config={config.to_json_best_effort(sort_keys=True)}",
      executables, out_shardings=replicated, donate_argnums=0)


def eval_step(variables: dict, batch: dict, *, apply_fn: Callable, num_classes: int, ignore_index: int) -> jax.Array:
  """Confusion matrix of one batch, scored at each mask's original resolution.

  Logits are resized bilinearly (as torchvision's reference does) to each image's own original size inside the
  mask canvas before the argmax; canvas pixels outside the image carry the ignore index.
  """
  logits = apply_fn(variables, batch["image"], train=False)["out"]
  canvas = batch["mask"].shape[1:3]
  logits = ops.resize_bilinear_to_sizes(logits.astype(jnp.float32), batch["size"], canvas)
  predictions = metrics.predictions(logits)
  # Binary models are scored as two classes (background, foreground).
  return metrics.confusion_matrix(predictions, batch["mask"], max(num_classes, 2), ignore_index,
                                  valid=batch.get("valid"))


def predict_step(variables: dict, images: jax.Array, *, apply_fn: Callable) -> jax.Array:
  """Logits ('out') of the model for a batch of normalised images, in float32."""
  return apply_fn(variables, images, train=False)["out"].astype(jnp.float32)
