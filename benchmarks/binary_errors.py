"""Where a binary segmentation run's validation errors lie: how far each wrong pixel is from the true boundary, and
the pixel error at other logit thresholds.

    python -m benchmarks.binary_errors --workdir runs/isbi_unet [--tile 256] [--tta d4] [--checkpoint best]

For every validation image of the run (its data config's split) the logits come from fcnjax.Segmenter, as
`fcnjax.evaluate` computes them. A pixel's distance to the boundary is its Euclidean distance to the nearest pixel
of the other true class (1: it touches the other class). An error at distance 1 or 2 is a boundary drawn a pixel
or two off, which on the ISBI membranes (2-5 pixels wide) is within the labels' own uncertainty; errors far from
any boundary are whole structures missed or invented. The thresholds here are scored on the validation images
themselves, a diagnosis, not a tuning; `fcnjax.evaluate --threshold train` chooses one on the training images.
"""
from __future__ import annotations

import argparse

import numpy as np
import scipy.ndimage

from fcnjax import inference
from fcnjax.data import sources
from fcnjax.segmenter import Segmenter

# (label, lowest, highest distance in pixels); distances are 1, sqrt(2), 2, sqrt(5), ...
DISTANCE_BINS = (("1", 1, 1), ("1.4-2", 1.1, 2), ("2.2-3", 2.1, 3), ("> 3", 3.1, np.inf))
THRESHOLDS = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0)


def distance_to_other_class(mask: np.ndarray) -> np.ndarray:
  """Per pixel, the Euclidean distance to the nearest pixel of the other class of a binary (H, W) mask."""
  foreground = mask.astype(bool)
  return np.where(foreground, scipy.ndimage.distance_transform_edt(foreground),
                  scipy.ndimage.distance_transform_edt(~foreground))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--checkpoint", default="best", choices=("best", "latest"))
  parser.add_argument("--tile", type=int, default=0)
  parser.add_argument("--tta", default="none", choices=inference.TTA_MODES)
  args = parser.parse_args()
  segmenter = Segmenter.from_run(args.workdir, args.checkpoint, tile=args.tile, tta=args.tta)
  examples = sources.load_split(segmenter.data_config, "validation").examples
  logits, truths = [], []
  for i in range(len(examples)):
    example = examples[i]  # a folder split reads the files on each access
    logits.append(segmenter.logits(example["image"])[..., 0])
    truths.append(example["mask"].astype(bool))
  if logits[0].ndim != 2:
    raise SystemExit(f"{args.workdir}: not a one-logit binary model")
  logits, truths = np.stack(logits), np.stack(truths)
  distances = np.stack([distance_to_other_class(t) for t in truths])
  wrong = (logits > 0) != truths
  total = truths.size
  print(f"{args.workdir} ({args.checkpoint}), {len(truths)} validation images, tile {args.tile}, tta {args.tta}: "
        f"pixel error {wrong.mean():.4f}")
  print("| distance to the true boundary (px) | share of pixels | share of errors | pixel error from them |")
  print("|---|---|---|---|")
  for label, low, high in DISTANCE_BINS:
    within = (distances >= low) & (distances <= high)
    print(f"| {label} | {within.mean():.3f} | {wrong[within].sum() / max(wrong.sum(), 1):.3f} | "
          f"{wrong[within].sum() / total:.4f} |")
  print("| logit threshold | pixel error | foreground share predicted (true: "
        f"{truths.mean():.3f}) |")
  print("|---|---|---|")
  for threshold in THRESHOLDS:
    predicted = logits > threshold
    print(f"| {threshold:+.2f} | {(predicted != truths).mean():.4f} | {predicted.mean():.3f} |")


if __name__ == "__main__":
  main()
