"""Elastic deformation of an image and its mask, as in the U-Net paper (Ronneberger et al. 2015, section 3.1).

"We generate smooth deformations using random displacement vectors on a coarse 3 by 3 grid. The displacements are
sampled from a Gaussian distribution with 10 pixels standard deviation. Per-pixel displacements are then computed
using bicubic interpolation." `displacement_field` does exactly that: grid_points x grid_points control points
span the crop corner to corner, each draws a (dy, dx) ~ N(0, sigma^2) pixel displacement, and a cubic spline
(scipy.ndimage.map_coordinates, order 3) through them gives the per-pixel field. The field is in pixels whatever
the crop size, so the same sigma deforms a small crop more, relative to its size, than the whole slice.

`warp` samples the image bilinearly and the mask with nearest neighbour (class ids are never blended) at
(y + dy, x + dx). Where that point leaves the crop, both are mirrored (numpy 'symmetric' = scipy 'reflect'), the
extrapolation the paper uses at the image border and fcnjax.inference.predict_tiled uses for tiles: the mask keeps
its label set (no band of ignore pixels at every crop edge) and the image keeps membrane-like texture there.
Randomness comes only from the np.random.Generator passed in (the loader's per-example generator).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

# Paper values: 3 x 3 control points, 10-pixel standard deviation.
DEFAULT_GRID_POINTS = 3
DEFAULT_SIGMA = 10.0


def displacement_field(shape: tuple[int, int], rng: np.random.Generator, sigma: float = DEFAULT_SIGMA,
                       grid_points: int = DEFAULT_GRID_POINTS) -> np.ndarray:
  """float32 (2, H, W) per-pixel displacements (dy, dx) in pixels, smooth and exactly 0 when sigma is 0."""
  if grid_points < 2:
    raise ValueError(f"elastic: grid_points={grid_points}; at least 2 control points per axis are needed")
  if sigma < 0:
    raise ValueError(f"elastic: sigma={sigma} must be >= 0 (pixels)")
  h, w = shape
  coarse = rng.normal(0.0, 1.0, size=(2, grid_points, grid_points)) * sigma
  # The 2-D cubic spline is a tensor product, so field = B_h @ coarse @ B_w^T with B the 1-D spline through
  # each unit control vector: the same values as map_coordinates over the whole grid, at a fraction of the cost.
  rows, cols = _spline_basis(h, grid_points), _spline_basis(w, grid_points)
  return np.einsum("hi,cij,wj->chw", rows, coarse, cols).astype(np.float32)


def _spline_basis(length: int, grid_points: int) -> np.ndarray:
  """(length, grid_points): column j is the cubic spline through the unit vector e_j (mode 'mirror') sampled at
  length points spanning the control points end to end (pixel centres 0 and length - 1 on the outer ones)."""
  positions = np.linspace(0.0, grid_points - 1, length)[None]
  return np.stack([ndimage.map_coordinates(unit, positions, order=3, mode="mirror")
                   for unit in np.eye(grid_points)], axis=1)


def warp(image: np.ndarray, mask: np.ndarray, field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(image uint8 (H, W, C), mask uint8 (H, W)) sampled at (y + dy, x + dx): image bilinear, mask nearest."""
  h, w = mask.shape
  if image.shape[:2] != (h, w) or field.shape != (2, h, w):
    raise ValueError(f"elastic.warp: image {image.shape}, mask {mask.shape} and field {field.shape} must share "
                     "(H, W); field is (2, H, W)")
  coords = np.mgrid[0:h, 0:w].astype(np.float32) + field
  # Grey images arrive as 3 equal channels (io.read_image): warp one and repeat it, a third of the work.
  grey = all(np.array_equal(image[..., 0], image[..., c]) for c in range(1, image.shape[-1]))
  sources = image[..., :1] if grey else image
  channels = [ndimage.map_coordinates(sources[..., c].astype(np.float32), coords, order=1, mode="reflect")
              for c in range(sources.shape[-1])]
  warped_image = np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)
  if grey:
    warped_image = np.repeat(warped_image, image.shape[-1], axis=-1)
  warped_mask = ndimage.map_coordinates(mask, coords, order=0, mode="reflect").astype(mask.dtype)
  return warped_image, warped_mask


def elastic_deform(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, sigma: float = DEFAULT_SIGMA,
                   grid_points: int = DEFAULT_GRID_POINTS) -> tuple[np.ndarray, np.ndarray]:
  """One random smooth deformation applied alike to image (bilinear) and mask (nearest); same shapes out."""
  if image.ndim != 3 or mask.ndim != 2:
    raise ValueError(f"elastic_deform: expected image (H, W, C) and mask (H, W), got {image.shape} and {mask.shape}")
  field = displacement_field(mask.shape, rng, sigma=sigma, grid_points=grid_points)
  return warp(image, mask, field)
