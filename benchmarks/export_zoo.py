"""Every zoo model exported as fcnjax.export writes it, at one size: the files' sizes and each runtime's parity.

    python -m benchmarks.export_zoo                          # every model, 224x224, 21 classes
    python -m benchmarks.export_zoo --models unet,lraspp_mobilenet_v3_large --height 257 --width 231

Each model is the PyTorch reference of benchmarks/compare_torch.py (torchvision's and smp's builders, the tests'
FCN-8s and U-Net twins) with random weights, converted by fcnjax's converter; its eval-mode logits for a batch of 2
random images are compared three ways, each as max |diff| / max |reference|:
- fcnjax against PyTorch (the conversion and the model),
- the StableHLO file (jax.export, deserialized and run) against fcnjax,
- the ONNX file (jax2onnx, run by ONNX Runtime's CPU provider) against fcnjax.
Parameters are counted from the converted variables (BatchNorm statistics left out, as torch's parameters()).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import compare_torch, harness  # noqa: E402 pylint: disable=g-import-not-at-top


def export_model(name: str, height: int, width: int, num_classes: int, directory: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from fcnjax import exporting  # pylint: disable=g-import-not-at-top
  from fcnjax.segmenter import Segmenter  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  reference = compare_torch.torch_model(name, num_classes).eval()
  variables = jax.tree.map(np.asarray, compare_torch.flax_variables_from_torch(name, reference))
  segmenter = Segmenter(compare_torch.fcnjax_model(name, num_classes, "float32"), variables)
  images = exporting.example_images(height, width, batch=2)
  ours = exporting.reference_logits(segmenter, images)
  with torch.no_grad():
    theirs = compare_torch._torch_outputs(reference(torch.from_numpy(images.transpose(0, 3, 1, 2))))[0]  # pylint: disable=protected-access
  row = {"model": name, "height": height, "width": width,
         "params": int(sum(np.size(leaf) for leaf in jax.tree.leaves(variables["params"]))),
         "parity_torch": exporting.relative_difference(ours, theirs.numpy().transpose(0, 2, 3, 1))}
  start = time.perf_counter()
  path = exporting.save_stablehlo(segmenter, os.path.join(directory, f"{name}.stablehlo"), height, width)
  row["stablehlo_s"] = time.perf_counter() - start
  row["stablehlo_bytes"] = os.path.getsize(path)
  row["parity_stablehlo"] = exporting.relative_difference(exporting.load_stablehlo(path).call(images), ours)
  os.remove(path)
  start = time.perf_counter()
  path = exporting.save_onnx(segmenter, os.path.join(directory, f"{name}.onnx"), height, width)
  row["onnx_s"] = time.perf_counter() - start
  row["onnx_bytes"] = os.path.getsize(path)
  row["parity_onnx"] = exporting.relative_difference(exporting.run_onnx(exporting.onnx_session(path), images), ours)
  os.remove(path)
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="all", help=f"comma-separated subset of {compare_torch.ALL_MODELS}")
  parser.add_argument("--height", type=int, default=224)
  parser.add_argument("--width", type=int, default=224)
  parser.add_argument("--num_classes", type=int, default=21)
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  names = compare_torch.ALL_MODELS if args.models == "all" else args.models.split(",")
  unknown = sorted(set(names) - set(compare_torch.ALL_MODELS))
  if unknown:
    parser.error(f"--models: unknown {unknown}; expected some of {compare_torch.ALL_MODELS}")
  rows = []
  print(f"{args.height}x{args.width}, batch 2, {args.num_classes} classes; parity as max |diff| / max |reference|")
  print("| model | params | StableHLO MB | ONNX MB | fcnjax vs torch | StableHLO vs fcnjax | ONNX Runtime vs fcnjax |")
  print("|---|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as directory:
    for name in names:
      row = export_model(name, args.height, args.width, args.num_classes, directory)
      rows.append(row)
      print(f"| {name} | {row['params'] / 1e6:.2f} M | {row['stablehlo_bytes'] / 1e6:.0f} | "
            f"{row['onnx_bytes'] / 1e6:.0f} | {row['parity_torch']:.1e} | {row['parity_stablehlo']:.1e} | "
            f"{row['parity_onnx']:.1e} |", flush=True)
  if args.out:
    harness.write_json(args.out, rows)


if __name__ == "__main__":
  main()
