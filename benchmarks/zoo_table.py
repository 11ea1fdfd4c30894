"""The model zoo's sizes: parameters and forward-pass GFLOPs of every segmentation model, as the README's table gives them.

  python -m benchmarks.zoo_table                       # 21 classes, 520x520 (torchvision's evaluation size)
  python -m benchmarks.zoo_table --size 224 --num_classes 3

Parameters count the 'params' collection (BatchNorm statistics excluded, as torch's parameters() does). GFLOPs are
XLA's cost analysis of one image's forward pass in eval mode, every head included, traced in
fcnjax.ops.portable_forms() so that every convolution is one XLA operation whose FLOPs XLA counts (2 per
multiply-add), of the network as its reference computes it (harness.as_the_reference_computes). Nothing is
compiled or run: a few seconds per model.
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402 pylint: disable=g-import-not-at-top

# The segmentation models with their options (smp's models for each encoder the README lists).
MODELS = (
    ("fcn32s", {}), ("fcn16s", {}), ("fcn8s", {}), ("unet", {}),
    ("fcn_resnet50", {}), ("fcn_resnet101", {}), ("deeplabv3_resnet50", {}), ("deeplabv3_resnet101", {}),
    ("deeplabv3_mobilenet_v3_large", {}), ("lraspp_mobilenet_v3_large", {}),
    ("smp_unet", {"encoder": "resnet34"}), ("smp_deeplabv3plus", {"encoder": "resnet50"}),
)


def measure(name: str, options: dict, num_classes: int, size: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fcnjax import models  # pylint: disable=g-import-not-at-top
  from fcnjax.ops import portable_forms  # pylint: disable=g-import-not-at-top

  model = harness.as_the_reference_computes(models.build_model({"name": name, "num_classes": num_classes, **options}))
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  with portable_forms():
    try:
      variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    except ValueError:  # sizes in multiples of the output stride only (smp's DeepLabV3+): the nearest below
      size = size // 32 * 32
      images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
      variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, images)
  cost = lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(variables["params"]))
  label = name + "".join(f" ({v})" for v in options.values())
  return {"model": label, "parameters (M)": f"{params / 1e6:.2f}", "size": f"{size}x{size}",
          "GFLOPs": f"{cost.get('flops', float('nan')) / 1e9:.1f}"}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", type=int, default=520)
  parser.add_argument("--num_classes", type=int, default=21)
  args = parser.parse_args(argv)
  rows = [measure(name, options, args.num_classes, args.size) for name, options in MODELS]
  print(f"{args.num_classes} classes, one {args.size}x{args.size} image, eval mode, every head")
  print(harness.markdown_table(rows, list(rows[0])))


if __name__ == "__main__":
  main()
