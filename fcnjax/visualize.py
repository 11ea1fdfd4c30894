"""Colour masks, overlays and image | prediction | ground truth panels, as uint8 arrays and PNG files."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image


def palette(num_colors: int = 256) -> np.ndarray:
  """The PASCAL VOC colour map (bit-interleaved), the palette segmentation tools use: 0 is black."""
  colors = np.zeros((num_colors, 3), np.uint8)
  for i in range(num_colors):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    colors[i] = (r, g, b)
  return colors


def colorize(labels: np.ndarray, ignore_index: int = 255) -> np.ndarray:
  """(H, W) class ids -> (H, W, 3) colours; ignored pixels are white."""
  colors = palette()
  colors[ignore_index] = (255, 255, 255)
  return colors[np.asarray(labels, np.uint8)]


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
  """Blends class colours over the image; background (class 0) stays as the image."""
  colored = colorize(labels).astype(np.float32)
  blended = (1 - alpha) * image.astype(np.float32) + alpha * colored
  return np.where((labels > 0)[..., None], blended, image).astype(np.uint8)


def side_by_side(image: np.ndarray, prediction: np.ndarray, ground_truth: np.ndarray | None = None,
                 ignore_index: int = 255, gap: int = 4) -> np.ndarray:
  """image | prediction | ground truth (when given), with white gaps between the panels."""
  panels = [image, colorize(prediction, ignore_index)]
  if ground_truth is not None:
    panels.append(colorize(ground_truth, ignore_index))
  spacer = np.full((image.shape[0], gap, 3), 255, np.uint8)
  out = [panels[0]]
  for panel in panels[1:]:
    out += [spacer, panel]
  return np.concatenate(out, axis=1)


def write_prediction(out_dir: str, name: str, image: np.ndarray, prediction: np.ndarray,
                     ground_truth: np.ndarray | None, ignore_index: int) -> None:
  """NAME_mask.png (class ids, palette PNG), NAME_overlay.png and NAME_panel.png in `out_dir`."""
  os.makedirs(out_dir, exist_ok=True)
  mask_png = Image.fromarray(prediction, mode="P")
  mask_png.putpalette(palette().reshape(-1).tolist())
  mask_png.save(os.path.join(out_dir, f"{name}_mask.png"))
  Image.fromarray(overlay(image, prediction)).save(os.path.join(out_dir, f"{name}_overlay.png"))
  Image.fromarray(side_by_side(image, prediction, ground_truth, ignore_index)).save(
      os.path.join(out_dir, f"{name}_panel.png"))
