"""`python -m fcnjax.export --workdir runs/pet_fcn8s --height 512 --width 512 [--format onnx] [--out DIR/NAME]`
or `python -m fcnjax.export --weights weights/fcn_resnet50 --model fcn_resnet50 --height 520 --width 520`.

Writes NAME.stablehlo (jax.export's serialized bytes, lowered for CPU and CUDA), NAME.onnx (for ONNX Runtime and the
runtimes that read ONNX) and NAME.json (what the graph takes and gives, and the normalisation it expects). The graph
maps (N, H, W, 3) images to (N, H, W, C) float32 logits, N free, H and W as given; fcnjax.exporting says more. Each
file is then run in its own runtime (deserialized jax.export, ONNX Runtime) on random images and compared with fcnjax
(--noverify skips it); a difference above 1e-4 of the largest logit fails the command.
"""
from __future__ import annotations

import ast
import json
import os
import time

from absl import app, flags

from fcnjax import cli, exporting, runs
from fcnjax.segmenter import Segmenter

flags.DEFINE_string("workdir", None, "Training workdir whose checkpoint to export (or --weights and --model).")
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint of --workdir.")
flags.DEFINE_string("weights", None, "Converted weights (conversions/convert_torchvision.py --out) to export.")
flags.DEFINE_string("model", None, "With --weights: the zoo model they are for, e.g. fcn_resnet50.")
flags.DEFINE_multi_string("model_option", [], "With --weights: KEY=VALUE option of the model (repeatable), e.g. "
                          "encoder=resnet34.")
flags.DEFINE_integer("num_classes", None, "With --weights: the number of classes (default: read from the weights).")
flags.DEFINE_integer("height", 0, "Image height the graph takes (default: the run's eval_size or crop_size).")
flags.DEFINE_integer("width", 0, "Image width the graph takes (default: the height).")
flags.DEFINE_multi_enum("format", ["stablehlo", "onnx"], exporting.FORMATS, "Formats to write (repeatable).")
flags.DEFINE_string("out", None, "Output path without extension (default: exported/<model>).")
flags.DEFINE_bool("preprocessing", False, "Take uint8 images and normalise them inside the graph.")
flags.DEFINE_bool("verify", True, "Run each exported file in its runtime and compare it with fcnjax.")
flags.DEFINE_bool("overwrite", False, "Replace existing output files.")
FLAGS = flags.FLAGS

EXTENSIONS = {"stablehlo": ".stablehlo", "onnx": ".onnx"}
SAVERS = {"stablehlo": exporting.save_stablehlo, "onnx": exporting.save_onnx}
# The largest verified difference accepted, relative to the largest logit.
TOLERANCE = 1e-4


def load_segmenter() -> tuple[Segmenter, str, int]:
  """The model to export, its name, and the default image size (0 when its data config names none)."""
  if bool(FLAGS.workdir) == bool(FLAGS.weights):
    raise app.UsageError("give --workdir (a training run) or --weights with --model (converted weights)")
  if FLAGS.workdir:
    run = runs.load_run(FLAGS.workdir, FLAGS.checkpoint)
    size = run.config.data.get("eval_size", 0) or run.config.data.get("crop_size", 0)
    return Segmenter(run.model, run.variables, run.config.data), run.config.model.name, size
  if not FLAGS.model:
    raise app.UsageError("--weights needs --model, the zoo model the weights are for")
  segmenter = Segmenter.from_weights(FLAGS.weights, FLAGS.model, num_classes=FLAGS.num_classes,
                                     model_options=parse_options(FLAGS.model_option))
  return segmenter, FLAGS.model, 0


def parse_options(items: list[str]) -> dict:
  """KEY=VALUE strings -> {key: value}, values read as Python literals where they are (16, True), else as text."""
  options = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise app.UsageError(f"--model_option={item!r}: expected KEY=VALUE")
    try:
      options[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      options[key] = value
  return options


def main(argv):
  del argv
  for format_name in FLAGS.format:
    exporting.require(format_name)
  segmenter, model_name, default_size = load_segmenter()
  height = FLAGS.height or default_size
  width = FLAGS.width or height
  if not height:
    raise app.UsageError("give --height (and --width): the run's data config names no image size")
  out = FLAGS.out or os.path.join("exported", model_name)
  formats = list(dict.fromkeys(FLAGS.format))
  paths = {name: out + EXTENSIONS[name] for name in formats}
  existing = [path for path in [*paths.values(), out + ".json"] if os.path.exists(path)]
  if existing and not FLAGS.overwrite:
    raise FileExistsError(f"{existing[0]} already exists; add --overwrite to replace it")
  description = exporting.describe(segmenter, model_name, height, width, FLAGS.preprocessing)
  for name, path in paths.items():
    start = time.perf_counter()
    SAVERS[name](segmenter, path, height, width, preprocessing=FLAGS.preprocessing)
    line = f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB, {time.perf_counter() - start:.0f} s)"
    if FLAGS.verify:
      difference = exporting.verify(name, path, segmenter, height, width, FLAGS.preprocessing)
      description["verified"][name] = difference
      line += f"; {exporting.RUNTIMES[name]} matches fcnjax to {difference:.1e} of the largest logit"
      if difference > TOLERANCE:
        raise ArithmeticError(f"{path}: {exporting.RUNTIMES[name]} differs from fcnjax by {difference:.1e} of the "
                              f"largest logit (accepted: {TOLERANCE:.0e})")
    print(line, flush=True)
  with open(out + ".json", "w") as f:
    json.dump(description, f, indent=2)
  print(f"wrote {out}.json (inputs, outputs and normalisation)")


if __name__ == "__main__":
  cli.run(main)
