"""The pass over a split's files that runs before the first step, so that a bad file stops a run at once rather
than hours in -- or, with on_bad_file='skip', is left out and reported.

Each image is decoded (JPEGs at 1/8 scale: enough to find truncation), each mask fully (its values are checked).
Files are checked in threads: PIL and zlib release the GIL while decoding.
"""
from __future__ import annotations

import concurrent.futures
import os
from typing import NamedTuple, Sequence

import numpy as np
from absl import logging

from fcnjax.data import io
from fcnjax.data.folder import check_same_size
from fcnjax.data.labels import LabelSpec

_MAX_LISTED = 20


class BadFile(NamedTuple):
  path: str
  reason: str

  def __str__(self) -> str:
    return f"{self.path}: {self.reason}"


class Checked(NamedTuple):
  pairs: list[tuple[str, str]]       # the usable pairs, in their original order
  sizes: list[tuple[int, int]]       # (height, width) of each usable pair
  skipped: list[BadFile]


def format_list(items: Sequence[str]) -> str:
  shown = "\n  ".join(items[:_MAX_LISTED])
  more = f"\n  ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
  return f"\n  {shown}{more}"


def check_pair(image_path: str, mask_path: str, labels: LabelSpec) -> tuple[int, int, bool]:
  """(height, width, mask_is_0_255) of a usable pair; raises io.BadFileError naming the bad file."""
  size = io.check_image_file(image_path)
  values = io.read_mask_values(mask_path)
  mask = labels.decode(values, mask_path)
  check_same_size(image_path, size, mask_path, mask.shape)
  looks_binary = (labels.kind == "labels" and values.dtype == np.uint8 and bool((values == 255).any())
                  and bool(np.isin(values, (0, 255)).all()))
  return size[0], size[1], looks_binary


def _check_or_fail(args):
  image_path, mask_path, labels = args
  try:
    return check_pair(image_path, mask_path, labels)
  except io.BadFileError as e:
    return BadFile(e.path, e.reason)


def check_pairs(pairs: Sequence[tuple[str, str | None]], labels: LabelSpec, *, on_bad_file: str = "error",
                what: str = "data", num_threads: int | None = None) -> Checked:
  """Checks every pair; 'error' raises one error listing every bad file, 'skip' logs and drops them."""
  missing = [image for image, mask in pairs if mask is None]
  present = [(image, mask) for image, mask in pairs if mask is not None]
  if missing and on_bad_file == "error":
    raise FileNotFoundError(f"{what}: {len(missing)} images have no mask:{format_list(missing)}")
  skipped = [BadFile(image, "no mask file found") for image in missing]
  num_threads = num_threads or min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    results = list(pool.map(_check_or_fail, [(image, mask, labels) for image, mask in present]))
  bad = [r for r in results if isinstance(r, BadFile)]
  if bad and on_bad_file == "error":
    first = bad[0]
    others = f"; {len(bad) - 1} more bad files:{format_list([str(b) for b in bad[1:]])}" if len(bad) > 1 else ""
    raise io.BadFileError(first.path, first.reason + others)
  skipped += bad
  for item in skipped:
    logging.warning("%s: skipping %s: %s", what, item.path, item.reason)
  kept = [(pair, r) for pair, r in zip(present, results) if not isinstance(r, BadFile)]
  if not kept:
    raise ValueError(f"{what}: no usable image/mask pairs left ({len(skipped)} skipped)")
  if all(r[2] for _, r in kept):
    logging.warning("%s: every mask holds only 0 and 255 while mask_mode='labels', so 255 is read as "
                    "ignore_index %d; for 0/255 binary masks set data.mask_mode='binary'", what, labels.ignore_index)
  return Checked(pairs=[pair for pair, _ in kept], sizes=[(r[0], r[1]) for _, r in kept], skipped=skipped)
