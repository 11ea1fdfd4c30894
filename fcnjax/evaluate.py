"""`python -m fcnjax.evaluate --workdir runs/quickstart [--config experiments/quickstart.py] [--tile 256]`.

Prints the per-class table (IoU, Dice, accuracy) and the means, scored at each mask's original resolution, and
writes them to WORKDIR/evaluation.json. Binary models also get the ISBI challenge metrics (pixel error, foreground
IoU / Dice, Rand error). --config replaces the run's data section (another split or folder).
"""
from __future__ import annotations

import json
import os

import jax
from absl import flags
from ml_collections import config_flags

from fcnjax import cli, data, evaluation, metrics, parallel, reporting, runs
from fcnjax.segmenter import Segmenter

cli.define_run_inference_flags()
config_flags.DEFINE_config_file("config", None, "Optional config whose data section replaces the run's.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  parallel.initialize_distributed()
  config, model, variables, step = runs.load_run(FLAGS.workdir, FLAGS.checkpoint)
  if FLAGS.config is not None:
    config.data = FLAGS.config.data
  info = data.dataset_info(config.data)
  if FLAGS.tile or info.binary:
    segmenter = Segmenter(model, variables, config.data, **cli.segmenter_options())
    confusion, challenge = evaluation.evaluate_per_image(segmenter, info)
  else:
    confusion, challenge = evaluation.evaluate_batched(config, model, variables), {}
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
  cli.run(main)
