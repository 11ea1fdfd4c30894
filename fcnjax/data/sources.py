"""cfg.source -> the examples of one split ('train' or 'validation'), plus what is known about their sizes."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Any, NamedTuple, Sequence

from fcnjax.data import folder, io, labels, synthetic, tfds_pet, validate
from fcnjax.data.config import resolve

SPLITS = ("train", "validation")


class DatasetInfo(NamedTuple):
  """What the model and the metrics need to know about the labels.

  num_classes counts the classes of the masks (2 for a binary set); a binary set is trained as one sigmoid logit
  (model output channels = 1 if binary else num_classes) on masks of 0/1.
  """
  num_classes: int
  class_names: list[str]
  ignore_index: int
  binary: bool


@dataclasses.dataclass
class Split:
  examples: Any                              # len(), [i] -> {'image': uint8 (H, W, 3), 'mask': uint8 (H, W)}, name(i)
  sizes: list[tuple[int, int]] | None        # (height, width) per example, when known without decoding
  skipped_files: list[validate.BadFile] = dataclasses.field(default_factory=list)

  @property
  def fixed_size(self) -> tuple[int, int] | None:
    """The common (height, width) of a fixed-size set, else None."""
    if not self.sizes or any(s != self.sizes[0] for s in self.sizes):
      return None
    return tuple(self.sizes[0])

  @property
  def max_size(self) -> tuple[int, int] | None:
    if not self.sizes:
      return None
    return max(h for h, _ in self.sizes), max(w for _, w in self.sizes)


def _folder_layout(cfg) -> str:
  return folder.detect_layout(cfg.root) if cfg.layout == "auto" else cfg.layout


def label_spec(cfg) -> labels.LabelSpec:
  if cfg.source == "tfds_pet" or (cfg.source == "folder" and _folder_layout(cfg) == "pet"):
    return labels.LabelSpec("trimap", len(labels.pet_class_names(cfg.pet_border)), cfg.ignore_index, cfg.pet_border)
  if cfg.source == "folder" and cfg.mask_mode == "binary":
    return labels.LabelSpec("binary", 2, cfg.ignore_index)
  return labels.LabelSpec("labels", cfg.num_classes, cfg.ignore_index)


def _default_class_names(cfg, spec: labels.LabelSpec) -> tuple[str, ...]:
  if spec.kind == "trimap":
    return labels.pet_class_names(cfg.pet_border)
  if spec.kind == "binary":
    return ("background", "foreground")
  if cfg.source == "synthetic":
    return synthetic.CLASS_NAMES[:cfg.num_classes]
  return tuple(f"class_{i}" for i in range(spec.num_classes))


def dataset_info(cfg) -> DatasetInfo:
  cfg = resolve(cfg)
  spec = label_spec(cfg)
  names = tuple(cfg.class_names) or _default_class_names(cfg, spec)
  if len(names) != spec.num_classes:
    raise ValueError(f"data.class_names has {len(names)} names {names} for {spec.num_classes} classes")
  if spec.num_classes < 2:
    raise ValueError(f"data.num_classes={spec.num_classes}; segmentation needs at least 2 classes")
  if spec.num_classes > cfg.ignore_index and spec.kind == "labels":
    raise ValueError(f"data.num_classes={spec.num_classes} overlaps ignore_index={cfg.ignore_index}")
  if cfg.binary and spec.num_classes != 2:
    raise ValueError(f"data.binary=True needs exactly 2 classes (masks 0/1), got {spec.num_classes}")
  return DatasetInfo(num_classes=spec.num_classes, class_names=list(names), ignore_index=cfg.ignore_index,
                     binary=bool(cfg.binary))


def _header_sizes(paths: Sequence[str]) -> list[tuple[int, int]]:
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    return list(pool.map(io.image_size, paths))


def _folder_split(cfg, split: str) -> Split:
  spec = label_spec(cfg)
  pairs = folder.find_pairs(cfg.root, _folder_layout(cfg), split, val_count=cfg.val_count,
                            val_fraction=cfg.val_fraction)
  what = f"{cfg.root} ({split})"
  if cfg.validate:
    checked = validate.check_pairs(pairs, spec, on_bad_file=cfg.on_bad_file, what=what)
    return Split(folder.FolderPairs(checked.pairs, spec, checked=True, on_bad_file=cfg.on_bad_file), checked.sizes,
                 checked.skipped)
  missing = [image for image, mask in pairs if mask is None]
  if missing:  # found while listing, so reported even without the validation pass
    raise FileNotFoundError(f"{what}: {len(missing)} images have no mask:{validate.format_list(missing)}")
  return Split(folder.FolderPairs(pairs, spec), _header_sizes([image for image, _ in pairs]))


def load_split(cfg, split: str) -> Split:
  """The examples of `split` for a resolved data config."""
  if split not in SPLITS:
    raise ValueError(f"data split {split!r}; expected one of {SPLITS}")
  dataset_info(cfg)  # the label settings are checked before any file is read
  if cfg.source == "synthetic":
    count = cfg.synthetic_train_examples if split == "train" else cfg.synthetic_val_examples
    examples = synthetic.SyntheticShapes(split=split, num_examples=count, size=cfg.image_size,
                                         num_classes=cfg.num_classes, seed=cfg.synthetic_seed,
                                         random_colour=cfg.synthetic_random_colour)
    return Split(examples, [(cfg.image_size, cfg.image_size)] * count)
  if cfg.source == "tfds_pet":
    tfds_split = cfg.tfds_train_split if split == "train" else cfg.tfds_validation_split
    source = tfds_pet.open_split(cfg.tfds_name, tfds_split, cfg.tfds_data_dir or None)
    # tfds images vary in size and are only known by decoding them, so sizes stay unknown.
    return Split(tfds_pet.TfdsPetRecords(source, labels=label_spec(cfg), split=tfds_split), None)
  return _folder_split(cfg, split)
