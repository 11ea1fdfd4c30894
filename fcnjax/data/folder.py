"""Segmentation data in folders: finding image/mask pairs for each layout, and reading them.

Layouts (data.layout):
  'liver'        NNN.png + NNN_mask.png side by side, in train/ and val/ subfolders (the liver U-Net tutorial) or
                 directly in root.
  'images_masks' images/ + masks/ with matching file stems (mask extension may differ), in train/ and val/
                 subfolders or directly in root.
  'pet'          the raw Oxford-IIIT Pet archives: images/*.jpg, annotations/trimaps/*.png, and the split lists
                 annotations/trainval.txt (train) and annotations/test.txt (validation).
  'voc'          PASCAL VOC 2012 (VOCdevkit/VOC2012): JPEGImages/*.jpg, SegmentationClass/*.png (palette indices =
                 class ids, 255 = void), and the split lists ImageSets/Segmentation/train.txt and val.txt.
  'auto'         the first of 'pet', 'voc', 'images_masks', 'liver' whose folders are present.

Where a layout has no split (no train/ val/ subfolders), the images are sorted by path and the LAST n go to
validation, n = data.val_count, or round(data.val_fraction * count) when val_count is 0 (at least 1). A contiguous
held-out block suits slice stacks (EM, CT), where neighbouring slices are near-copies of each other, and it does
not move when masks are fixed or files are skipped.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from absl import logging

from fcnjax.data import io
from fcnjax.data.labels import LabelSpec

TRAIN_DIRS = ("train", "training")
VAL_DIRS = ("val", "validation", "valid")
MASK_SUFFIX = "_mask"
VOC_SPLITS = Path("ImageSets") / "Segmentation"

# What data.root must hold, per layout: the missing-folder message tells the user.
LAYOUT_CONTENTS = {
    "images_masks": "images/ + masks/ with matching file names (e.g. images/00.png + masks/00.png), directly or in "
                    "train/ and val/",
    "liver": f"NNN.png + NNN{MASK_SUFFIX}.png files, directly or in train/ and val/",
    "pet": "the Oxford-IIIT Pet archives unpacked: images/*.jpg, annotations/trimaps/*.png, annotations/*.txt",
    "voc": "VOCdevkit/VOC2012: JPEGImages/, SegmentationClass/, ImageSets/Segmentation/",
    "auto": f"files in one of the layouts of data.layout (images/ + masks/, NNN.png + NNN{MASK_SUFFIX}.png, the Pet "
            "or VOC archives)",
}


class DataRootNotFoundError(FileNotFoundError):
  """data.root names no folder. A FileNotFoundError, so the command line prints its message as one line."""

  def __init__(self, root: str | os.PathLike, layout: str):
    root = str(root)
    where = "" if os.path.isabs(root) else f" (relative to the working directory {os.getcwd()})"
    contents = LAYOUT_CONTENTS.get(layout, LAYOUT_CONTENTS["auto"])
    super().__init__(f"data.root={root}: no such folder{where}; set --config.data.root=DIR, a folder holding "
                     f"{contents} (layout {layout}; see the README's Data section)")
    self.root, self.layout = root, layout


def check_root(root: str | os.PathLike, layout: str) -> Path:
  """data.root as a Path; DataRootNotFoundError where it is not a folder."""
  if not Path(root).is_dir():
    raise DataRootNotFoundError(root, layout)
  return Path(root)


# With on_bad_file='skip', every example carries this key: -1, or for an example read in place of a pair whose file
# could not be read, 2 * (that pair's index) + (0 for its image, 1 for its mask); the loader counts and drops it.
UNREADABLE = "unreadable"


class FolderPairs:
  """Random-access sequence of {'image', 'mask'} read from (image path, mask path) pairs.

  `checked`: the files passed validate.check_pairs before the run, so one that fails to read now changed since
  (deleted or rewritten by a sync job or a user): its error says so, or with on_bad_file='skip' the next readable pair
  takes its place, marked with UNREADABLE so that it is counted and never scored twice.
  """

  def __init__(self, pairs: Sequence[tuple[str, str]], labels: LabelSpec, *, checked: bool = False,
               on_bad_file: str = "error"):
    self.pairs, self.labels, self.checked, self.on_bad_file = list(pairs), labels, checked, on_bad_file
    self._warned: set[str] = set()

  def __len__(self) -> int:
    return len(self.pairs)

  def name(self, index: int) -> str:
    return self.pairs[index][0]

  def unreadable_path(self, code: int) -> str:
    """The file an UNREADABLE code (>= 0) names."""
    return self.pairs[code // 2][code % 2]

  def _read(self, index: int) -> dict[str, np.ndarray]:
    image_path, mask_path = self.pairs[index]
    image = io.read_image(image_path)
    mask = self.labels.decode(io.read_mask_values(mask_path), mask_path)
    check_same_size(image_path, image.shape[:2], mask_path, mask.shape)
    return {"image": image, "mask": mask}

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    skip = self.on_bad_file == "skip"
    try:
      example = self._read(index)
    except io.BadFileError as e:
      if not self.checked:
        raise
      if not skip:
        raise io.BadFileError(e.path, f"{e.reason}; it passed the check before the first step, so it changed while "
                                      "the run was reading the data (deleted or rewritten): restore it, or set "
                                      "data.on_bad_file='skip' to leave such files out") from None
      return self._in_place_of(index, e)
    if skip:
      example[UNREADABLE] = np.int32(-1)
    return example

  def _in_place_of(self, index: int, error: io.BadFileError) -> dict[str, np.ndarray]:
    """The next readable pair after `index`, marked as read in place of the file that `error` names."""
    code = 2 * index + (1 if error.path == self.pairs[index][1] else 0)
    for offset in range(len(self.pairs)):
      if error.path not in self._warned:  # once per file and process: a file gone stays gone every epoch
        self._warned.add(error.path)
        logging.warning("skipping %s: %s; it was readable at the check before the first step "
                        "(data.on_bad_file='skip')", error.path, error.reason)
      try:
        example = self._read((index + offset + 1) % len(self.pairs))
      except io.BadFileError as e:
        error = e
        continue
      example[UNREADABLE] = np.int32(code)
      return example
    raise io.BadFileError(error.path, f"{error.reason}; no file of this split can be read any more")


def check_same_size(image_path: str, image_hw, mask_path: str, mask_hw) -> None:
  if tuple(image_hw) != tuple(mask_hw):
    raise io.BadFileError(mask_path, f"mask is {mask_hw[0]}x{mask_hw[1]} but its image {image_path} is "
                                     f"{image_hw[0]}x{image_hw[1]} (height x width)")


def _images_in(folder: Path) -> list[str]:
  images = io.list_images(folder)
  if not images:
    raise FileNotFoundError(f"{folder}: empty folder, no image files ({', '.join(io.IMAGE_EXTENSIONS)})")
  return images


def _subfolder(root: Path, names: Sequence[str]) -> Path | None:
  for name in names:
    if (root / name).is_dir():
      return root / name
  return None


def detect_layout(root: str | os.PathLike) -> str:
  root = check_root(root, "auto")
  if (root / "annotations" / "trimaps").is_dir():
    return "pet"
  if (root / VOC_SPLITS).is_dir() and (root / "SegmentationClass").is_dir():
    return "voc"
  for base in (root, _subfolder(root, TRAIN_DIRS)):
    if base is not None and (base / "images").is_dir() and (base / "masks").is_dir():
      return "images_masks"
  for base in (root, _subfolder(root, TRAIN_DIRS)):
    if base is not None and base.is_dir() and any(Path(p).stem.endswith(MASK_SUFFIX) for p in io.list_images(base)):
      return "liver"
  raise FileNotFoundError(
      f"data root {root}: cannot tell its layout; expected annotations/trimaps/ (pet), {VOC_SPLITS}/ + "
      f"SegmentationClass/ (voc), images/ + masks/ (images_masks) or NNN.png + NNN{MASK_SUFFIX}.png files (liver), "
      "directly or in a train/ subfolder; set data.layout")


def held_out_count(num_images: int, val_count: int, val_fraction: float) -> int:
  if val_count > 0:
    n = val_count
  elif val_fraction > 0:
    n = max(1, round(val_fraction * num_images))
  else:
    n = 0
  if n >= num_images:
    raise ValueError(f"{num_images} images cannot give {n} validation images and still leave some for training; "
                     "lower data.val_count / data.val_fraction")
  return n


def _split_off(images: list[str], split: str, val_count: int, val_fraction: float) -> list[str]:
  images = sorted(images)
  n = held_out_count(len(images), val_count, val_fraction)
  if split == "train":
    return images[:len(images) - n]
  if n == 0:
    raise ValueError("no validation images: set data.val_count or data.val_fraction (the folder has no split)")
  return images[len(images) - n:]


def _find_mask(folder: Path, stem: str) -> str | None:
  for ext in (".png",) + io.IMAGE_EXTENSIONS:
    candidate = folder / (stem + ext)
    if candidate.is_file():
      return str(candidate)
  return None


def _split_folder(root: Path, split: str) -> Path | None:
  """root/train or root/val (by any of their usual names) when the layout ships its own split."""
  if _subfolder(root, TRAIN_DIRS) is None:
    return None
  folder = _subfolder(root, TRAIN_DIRS if split == "train" else VAL_DIRS)
  if folder is None:
    raise FileNotFoundError(f"{root}: has a train folder but no {'/'.join(VAL_DIRS)} folder for validation")
  return folder


def _liver_pairs(root: Path, split: str, val_count: int, val_fraction: float):
  folder = _split_folder(root, split)
  images = [p for p in _images_in(folder or root) if not Path(p).stem.endswith(MASK_SUFFIX)]
  if not images:
    raise FileNotFoundError(f"{folder or root}: only mask files (*{MASK_SUFFIX}.*), no images")
  if folder is None:
    images = _split_off(images, split, val_count, val_fraction)
  return [(p, _find_mask(Path(p).parent, Path(p).stem + MASK_SUFFIX)) for p in images]


def _images_masks_pairs(root: Path, split: str, val_count: int, val_fraction: float):
  folder = _split_folder(root, split)
  base = folder or root
  for sub in ("images", "masks"):
    if not (base / sub).is_dir():
      raise FileNotFoundError(f"{base / sub}: no such folder (layout images_masks)")
  images = _images_in(base / "images")
  if folder is None:
    images = _split_off(images, split, val_count, val_fraction)
  return [(p, _find_mask(base / "masks", Path(p).stem)) for p in images]


def _listed_pairs(root: Path, list_file: Path, image_of, mask_of, layout: str) -> list[tuple[str, str | None]]:
  """(image, mask) of every name in a split list; image_of(name) and mask_of(name) are paths below root."""
  if not list_file.is_file():
    raise FileNotFoundError(f"{list_file}: missing; the {layout} layout takes its splits from the lists in "
                            f"{list_file.parent}")
  # Pet lines are 'Abyssinian_100 1 1 1' (name, class id, species, breed id), VOC lines a name; '#' lines are comments.
  names = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip() and not line.startswith("#")]
  if not names:
    raise FileNotFoundError(f"{list_file}: lists no images")
  pairs = []
  for name in names:
    image, mask = root / image_of(name), root / mask_of(name)
    if not image.is_file():
      raise FileNotFoundError(f"{image}: listed in {list_file} but missing")
    pairs.append((str(image), str(mask) if mask.is_file() else None))
  return pairs


def _pet_pairs(root: Path, split: str):
  list_file = root / "annotations" / ("trainval.txt" if split == "train" else "test.txt")
  return _listed_pairs(root, list_file, lambda name: Path("images") / f"{name}.jpg",
                       lambda name: Path("annotations") / "trimaps" / f"{name}.png", "pet")


def _voc_pairs(root: Path, split: str):
  list_file = root / VOC_SPLITS / ("train.txt" if split == "train" else "val.txt")
  return _listed_pairs(root, list_file, lambda name: Path("JPEGImages") / f"{name}.jpg",
                       lambda name: Path("SegmentationClass") / f"{name}.png", "voc")


def find_pairs(root: str | os.PathLike, layout: str, split: str, *, val_count: int = 0,
               val_fraction: float = 0.1) -> list[tuple[str, str | None]]:
  """(image, mask) paths of one split, in a fixed order; mask is None where the image has no mask."""
  if split not in ("train", "validation"):
    raise ValueError(f"folder split {split!r}; expected 'train' or 'validation'")
  root = check_root(root, layout)
  layout = detect_layout(root) if layout == "auto" else layout
  if layout == "liver":
    return _liver_pairs(root, split, val_count, val_fraction)
  if layout == "images_masks":
    return _images_masks_pairs(root, split, val_count, val_fraction)
  if layout == "pet":
    return _pet_pairs(root, split)
  if layout == "voc":
    return _voc_pairs(root, split)
  raise ValueError(f"data.layout={layout!r}; expected auto, liver, images_masks, pet or voc")
