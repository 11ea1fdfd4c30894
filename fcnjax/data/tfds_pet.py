"""Oxford-IIIT Pet through `tfds.data_source`: random access to prepared array_record files, no TensorFlow.

Records hold 'image' (H, W, 3) uint8 and 'segmentation_mask' (H, W, 1) uint8 trimap (1 pet, 2 background,
3 border); labels.LabelSpec('trimap') maps them to class ids.
"""
from __future__ import annotations

import numpy as np

from fcnjax.data import io
from fcnjax.data.labels import LabelSpec

HOW_TO_GET = (
    "tfds.data_source reads array_record files, which must be prepared beforehand. On a machine with internet "
    "access and TensorFlow, run\n"
    "  python -c \"import tensorflow_datasets as tfds; "
    "tfds.builder('{name}', data_dir={data_dir!r}).download_and_prepare(file_format='array_record')\"\n"
    "and copy the data_dir folder here (set data.tfds_data_dir to it). Or download the raw archives "
    "(images.tar.gz, annotations.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/), unpack them into one "
    "folder and use data.source='folder', data.layout='pet', data.root=<that folder>.")


def open_split(name: str, split: str, data_dir: str | None):
  """The tfds data source of one split; a clear error, with instructions, when the data is not prepared."""
  import tensorflow_datasets as tfds  # a slow import, needed only for this source
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises several types (NotImplementedError for TFRECORD, AssertionError, ...)
    where = data_dir or "TFDS_DATA_DIR or ~/tensorflow_datasets"
    raise FileNotFoundError(
        f"tfds dataset {name!r} split {split!r} is not available as array_record files in {where} "
        f"({type(e).__name__}: {e}).\n" + HOW_TO_GET.format(name=name, data_dir=data_dir or "~/tensorflow_datasets")
    ) from e


class TfdsPetRecords:
  """Random-access sequence of {'image', 'mask'} over a tfds pet data source."""

  def __init__(self, source, *, labels: LabelSpec, split: str):
    self.source, self.labels, self.split = source, labels, split

  def __len__(self) -> int:
    return len(self.source)

  def name(self, index: int) -> str:
    return f"tfds {self.split}[{index}]"

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    record = self.source[int(index)]
    file_name = record.get("file_name", b"")
    file_name = file_name.decode() if isinstance(file_name, bytes) else str(file_name)
    name = f"{self.name(index)} ({file_name})" if file_name else self.name(index)
    image = np.asarray(record["image"], np.uint8)
    if image.ndim == 3 and image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
      raise io.BadFileError(name, f"image has shape {image.shape}; expected (height, width, 3)")
    mask = self.labels.decode(np.asarray(record["segmentation_mask"]), name)
    if mask.shape != image.shape[:2]:
      raise io.BadFileError(name, f"image is {image.shape[0]}x{image.shape[1]} but its mask is "
                                  f"{mask.shape[0]}x{mask.shape[1]} (height x width)")
    return {"image": image, "mask": mask}
