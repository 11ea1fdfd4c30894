"""A built-in set of shapes on textured noise, generated from (seed, split, index): no files, no downloads.

Each image has a smooth random background with pixel noise and 2-5 filled shapes drawn in random order, so later
shapes occlude earlier ones. The class of a pixel is the type of the shape on top (0 = background). Shape colours
lean towards one hue per class but are random for a fraction of the shapes (`random_colour`, a quarter by default),
so a model must use outline as well as colour: one that reads colour alone misclassifies about 2/3 of those.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

SHAPES = ("circle", "rectangle", "triangle", "cross")
CLASS_NAMES = ("background",) + SHAPES
_SPLIT_IDS = {"train": 0, "validation": 1}
# The colour each class leans towards (RGB); the background's colours are drawn away from all of them.
_CLASS_COLOURS = np.array([[220, 60, 50], [60, 190, 70], [60, 90, 220], [230, 200, 40]], np.float32)
_MIN_CONTRAST = 60.0   # RGB distance between a shape and the background mean, so every shape stays visible


def _circle(yy, xx, cy, cx, r, rng):
  return (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2


def _rectangle(yy, xx, cy, cx, r, rng):
  hy, hx = r * rng.uniform(0.55, 1.0, size=2)
  return (np.abs(yy - cy) <= hy) & (np.abs(xx - cx) <= hx)


def _triangle(yy, xx, cy, cx, r, rng):
  # Three vertices on a circle of radius 1.2 r; each arc between them is at least 0.3 pi, so no slivers.
  gaps = rng.uniform(0.5 * np.pi, 0.85 * np.pi, size=2)
  angles = rng.uniform(0, 2 * np.pi) + np.array([0.0, gaps[0], gaps[0] + gaps[1]])
  vy, vx = cy + r * 1.2 * np.sin(angles), cx + r * 1.2 * np.cos(angles)
  signs = []
  for i in range(3):
    j = (i + 1) % 3
    signs.append((vx[j] - vx[i]) * (yy - vy[i]) - (vy[j] - vy[i]) * (xx - vx[i]))
  signs = np.stack(signs)
  return np.all(signs >= 0, axis=0) | np.all(signs <= 0, axis=0)


def _cross(yy, xx, cy, cx, r, rng):
  arm = r * rng.uniform(0.3, 0.45)
  return (((np.abs(yy - cy) <= arm) & (np.abs(xx - cx) <= r)) |
          ((np.abs(xx - cx) <= arm) & (np.abs(yy - cy) <= r)))


_DRAW = (_circle, _rectangle, _triangle, _cross)


def _shape_colour(cls: int, background: np.ndarray, rng: np.random.Generator, random_colour: float) -> np.ndarray:
  for _ in range(20):
    if rng.random() >= random_colour:
      colour = _CLASS_COLOURS[cls - 1] + rng.normal(0, 25, size=3)
    else:
      colour = rng.uniform(0, 255, size=3)
    colour = np.clip(colour, 0, 255)
    if np.linalg.norm(colour - background) >= _MIN_CONTRAST:
      return colour
  return 255.0 - background   # the complement always contrasts


def make_example(seed: int, split: str, index: int, size: int, num_classes: int,
                 random_colour: float = 0.25) -> dict[str, np.ndarray]:
  """{'image': uint8 (size, size, 3), 'mask': uint8 (size, size)} for one (seed, split, index)."""
  rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
  # Colours come from a stream of their own, so that random_colour changes the colours and never the geometry.
  colour_rng = np.random.default_rng([seed, _SPLIT_IDS[split], index, 1])
  # Background: a smooth colour field (a 4x4 grid of dull colours, bilinearly upsampled) -- texture, not flat.
  grid = rng.uniform(60, 190, size=(4, 4, 3)).astype(np.uint8)
  background = np.asarray(Image.fromarray(grid).resize((size, size), Image.BILINEAR), np.float32)
  image = background.copy()
  mask = np.zeros((size, size), np.uint8)
  for _ in range(rng.integers(2, 6)):
    cls = int(rng.integers(1, num_classes))
    r = size * rng.uniform(0.11, 0.22)
    cy, cx = rng.uniform(r * 0.5, size - r * 0.5, size=2)
    # Every shape lies within 1.2 r of its centre: draw inside that box only.
    y0, x0 = max(0, int(cy - 1.2 * r) - 1), max(0, int(cx - 1.2 * r) - 1)
    y1, x1 = min(size, int(cy + 1.2 * r) + 2), min(size, int(cx + 1.2 * r) + 2)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    inside = _DRAW[cls - 1](yy, xx, cy, cx, r, rng)
    box = background[y0:y1, x0:x1]
    colour = _shape_colour(cls, box[inside].mean(axis=0) if inside.any() else box.mean(axis=(0, 1)),
                           colour_rng, random_colour)
    # A gentle shading gradient across each shape, so colour alone is never a flat, exact cue.
    shade = 1.0 + 0.15 * (yy[inside] - cy)[:, None] / size
    image[y0:y1, x0:x1][inside] = colour * shade
    mask[y0:y1, x0:x1][inside] = cls
  image = image + rng.normal(0, 12, size=image.shape)
  return {"image": np.clip(np.rint(image), 0, 255).astype(np.uint8), "mask": mask}


class SyntheticShapes:
  """Random-access sequence of synthetic examples (picklable, so grain workers can hold it)."""

  def __init__(self, *, split: str, num_examples: int, size: int, num_classes: int, seed: int = 0,
               random_colour: float = 0.25):
    if split not in _SPLIT_IDS:
      raise ValueError(f"synthetic split {split!r}; expected one of {sorted(_SPLIT_IDS)}")
    if not 2 <= num_classes <= len(CLASS_NAMES):
      raise ValueError(f"synthetic num_classes={num_classes}; expected 2..{len(CLASS_NAMES)} "
                       f"({', '.join(CLASS_NAMES)})")
    if size < 16:
      raise ValueError(f"synthetic image_size={size}; expected at least 16 pixels")
    self.split, self.num_examples, self.size, self.num_classes, self.seed = split, num_examples, size, num_classes, seed
    self.random_colour = random_colour

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < self.num_examples:
      raise IndexError(f"synthetic {self.split} index {index} out of range [0, {self.num_examples})")
    return make_example(self.seed, self.split, int(index), self.size, self.num_classes, self.random_colour)

  def name(self, index: int) -> str:
    return f"synthetic/{self.split}/{index}"
