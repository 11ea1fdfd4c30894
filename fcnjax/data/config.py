"""Every data option with its default, and the checks that run before any file is touched.

Experiments start from `default_config()` and override fields; the ConfigDict is locked, so a misspelt key is an
error rather than a silently ignored option.
"""
from __future__ import annotations

from typing import Any, Mapping

import ml_collections

SOURCES = ("synthetic", "tfds_pet", "folder")
LAYOUTS = ("auto", "liver", "pet", "images_masks", "voc")
MASK_MODES = ("labels", "binary")
PET_BORDER_MODES = ("class", "ignore", "pet")
ON_BAD_FILE = ("error", "skip")

# torchvision's ImageNet statistics, in [0, 1] units: every pretrained backbone in fcnjax expects them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_config() -> ml_collections.ConfigDict:
  """All data keys with their defaults (a small synthetic set that trains on a laptop CPU)."""
  c = ml_collections.ConfigDict()
  c.source = "synthetic"            # one of SOURCES
  c.num_classes = 4                 # synthetic and folder label maps; pet sets derive it from pet_border
  c.class_names = ()                # optional names (len == num_classes); defaults per source
  c.binary = False                  # 1-logit sigmoid model; needs exactly 2 classes, masks 0/1
  c.ignore_index = 255

  # synthetic: shapes on textured noise, class = shape type (background, circle, rectangle, triangle, cross)
  c.image_size = 64
  c.synthetic_train_examples = 2048
  c.synthetic_val_examples = 256
  c.synthetic_seed = 0              # the data itself; the training `seed` only orders and augments it
  c.synthetic_random_colour = 0.25  # fraction of shapes drawn in a random colour, not their class's hue

  # tfds_pet: Oxford-IIIT Pet through tfds.data_source (array_record files, no TensorFlow)
  c.tfds_name = "oxford_iiit_pet"
  c.tfds_data_dir = ""              # '' = TFDS_DATA_DIR or ~/tensorflow_datasets
  c.tfds_train_split = "train"
  c.tfds_validation_split = "test"  # the pet set has no validation split; its test split is the usual benchmark
  c.pet_border = "ignore"           # trimap border pixels: 'class' (own class 2), 'ignore', or 'pet'

  # folder: files on disk
  c.root = ""
  c.layout = "auto"                 # one of LAYOUTS
  c.mask_mode = "labels"            # 'labels': pixel value = class id; 'binary': value > 127 -> 1
  c.val_count = 0                   # for layouts without a split: the last val_count files (sorted) validate...
  c.val_fraction = 0.1              # ...or, when val_count is 0, the last round(val_fraction * n) of them
  c.validate = True                 # check every file of the split before the first step (folder sources)
  c.on_bad_file = "error"           # 'error' stops at a bad file; 'skip' logs it and leaves it out (at the check
                                    # before the first step, or when it changes during the run)

  # training transforms (numpy, per-example RNG from (seed, global example index))
  c.crop_size = 0                   # square crop; 0 = the native size of a fixed-size set
  c.scale_range = (1.0, 1.0)        # random rescale factor, drawn uniformly
  c.hflip = True
  c.vflip = False                   # vertical flips and 90-degree rotations suit EM/medical data, not photos
  c.rot90 = False
  c.elastic = False                 # U-Net paper's elastic deformation (fcnjax/data/elastic.py)
  c.elastic_sigma = 10.0            # std of the control-point displacements, pixels (paper: 10)
  c.elastic_grid_points = 3         # control points per side, spanning the crop (paper: 3 x 3)
  c.border_weight = False           # batches get 'weight', the U-Net weight map (fcnjax/data/weight_map.py)
  c.border_w0 = 10.0                # paper: w0 = 10
  c.border_sigma = 5.0              # paper: sigma = 5 pixels
  c.border_class_weights = ()       # w_c per class; () = balanced on each mask, n / (K * n_k)
  c.mirror_padding = 0              # pixels mirrored onto each side of a training example before the crop, so
                                    # that its edge pixels train with the context --tile inference mirrors in
  c.ignore_margin = 0               # a training crop's outer pixels, on each side, that the loss ignores; pixels
                                    # by an image's edge are then untrained: infer with --tile, which mirror-pads
  c.mean = IMAGENET_MEAN
  c.std = IMAGENET_STD

  # evaluation
  c.eval_size = 0                   # images resized to eval_size x eval_size; 0 = native size of a fixed-size set
  c.eval_canvas = 0                 # masks sit top-left on an eval_canvas^2 canvas; 0 = the split's largest size

  # loading (grain)
  c.workers = 0                     # grain worker processes; 0 = in this process
  c.worker_buffer_size = 2          # batches buffered per worker
  c.read_threads = 2                # threads per process preparing batches ahead
  c.prefetch_batches = 4
  c.lock()
  return c


