"""A training run's workdir, read back: its config, model and the variables of one of its checkpoints."""
from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import ml_collections

from fcnjax import checkpoint, models


class Run(NamedTuple):
  config: ml_collections.ConfigDict
  model: Any
  variables: dict
  step: int


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config.json that fcnjax.train wrote into `workdir`."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: --workdir must be a directory written by fcnjax.train")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_run(workdir: str, which: str = "best") -> Run:
  """The config, model and variables of the run's best (by validation mIoU) or latest checkpoint."""
  config = load_config(workdir)
  model = models.build_model(config.model)
  ckpts = checkpoint.Checkpoints(workdir, keep=config.train.keep_checkpoints, keep_best=config.train.keep_best)
  try:
    variables, step = ckpts.restore_variables(checkpoint.model_record(config), which=which)
  finally:
    ckpts.close()
  return Run(config, model, variables, step)
