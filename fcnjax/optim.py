"""Optimiser and learning-rate schedule from config.optim, with optax."""
from __future__ import annotations

import re

import flax
import ml_collections
import optax


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      optimizer="sgd",          # 'sgd' | 'adam' | 'adamw'
      learning_rate=0.01,
      momentum=0.9,             # sgd
      nesterov=False,
      b1=0.9, b2=0.999,         # adam / adamw
      weight_decay=0.0,         # sgd/adam: L2 added to the gradient (torch.optim semantics); adamw: decoupled
      schedule="poly",          # 'constant' | 'poly' | 'cosine'
      poly_power=0.9,           # torchvision reference: lr * (1 - step / total) ** 0.9
      end_learning_rate=0.0,
      warmup_steps=0,
      grad_clip_norm=0.0,       # 0 = no clipping
      frozen="",                # regex over parameter paths ('features/.*' freezes the VGG backbone)
  ))


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  decay_steps = max(total_steps - config.warmup_steps, 1)
  if config.schedule == "constant":
    main = optax.constant_schedule(config.learning_rate)
  elif config.schedule == "poly":
    main = optax.polynomial_schedule(config.learning_rate, config.end_learning_rate, config.poly_power, decay_steps)
  elif config.schedule == "cosine":
    main = optax.cosine_decay_schedule(config.learning_rate, decay_steps,
                                       alpha=config.end_learning_rate / max(config.learning_rate, 1e-12))
  else:
    raise ValueError(f"optim.schedule={config.schedule!r}; expected 'constant', 'poly' or 'cosine'")
  if config.warmup_steps:
    warmup = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    return optax.join_schedules([warmup, main], [config.warmup_steps])
  return main


def frozen_mask(params, pattern: str):
  """True for every parameter whose '/'-joined path matches `pattern` (re.fullmatch)."""
  regex = re.compile(pattern)
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  return flax.traverse_util.unflatten_dict({k: bool(regex.fullmatch(k)) for k in flat}, sep="/")


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int, params=None) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(config, total_steps)
  chain = []
  if config.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.optimizer == "sgd":
    if config.weight_decay:
      chain.append(optax.add_decayed_weights(config.weight_decay))
    chain.append(optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov))
  elif config.optimizer == "adam":
    if config.weight_decay:
      chain.append(optax.add_decayed_weights(config.weight_decay))
    chain.append(optax.adam(schedule, b1=config.b1, b2=config.b2))
  elif config.optimizer == "adamw":
    chain.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay))
  else:
    raise ValueError(f"optim.optimizer={config.optimizer!r}; expected 'sgd', 'adam' or 'adamw'")
  tx = optax.chain(*chain)
  if config.frozen:
    if params is None:
      raise ValueError("optim.frozen needs the parameters to build its mask")
    mask = frozen_mask(params, config.frozen)
    if not any(flax.traverse_util.flatten_dict(mask).values()):
      raise ValueError(f"optim.frozen={config.frozen!r} matches no parameter path")
    labels = flax.traverse_util.unflatten_dict(
        {k: ("frozen" if v else "trained") for k, v in flax.traverse_util.flatten_dict(mask).items()})
    tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
  return tx