def resolve(cfg: Mapping[str, Any] | ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
  """Defaults overridden by `cfg` (a possibly partial data config), then checked; unknown keys are errors."""
  full = default_config()
  if cfg is not None:
    items = cfg.items() if hasattr(cfg, "items") else dict(cfg).items()
    for key, value in items:
      if key not in full:
        raise KeyError(f"unknown data config key {key!r}; known keys: {', '.join(sorted(full.keys()))}")
      try:
        full[key] = tuple(value) if isinstance(value, list) else value
      except TypeError as e:
        raise TypeError(f"data config key {key!r}: {e}") from e
  check(full)
  return full


def _one_of(cfg, key: str, allowed: tuple[str, ...]) -> None:
  if cfg[key] not in allowed:
    raise ValueError(f"data config {key}={cfg[key]!r}; expected one of {', '.join(map(repr, allowed))}")


def check(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the key whose value cannot work."""
  _one_of(cfg, "source", SOURCES)
  _one_of(cfg, "layout", LAYOUTS)
  _one_of(cfg, "mask_mode", MASK_MODES)
  _one_of(cfg, "pet_border", PET_BORDER_MODES)
  _one_of(cfg, "on_bad_file", ON_BAD_FILE)
  if not 0 <= cfg.ignore_index <= 255:
    raise ValueError(f"data config ignore_index={cfg.ignore_index}; masks are uint8, so it must be in [0, 255]")
  if cfg.source == "folder" and not cfg.root:
    raise ValueError("data config source='folder' needs root (the data folder)")
  if cfg.on_bad_file == "skip" and cfg.source == "folder" and not cfg.validate:
    # Skipping needs the list of bad files before the order of examples is fixed; at read time it is too late.
    raise ValueError("data config on_bad_file='skip' needs validate=True")
  if len(cfg.scale_range) != 2 or not 0 < cfg.scale_range[0] <= cfg.scale_range[1]:
    raise ValueError(f"data config scale_range={cfg.scale_range}; expected (low, high) with 0 < low <= high")
  for key in ("mean", "std"):
    if len(cfg[key]) != 3:
      raise ValueError(f"data config {key}={cfg[key]}; expected 3 values (R, G, B) in [0, 1] units")
  if min(cfg.std) <= 0:
    raise ValueError(f"data config std={cfg.std}; every value must be positive")
  for key in ("crop_size", "mirror_padding", "eval_size", "eval_canvas", "val_count", "workers", "read_threads",
              "prefetch_batches"):
    if cfg[key] < 0:
      raise ValueError(f"data config {key}={cfg[key]} must be >= 0")
  if cfg.elastic_sigma < 0 or cfg.elastic_grid_points < 2:
    raise ValueError(f"data config elastic_sigma={cfg.elastic_sigma}, elastic_grid_points="
                     f"{cfg.elastic_grid_points}; expected sigma >= 0 and at least 2 control points per side")
  if cfg.border_w0 < 0 or cfg.border_sigma <= 0:
    raise ValueError(f"data config border_w0={cfg.border_w0}, border_sigma={cfg.border_sigma}; expected w0 >= 0 "
                     "and sigma > 0")
  if any(w < 0 for w in cfg.border_class_weights):
    raise ValueError(f"data config border_class_weights={cfg.border_class_weights}; weights must be >= 0")
  if not 0.0 <= cfg.synthetic_random_colour <= 1.0:
    raise ValueError(f"data config synthetic_random_colour={cfg.synthetic_random_colour}; expected a fraction")
  if not 0.0 <= cfg.val_fraction < 1.0:
    raise ValueError(f"data config val_fraction={cfg.val_fraction}; expected a fraction in [0, 1)")
  if cfg.worker_buffer_size < 1:
    raise ValueError(f"data config worker_buffer_size={cfg.worker_buffer_size} must be >= 1")
