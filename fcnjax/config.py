"""The base experiment config: every key a run reads, with its default. experiments/*.py override fields of it."""
from __future__ import annotations

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
  config.eval = ml_collections.ConfigDict(dict(batch_size=8))
  return config
