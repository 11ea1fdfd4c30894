"""Evaluation: `python -m fcnjax.evaluate --workdir runs/quickstart [--config experiments/quickstart.py]`.

Prints the per-class table (IoU, Dice, accuracy) and the means, scored at each mask's original resolution. Binary
models also get the ISBI challenge metrics (pixel error, foreground IoU / Dice, Rand error). `--tile` evaluates
with overlap-tile inference instead of whole batches.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
from absl import app, flags

from fcnjax import data, metrics, parallel, predict, reporting, steps
from fcnjax.data import sources

FLAGS = flags.FLAGS


def evaluate_batched(config, model, variables) -> np.ndarray:
  """Confusion matrix of the validation split with the jitted, data-parallel eval step (as during training)."""
  from fcnjax import train  # pylint: disable=g-import-not-at-top
  info = data.dataset_info(config.data)
  mesh = parallel.make_mesh()
  num_classes = max(info.num_classes, 2)
  eval_data = data.build_eval_data(config.data, split="validation", batch_size=config.eval.batch_size,
                                   process_index=jax.process_index(), process_count=jax.process_count())
  eval_step = jax.jit(functools.partial(steps.eval_step, apply_fn=model.apply, num_classes=num_classes,
                                        ignore_index=info.ignore_index),
                      in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                      out_shardings=parallel.replicated(mesh))
  # As in training: every process ready before the first collective (replicate checks the variables agree), and
  # compiled before the first all-device one (see parallel.wait_for_all_processes).
  parallel.wait_for_all_processes("loaded")
  variables = parallel.replicate(variables, mesh)
  example_batch = next(iter(eval_data), None)
  if example_batch is not None:
    eval_step.lower(variables, parallel.global_shapes(example_batch, parallel.batch_sharded(mesh))).compile()
  parallel.wait_for_all_processes("compiled")
  return train.evaluate(variables, eval_data, eval_step, parallel.batch_sharded(mesh), num_classes)


def evaluate_per_image(predictor: predict.Predictor, binary: bool, num_classes: int,
                       ignore_index: int) -> tuple[np.ndarray, dict]:
  """Per-image inference (whole or tiled) on the host: the confusion matrix and, for binary data, the
  challenge metrics over the whole validation stack."""
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  split = sources.load_split(predictor.data_config, "validation")
  confusion = np.zeros((num_classes, num_classes), np.int64)
  predictions, truths = [], []
  for i in tqdm(range(len(split.examples)), desc="evaluate", unit="image"):
    example = split.examples[i]
    prediction = predictor.labels(example["image"])
    truth = example["mask"].astype(np.int64)
    valid = truth != ignore_index
    confusion += np.bincount(truth[valid] * num_classes + prediction[valid],
                             minlength=num_classes ** 2).reshape(num_classes, num_classes)
    if binary:
      predictions.append(prediction)
      truths.append(example["mask"])
  challenge = {}
  if binary:
    challenge = metrics.challenge_metrics(np.stack(predictions), np.stack(truths))
  return confusion, challenge


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  parallel.quiet_logging()
  parallel.initialize_distributed()
  config, model, variables, step = predict.load_run(FLAGS.workdir, FLAGS.checkpoint)
  if FLAGS.config is not None:  # e.g. to evaluate on another data split or folder
    config.data = FLAGS.config.data
  info = data.dataset_info(config.data)
  binary = info.binary
  if FLAGS.tile or binary:
    predictor = predict.Predictor(config, model, variables, FLAGS.tile, FLAGS.tile_margin, FLAGS.blend,
                                  FLAGS.flip_tta)
    confusion, challenge = evaluate_per_image(predictor, binary, max(info.num_classes, 2), info.ignore_index)
  else:
    confusion, challenge = evaluate_batched(config, model, variables), {}
  summary = metrics.summarize(confusion, info.class_names)
  if jax.process_index() == 0:
    print(f"{FLAGS.workdir} (checkpoint step {step}, {FLAGS.checkpoint}):")
    print(metrics.format_table(summary, info.class_names))
    for name, value in challenge.items():
      print(f"{name:>16s}: {value:.4f}")
    record = {"step": step, "checkpoint": FLAGS.checkpoint, "tile": FLAGS.tile, **challenge,
              **{k: v for k, v in summary.items() if not isinstance(v, str)}}
    with open(os.path.join(FLAGS.workdir, "evaluation.json"), "w") as f:
      json.dump({k: reporting.to_json_value(v) for k, v in record.items()}, f, indent=2)


if __name__ == "__main__":
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  predict.define_inference_flags()
  config_flags.DEFINE_config_file("config", None, "Optional config whose data section replaces the run's.")
  app.run(main)
