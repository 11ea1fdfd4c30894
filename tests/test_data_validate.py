"""Bad input: every case stops before the first step with the file named, or is skipped and counted."""
import logging

import numpy as np
import pytest
from PIL import Image

from fcnjax import data


def _write_set(root, count=4, size=(12, 16), num_classes=3, image_ext="png"):
  rng = np.random.default_rng(0)
  for i in range(count):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, size + (3,)).astype(np.uint8)).save(root / "images" / f"{i}.{image_ext}")
    Image.fromarray(rng.integers(0, num_classes, size).astype(np.uint8)).save(root / "masks" / f"{i}.png")


def _cfg(root, **overrides):
  cfg = data.default_config()
  cfg.source, cfg.root, cfg.num_classes, cfg.val_count, cfg.crop_size, cfg.read_threads = (
      "folder", str(root), 3, 1, 8, 0)
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def _build(cfg):
  return data.build_train_data(cfg, batch_size=2, seed=0)


def _truncate(path, keep=0.5):
  content = path.read_bytes()
  path.write_bytes(content[:int(len(content) * keep)])


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_truncated_image(tmp_path, ext):
  _write_set(tmp_path, size=(48, 64), image_ext=ext)
  _truncate(tmp_path / "images" / f"1.{ext}", keep=0.8)   # the header is intact: only decoding finds it
  with pytest.raises(data.BadFileError, match=rf"images/1\.{ext}: truncated or corrupt"):
    _build(_cfg(tmp_path))


def test_non_image_file(tmp_path):
  _write_set(tmp_path)
  (tmp_path / "images" / "2.png").write_text("not a picture")
  with pytest.raises(data.BadFileError, match=r"images/2\.png: not an image file"):
    _build(_cfg(tmp_path))


def test_image_and_mask_of_different_sizes(tmp_path):
  _write_set(tmp_path)
  Image.fromarray(np.zeros((12, 15), np.uint8)).save(tmp_path / "masks" / "0.png")
  with pytest.raises(data.BadFileError, match=r"masks/0\.png: mask is 12x15 but its image .*images/0\.png is 12x16"):
    _build(_cfg(tmp_path))


def test_labels_outside_the_classes(tmp_path):
  _write_set(tmp_path)
  mask = np.zeros((12, 16), np.uint8)
  mask[0, :3] = [3, 7, 255]   # 3 and 7 are not classes of a 3-class set; 255 is ignore_index
  Image.fromarray(mask).save(tmp_path / "masks" / "1.png")
  with pytest.raises(data.BadFileError, match=r"masks/1\.png: mask has values \[3, 7\] on 2 pixels; labels must be "
                                              r"in \[0, 3\)"):
    _build(_cfg(tmp_path))


def test_rgb_mask_where_a_label_map_is_expected(tmp_path):
  _write_set(tmp_path)
  colour = np.zeros((12, 16, 3), np.uint8)
  colour[:6] = [128, 0, 0]   # a VOC-style colour mask
  Image.fromarray(colour).save(tmp_path / "masks" / "2.png")
  with pytest.raises(data.BadFileError, match=r"masks/2\.png: is an RGB mask whose channels differ"):
    _build(_cfg(tmp_path))


def test_empty_folder(tmp_path):
  (tmp_path / "images").mkdir()
  (tmp_path / "masks").mkdir()
  with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'images'}: empty folder"):
    _build(_cfg(tmp_path, layout="images_masks"))


def test_images_missing_their_masks_are_listed(tmp_path):
  _write_set(tmp_path, count=5)
  (tmp_path / "masks" / "0.png").unlink()
  (tmp_path / "masks" / "3.png").unlink()
  with pytest.raises(FileNotFoundError, match=r"2 images have no mask:\s+\S+images/0\.png\s+\S+images/3\.png"):
    _build(_cfg(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"images/3\.png"):   # found while listing, even without validation
    _build(_cfg(tmp_path, validate=False))


def test_error_lists_every_bad_file(tmp_path):
  _write_set(tmp_path, count=5)
  _truncate(tmp_path / "images" / "0.png")
  (tmp_path / "images" / "2.png").write_text("x")
  with pytest.raises(data.BadFileError, match=r"(?s)images/0\.png: truncated.*1 more bad files:.*images/2\.png"):
    _build(_cfg(tmp_path))


def test_skip_mode_logs_and_counts(tmp_path, caplog):
  _write_set(tmp_path, count=8)
  _truncate(tmp_path / "images" / "1.png")
  Image.fromarray(np.full((12, 16), 9, np.uint8)).save(tmp_path / "masks" / "2.png")
  (tmp_path / "masks" / "4.png").unlink()
  with caplog.at_level(logging.WARNING):
    train = _build(_cfg(tmp_path, on_bad_file="skip"))
  assert train.num_examples == 7 - 3   # 8 files, the last validates, 3 bad ones skipped
  assert sorted(b.path.rsplit("/", 2)[-2:][1] for b in train.skipped_files) == ["1.png", "2.png", "4.png"]
  reasons = {b.path.rsplit("/", 1)[-1]: b.reason for b in train.skipped_files}
  assert "truncated" in reasons["1.png"] and "values [9]" in reasons["2.png"] and "no mask" in reasons["4.png"]
  for name in ("images/1.png", "masks/2.png", "images/4.png"):
    assert name in caplog.text
  assert next(train.iterator(0))["image"].shape == (2, 8, 8, 3)
  with pytest.raises(ValueError, match="validate=True"):
    _build(_cfg(tmp_path, on_bad_file="skip", validate=False))


def test_without_validation_bad_files_fail_at_read_time_by_name(tmp_path):
  _write_set(tmp_path, count=3)
  Image.fromarray(np.full((12, 16), 5, np.uint8)).save(tmp_path / "masks" / "0.png")
  train = _build(_cfg(tmp_path, validate=False, val_count=0, val_fraction=0.0))   # built without reading masks
  with pytest.raises(data.BadFileError, match=r"masks/0\.png: mask has values \[5\]"):
    for _ in zip(range(2), train.iterator(0)):
      pass


def test_read_image_errors_name_the_file(tmp_path):
  (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  with pytest.raises(data.BadFileError, match=r"a\.png"):
    data.read_image(tmp_path / "a.png")
  with pytest.raises(data.BadFileError, match=r"missing\.png: no such file"):
    data.read_image(tmp_path / "missing.png")
