"""Reading images and masks from disk; every error names the file and what is wrong with it."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm")


class BadFileError(ValueError):
  """A file that cannot be used; `path` and `reason` are kept apart so that skip mode can report them."""

  def __init__(self, path: str | os.PathLike, reason: str):
    self.path = str(path)
    self.reason = reason
    super().__init__(f"{self.path}: {reason}")

  def __reduce__(self):
    # A grain worker process sends its error to the main one pickled; the default would call cls(message).
    return type(self), (self.path, self.reason)


def is_image_file(path: str | os.PathLike) -> bool:
  name = os.path.basename(str(path))
  # macOS AppleDouble files ('._x.png', shipped inside the Oxford-IIIT Pet archives) look like images but are not.
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_images(directory: str | os.PathLike) -> list[str]:
  """Sorted paths of the image files directly inside `directory`."""
  directory = Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"{directory}: no such folder")
  return sorted(str(p) for p in directory.iterdir() if p.is_file() and is_image_file(p))


def find_mask(mask_dir: str | os.PathLike | None, image_path: str) -> str | None:
  """The mask of `image_path` in `mask_dir`: the file with the image's stem, or STEM_mask (None when absent)."""
  if not mask_dir:
    return None
  stem = os.path.splitext(os.path.basename(image_path))[0]
  for candidate in sorted(os.listdir(mask_dir)):
    if os.path.splitext(candidate)[0] in (stem, f"{stem}_mask"):
      return os.path.join(mask_dir, candidate)
  return None


def _open(path) -> Image.Image:
  try:
    return Image.open(path)
  except FileNotFoundError:
    raise BadFileError(path, "no such file") from None
  except UnidentifiedImageError:
    raise BadFileError(path, "not an image file (PIL cannot identify its format)") from None
  except OSError as e:
    raise BadFileError(path, f"truncated or corrupt image file, cannot be opened: {e}") from None


def _decode(path, img: Image.Image) -> Image.Image:
  try:
    img.load()
  except (OSError, SyntaxError, ValueError) as e:
    raise BadFileError(path, f"truncated or corrupt {img.format} file: {e}") from None
  return img


def image_size(path: str | os.PathLike) -> tuple[int, int]:
  """(height, width) from the file header only."""
  with _open(path) as img:
    return img.height, img.width


def check_image_file(path: str | os.PathLike) -> tuple[int, int]:
  """(height, width) of a decodable image; raises BadFileError for a truncated or non-image file.

  JPEGs are decoded at 1/8 scale (PIL's draft mode): the whole entropy-coded stream is still read, so truncation
  is caught, at a fraction of the cost of a full decode -- the validation pass must stay fast on thousands of files.
  """
  with _open(path) as img:
    size = img.height, img.width
    if img.format == "JPEG":
      img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
    _decode(path, img)
  return size


def read_image(path: str | os.PathLike) -> np.ndarray:
  """uint8 (H, W, 3). Grey, palette, 16-bit and RGBA images become RGB.

  EXIF orientation is deliberately not applied: annotation masks are drawn on the stored pixel grid.
  """
  with _open(path) as img:
    _decode(path, img)
    if img.mode in ("I;16", "I;16B", "I;16L"):
      # 16-bit grey (microscopy, CT): keep the top 8 bits, i.e. scale the full range to [0, 255].
      grey = (np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8)
      return np.repeat(grey[..., None], 3, axis=-1)
    if img.mode != "RGB":
      img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def read_mask_values(path: str | os.PathLike) -> np.ndarray:
  """The stored values of a mask as an (H, W) integer array.

  Palette PNGs (VOC style) give their palette indices, which are the class ids. A 3-channel mask is accepted only
  when its channels agree (a grey mask saved as RGB); a colour-coded mask is an error, not a guess.
  """
  with _open(path) as img:
    _decode(path, img)
    mode = img.mode
    if mode == "1":
      return np.asarray(img, dtype=np.uint8) * 255
    if mode in ("LA", "PA"):
      img = img.getchannel(0)
    values = np.asarray(img)
  if values.ndim == 3:
    channels = values[..., :3]
    if not (np.array_equal(channels[..., 0], channels[..., 1]) and np.array_equal(channels[..., 0], channels[..., 2])):
      colours = np.unique(channels.reshape(-1, 3), axis=0)
      raise BadFileError(
          path, f"is an {mode} mask whose channels differ ({len(colours)} colours, e.g. {colours[:3].tolist()}); "
          "expected a single-channel label map of class ids (or a grey mask)")
    values = channels[..., 0]
  return values


def binarize(values: np.ndarray) -> np.ndarray:
  """0/1 uint8: 1 where the value is above half the range of its dtype (> 127 for 8-bit masks)."""
  threshold = 127 if values.dtype in (np.uint8, np.bool_) else np.iinfo(values.dtype).max // 2
  return (values > threshold).astype(np.uint8)


def to_uint8_labels(values: np.ndarray, path) -> np.ndarray:
  if values.dtype == np.uint8:
    return values
  if values.size and (values.min() < 0 or values.max() > 255):
    raise BadFileError(path, f"label values span [{values.min()}, {values.max()}]; class ids must fit in uint8")
  return values.astype(np.uint8)


def read_mask(path: str | os.PathLike, mode: str = "labels") -> np.ndarray:
  """uint8 (H, W). mode 'labels': stored value = class id; 'binary': value above half range -> 1, else 0."""
  values = read_mask_values(path)
  if mode == "binary":
    return binarize(values)
  if mode != "labels":
    raise ValueError(f"read_mask mode={mode!r}; expected 'labels' or 'binary'")
  return to_uint8_labels(values, path)
