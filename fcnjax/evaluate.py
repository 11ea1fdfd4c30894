"""`python -m fcnjax.evaluate --workdir runs/quickstart [--images DIR --masks DIR] [--tile 256]`.

Prints the per-class table (IoU, Dice, accuracy) and the means, scored at each mask's original resolution, and
writes them to WORKDIR/evaluation.json. Binary models also get the ISBI challenge metrics (pixel error, foreground
IoU / Dice, Rand error). --config replaces the run's data section (another split or folder); --images DIR
--masks DIR scores every image of a folder instead, with the run's label settings.
"""
from __future__ import annotations

import json
import os

import jax
from absl import app, flags
from ml_collections import config_flags

from fcnjax import cli, data, evaluation, metrics, parallel, reporting, runs
from fcnjax.segmenter import Segmenter

cli.define_run_inference_flags()
config_flags.DEFINE_config_file("config", None, "Optional config whose data section replaces the run's.")
flags.DEFINE_string("images", None, "Score the images of this folder (all of them, with --masks) instead of the "
                    "validation split of the run's data.")
flags.DEFINE_string("masks", None, "With --images: the folder of their masks (same stem, or STEM_mask).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  parallel.initialize_distributed()
  config, model, variables, step = runs.load_run(FLAGS.workdir, FLAGS.checkpoint)
  if FLAGS.config is not None:
    config.data = FLAGS.config.data
  info = data.dataset_info(config.data)
  if bool(FLAGS.images) != bool(FLAGS.masks):
    raise app.UsageError("--images and --masks go together")
  if FLAGS.images or FLAGS.tile or info.binary or cli.threshold_flag() != 0.0:  # the batched step thresholds at 0
    segmenter = Segmenter(model, variables, config.data, **cli.segmenter_options())
    cli.choose_threshold(segmenter)
    examples = evaluation.folder_examples(FLAGS.images, FLAGS.masks, config.data) if FLAGS.images else None
    confusion, challenge = evaluation.evaluate_per_image(segmenter, info, examples)
  else:
    confusion, challenge = evaluation.evaluate_batched(config, model, variables, cli.executables_dir()), {}
    segmenter = None
  summary = metrics.summarize(confusion, info.class_names)
  if jax.process_index() == 0:
    scored = f"{FLAGS.images} with {FLAGS.masks}" if FLAGS.images else "validation split"
    print(f"{FLAGS.workdir} (checkpoint step {step}, {FLAGS.checkpoint}) on the {scored}:")
    print(metrics.format_table(summary, info.class_names))
    for name, value in challenge.items():
      print(f"{name:>16s}: {value:.4f}")
    record = {"step": step, "checkpoint": FLAGS.checkpoint, "tile": FLAGS.tile, "tta": FLAGS.tta,
              "threshold": segmenter.threshold if segmenter else 0.0,
              "images": FLAGS.images, **challenge, **{k: v for k, v in summary.items() if not isinstance(v, str)}}
    with open(os.path.join(FLAGS.workdir, "evaluation.json"), "w") as f:
      json.dump({k: reporting.to_json_value(v) for k, v in record.items()}, f, indent=2)


if __name__ == "__main__":
  cli.run(main)
