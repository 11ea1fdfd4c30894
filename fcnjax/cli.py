"""What every command-line entry point (fcnjax.train, .evaluate, .predict) shares: console logging and the
workdir a config file trains into by default."""
from __future__ import annotations

import os

from absl import flags, logging


def log_warnings_only_by_default() -> None:
  """Orbax and JAX log every checkpoint step at INFO: keep the console to the progress bar unless --verbosity."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def default_workdir(config_path: str) -> str:
  """runs/<config file name>, e.g. runs/quickstart for experiments/quickstart.py."""
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  return os.path.join("runs", name)


def define_run_inference_flags() -> None:
  """The flags of the entry points that run a trained model: which run and checkpoint, and how to infer."""
  flags.DEFINE_string("workdir", None, "Training workdir (its config.json and checkpoints).", required=True)
  flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint to use.")
  flags.DEFINE_integer("tile", 0, "Overlap-tile inference with tiles of this size (0: whole image).")
  flags.DEFINE_integer("tile_margin", -1, "Context discarded at each tile side (-1: tile // 8).")
  flags.DEFINE_bool("blend", False, "Blend half-overlapping tiles with a Gaussian window.")
  flags.DEFINE_bool("flip_tta", False, "Average with the horizontally flipped prediction.")


def predictor_options() -> dict:
  """The Predictor's options from the flags of define_run_inference_flags."""
  f = flags.FLAGS
  return dict(tile=f.tile, tile_margin=f.tile_margin, blend=f.blend, flip_tta=f.flip_tta)
