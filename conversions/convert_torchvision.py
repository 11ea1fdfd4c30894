"""torchvision (and segmentation_models_pytorch) .pth -> Flax variables directory for fcnjax.

  python conversions/convert_torchvision.py --arch vgg16 --pth vgg16-397923af.pth --out weights/vgg16
  python conversions/convert_torchvision.py --arch deeplabv3_resnet50 --pth deeplabv3_resnet50_coco-cd0a2569.pth \\
      --out weights/deeplabv3_resnet50_coco
  python conversions/convert_torchvision.py --arch smp_encoder --pth resnet34-b627a593.pth --in_channels 1 \\
      --out weights/resnet34_grey

The mapping itself lives in fcnjax.conversion (one function per architecture); this is the command-line front end.
It exits with status 1 and the converter's message (which names the missing, unexpected or mis-shaped keys) when the
file does not fit the architecture.
"""
from __future__ import annotations

import argparse
import inspect
import sys

import jax
import numpy as np

from fcnjax.conversion import CONVERTERS, ConversionError, get_converter, load_state_dict
from fcnjax.pretrained import save_variables


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--arch", required=True, choices=sorted(CONVERTERS), help="torchvision architecture")
  parser.add_argument("--pth", required=True, help="torchvision state_dict, e.g. vgg16-397923af.pth")
  parser.add_argument("--out", required=True, help="output directory (an orbax checkpoint of numpy arrays)")
  parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  parser.add_argument("--in_channels", type=int, default=None,
                      help="smp_encoder only: the smp model's input channels (default 3); the first convolution is "
                           "adapted as smp adapts ImageNet weights")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    state_dict = load_state_dict(args.pth)
    converter = get_converter(args.arch)
    options = {} if args.in_channels is None else {"in_channels": args.in_channels}
    if options and "in_channels" not in inspect.signature(converter).parameters:
      raise ConversionError(f"--in_channels applies to smp_encoder only, not --arch {args.arch}")
    variables = converter(state_dict, source=args.pth, **options)
    out = save_variables(args.out, variables, overwrite=args.overwrite)
  except ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except FileExistsError:
    print(f"error: {args.out} already exists; add --overwrite to replace it", file=sys.stderr)
    return 1
  print(f"converted {args.pth} ({args.arch}, {len(state_dict)} tensors in the state_dict)")
  for collection, tree in variables.items():
    leaves = jax.tree_util.tree_leaves(tree)
    print(f"  {collection}: {len(leaves)} arrays, {sum(int(np.size(leaf)) for leaf in leaves):,} values")
  print(f"wrote {out}\nuse it for the '{CONVERTERS[args.arch][1]}' model: config.model.pretrained = {out!r}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
