"""`python -m fcnjax.predict --workdir runs/quickstart --images DIR --out DIR [--masks DIR] [--tile 256]`.

For each image it writes NAME_mask.png (class ids, palette PNG), NAME_overlay.png (colours over the image) and
NAME_panel.png (image | prediction | ground truth when --masks holds one).
"""
from __future__ import annotations

import os

from absl import app, flags
from tqdm.auto import tqdm

from fcnjax import cli, data, runs, visualize
from fcnjax.segmenter import Segmenter

cli.define_run_inference_flags()
flags.DEFINE_string("images", None, "Folder of images to segment.", required=True)
flags.DEFINE_string("out", None, "Folder for the PNGs.", required=True)
flags.DEFINE_string("masks", None, "Optional folder of ground-truth masks (same stem, or STEM_mask).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config, model, variables, step = runs.load_run(FLAGS.workdir, FLAGS.checkpoint)
  segmenter = Segmenter(model, variables, config.data, **cli.segmenter_options())
  cli.choose_threshold(segmenter)
  paths = data.list_images(FLAGS.images)
  if not paths:
    raise app.UsageError(f"no images found in {FLAGS.images}")
  for path in tqdm(paths, desc="predict", unit="image"):
    image = data.read_image(path)
    mask_path = data.find_mask(FLAGS.masks, path)
    ground_truth = data.read_mask(mask_path, segmenter.data_config.mask_mode) if mask_path else None
    name = os.path.splitext(os.path.basename(path))[0]
    visualize.write_prediction(FLAGS.out, name, image, segmenter.labels(image), ground_truth,
                               segmenter.data_config.ignore_index)
  print(f"wrote predictions for {len(paths)} images (checkpoint step {step}) to {FLAGS.out}")


if __name__ == "__main__":
  cli.run(main)
