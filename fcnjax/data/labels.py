"""From stored mask values to class ids, with the checks that catch a wrong mask format early.

Oxford-IIIT Pet trimaps store 1 = pet, 2 = background, 3 = border (the uncertain outline). fcnjax maps them to
class 0 = background, 1 = pet and, with pet_border='class', 2 = border; pet_border='ignore' makes the border
ignore_index, pet_border='pet' counts it as pet.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from fcnjax.data import io

TRIMAP_PET, TRIMAP_BACKGROUND, TRIMAP_BORDER = 1, 2, 3
BACKGROUND, PET, BORDER = 0, 1, 2


def pet_class_names(pet_border: str) -> tuple[str, ...]:
  return ("background", "pet", "border") if pet_border == "class" else ("background", "pet")


def trimap_lookup(pet_border: str, ignore_index: int) -> np.ndarray:
  """uint8 table: trimap value -> class id."""
  border = {"class": BORDER, "ignore": ignore_index, "pet": PET}[pet_border]
  table = np.zeros(256, np.uint8)
  table[[TRIMAP_PET, TRIMAP_BACKGROUND, TRIMAP_BORDER]] = [PET, BACKGROUND, border]
  return table


def trimap_to_labels(trimap: np.ndarray, pet_border: str, ignore_index: int = 255, name: str = "trimap") -> np.ndarray:
  """uint8 class ids from a pet trimap; values other than 1, 2, 3 are an error naming `name`."""
  return LabelSpec("trimap", num_classes=len(pet_class_names(pet_border)), ignore_index=ignore_index,
                   pet_border=pet_border).decode(trimap, name)


@dataclasses.dataclass(frozen=True)
class LabelSpec:
  """How one source's stored mask values become class ids (picklable: it travels to grain workers).

  kind: 'labels' (value = class id), 'binary' (> half range -> 1) or 'trimap' (Oxford-IIIT Pet).
  """
  kind: str
  num_classes: int
  ignore_index: int = 255
  pet_border: str = "ignore"

  def decode(self, values: np.ndarray, name: str) -> np.ndarray:
    """uint8 (H, W) class ids; raises io.BadFileError(name, ...) for values outside the label set."""
    if values.ndim == 3 and values.shape[-1] == 1:
      values = values[..., 0]
    if values.ndim != 2:
      raise io.BadFileError(name, f"mask has shape {values.shape}; expected (height, width)")
    if self.kind == "binary":
      return io.binarize(values)
    values = io.to_uint8_labels(values, name)
    if self.kind == "trimap":
      allowed = (TRIMAP_PET, TRIMAP_BACKGROUND, TRIMAP_BORDER)
      _check_values(values, allowed, name, "trimap values must be 1 (pet), 2 (background) or 3 (border)")
      return trimap_lookup(self.pet_border, self.ignore_index)[values]
    allowed = tuple(range(self.num_classes)) + (self.ignore_index,)
    _check_values(values, allowed, name,
                  f"labels must be in [0, {self.num_classes}) or ignore_index {self.ignore_index}")
    return values


def _check_values(values: np.ndarray, allowed: tuple[int, ...], name: str, expected: str) -> None:
  ok = np.zeros(256, bool)
  ok[list(allowed)] = True
  bad = ~ok[values]
  if bad.any():
    found = np.unique(values[bad])
    hint = " (0/255 masks need data.mask_mode='binary')" if 255 in found and 0 in allowed and 1 in allowed else ""
    raise io.BadFileError(name, f"mask has values {found[:10].tolist()}{' ...' if len(found) > 10 else ''} "
                                f"on {int(bad.sum())} pixels; {expected}{hint}")
