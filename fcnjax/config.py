"""The base experiment config: every key a run reads, with its default. experiments/*.py override fields of it."""
from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import Any, Mapping

import ml_collections

from fcnjax import data, losses, optim


def base_config(model: dict) -> ml_collections.ConfigDict:
  """`model` holds 'name', 'num_classes' and the model's own options (see fcnjax.models)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # fcnjax's C++ convolution kernels on CPU (fcnjax/ops/README.md); False keeps XLA's own convolutions.
  config.native_kernels = True
  config.model = ml_collections.ConfigDict(
      dict(dtype="float32",            # compute dtype: 'bfloat16' for mixed precision (params stay float32)
           pretrained="",              # directory written by conversions/convert_torchvision.py (or a run's export)
           pretrained_scope="backbone",
           **model))
  config.data = data.default_config()
  config.loss = losses.default_config()
  config.optim = optim.default_config()
  config.train = ml_collections.ConfigDict(dict(
      batch_size=8,                    # global, over all devices and hosts
      num_epochs=50,
      num_steps=0,                     # > 0 overrides num_epochs
      max_steps_per_run=0,             # > 0: save and exit after this many steps (time-limited jobs); rerun resumes
      log_every=10,
      eval_every=0,                    # 0 = once per epoch
      checkpoint_every=0,              # 0 = at every evaluation
      keep_checkpoints=3,              # last k, for resuming
      keep_best=1,                     # best k by validation mIoU
      on_nonfinite="stop",             # 'stop' | 'skip' a step with NaN/Inf loss or gradients
      progress=True,
      num_predictions=0,               # validation images written as PNGs at the end of training
  ))
  config.eval = ml_collections.ConfigDict(dict(
      batch_size=8,
      tile=0,                          # > 0: validate by overlap tiles of tile x tile (margin tile // 8), as
                                       # `fcnjax.evaluate --tile` scores, image by image on one device
  ))
  return config


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """get_config() of a config file (experiments/*.py), as `--config PATH` loads it."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config file {path}: no such file")
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
  """Sets dotted keys ('model.base_width': 8) in place; a key the config does not have is an error, as it is for
  `--config.KEY=VALUE`."""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for depth, part in enumerate(parents):
      if part not in node:
        raise KeyError(f"config override {key!r}: the config has no {'.'.join(parents[:depth + 1])!r}")
      node = node[part]
    if leaf not in node:
      raise KeyError(f"config override {key!r}: no such key; {'.'.join(parents) or 'the config'} has "
                     f"{', '.join(sorted(node.keys()))}")
    node[leaf] = value
