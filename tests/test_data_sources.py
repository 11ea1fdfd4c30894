"""Sources: pet trimap mapping, tfds under mock_data, folder layouts on files written here and on ../shared/data."""
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcnjax import data
from fcnjax.data import folder, labels


def _save(path, array, mode=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array, mode).save(path)
  return str(path)


def _pair(rng, h, w, num_classes=3):
  image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
  mask = rng.integers(0, num_classes, (h, w)).astype(np.uint8)
  return image, mask


def _folder_cfg(root, **overrides):
  cfg = data.default_config()
  cfg.source, cfg.root, cfg.num_classes, cfg.read_threads = "folder", str(root), 3, 0
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


# ---------------------------------------------------------------------------------------------------------------
# Oxford-IIIT Pet trimaps (1 pet, 2 background, 3 border)

TRIMAP = np.array([[1, 2, 3], [3, 2, 1]], np.uint8)


@pytest.mark.parametrize("mode, want, names", [
    ("class", [[1, 0, 2], [2, 0, 1]], ["background", "pet", "border"]),
    ("ignore", [[1, 0, 255], [255, 0, 1]], ["background", "pet"]),
    ("pet", [[1, 0, 1], [1, 0, 1]], ["background", "pet"]),
])
def test_trimap_mapping(mode, want, names):
  np.testing.assert_array_equal(labels.trimap_to_labels(TRIMAP, mode, 255), want)
  cfg = data.default_config()
  cfg.source, cfg.pet_border = "tfds_pet", mode
  info = data.dataset_info(cfg)
  assert info.class_names == names and info.num_classes == len(names)


def test_trimap_values_outside_1_to_3_name_the_record():
  with pytest.raises(data.BadFileError, match=r"Abyssinian_1.*values \[0, 7\]"):
    labels.trimap_to_labels(np.array([[0, 1, 7]], np.uint8), "ignore", name="Abyssinian_1")


# ---------------------------------------------------------------------------------------------------------------
# tfds source under tfds.testing.mock_data. Its default random records have images and masks of unrelated sizes
# and random values, so the records are supplied through as_data_source_fn, which replaces
# DatasetBuilder.as_data_source -- what tfds.data_source calls.

def _pet_records(split, count=5):
  rng = np.random.default_rng(0 if split == "train" else 1)
  records = []
  for i in range(count):
    h, w = 20 + 3 * i, 31 - 2 * i
    records.append({"image": rng.integers(0, 256, (h, w, 3)).astype(np.uint8),
                    "segmentation_mask": rng.integers(1, 4, (h, w, 1)).astype(np.uint8),
                    "file_name": f"{split}_{i}.jpg", "label": 0, "species": 0})
  return records


@pytest.fixture
def mock_pet():
  tfds = pytest.importorskip("tensorflow_datasets")
  requested = []

  def as_data_source(builder, split, **kwargs):
    requested.append((builder.name, split))
    return _pet_records(split)

  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    yield requested


def test_tfds_pet_train_and_eval(mock_pet):
  cfg = data.default_config()
  cfg.source, cfg.pet_border, cfg.crop_size, cfg.eval_size, cfg.eval_canvas = "tfds_pet", "class", 16, 24, 40
  train = data.build_train_data(cfg, batch_size=2, seed=0)
  batch = next(train.iterator(0))
  assert train.num_examples == 5 and batch["image"].shape == (2, 16, 16, 3)
  assert set(np.unique(batch["mask"])) <= {0, 1, 2, 255}
  evald = data.build_eval_data(cfg, batch_size=2)
  batches = list(evald)
  assert ("oxford_iiit_pet", "train") in mock_pet and ("oxford_iiit_pet", "test") in mock_pet
  assert len(batches) == 3 and batches[0]["image"].shape == (2, 24, 24, 3) and batches[0]["mask"].shape == (2, 40, 40)
  for i, record in enumerate(_pet_records("test")):
    b, j = batches[i // 2], i % 2
    h, w = record["image"].shape[:2]
    np.testing.assert_array_equal(b["size"][j], [h, w])
    np.testing.assert_array_equal(b["mask"][j, :h, :w], np.array([0, 1, 0, 2])[record["segmentation_mask"][..., 0]])
    assert (b["mask"][j, h:] == 255).all() and (b["mask"][j, :, w:] == 255).all()


def test_tfds_pet_needs_a_crop_size_for_its_varied_sizes(mock_pet):
  cfg = data.default_config()
  cfg.source = "tfds_pet"
  with pytest.raises(ValueError, match="crop_size"):
    data.build_train_data(cfg, batch_size=2, seed=0)


def test_tfds_pet_absent_says_how_to_get_it(tmp_path):
  cfg = data.default_config()
  cfg.source, cfg.tfds_data_dir, cfg.crop_size = "tfds_pet", str(tmp_path / "no_tfds"), 16
  with pytest.raises(FileNotFoundError) as error:
    data.build_train_data(cfg, batch_size=2, seed=0)
  message = str(error.value)
  assert "download_and_prepare(file_format='array_record')" in message
  assert "layout='pet'" in message and str(tmp_path / "no_tfds") in message


# ---------------------------------------------------------------------------------------------------------------
# Folder layouts on small files


def _liver_folder(root, rng, sizes=((20, 24), (20, 24), (20, 24))):
  for sub in ("train", "val"):
    for i, (h, w) in enumerate(sizes):
      image, mask = _pair(rng, h, w, 2)
      _save(root / sub / f"{i:03d}.png", image)
      _save(root / sub / f"{i:03d}_mask.png", mask * 255)


def test_liver_layout_with_train_and_val_folders(tmp_path):
  _liver_folder(tmp_path, np.random.default_rng(0))
  cfg = _folder_cfg(tmp_path, mask_mode="binary", crop_size=16)
  assert folder.detect_layout(tmp_path) == "liver"
  assert data.dataset_info(cfg).class_names == ["background", "foreground"]
  pairs = folder.find_pairs(tmp_path, "auto", "validation")
  assert pairs == [(str(tmp_path / "val" / f"{i:03d}.png"), str(tmp_path / "val" / f"{i:03d}_mask.png"))
                   for i in range(3)]
  batch = next(data.build_train_data(cfg, batch_size=3, seed=0).iterator(0))
  assert batch["image"].shape == (3, 16, 16, 3) and set(np.unique(batch["mask"])) == {0, 1}
  evald = data.build_eval_data(cfg, batch_size=2)
  assert evald.canvas == (20, 24) and evald.eval_size is None and evald.num_examples == 3
  first = next(iter(evald))
  np.testing.assert_array_equal(first["mask"][0], np.asarray(Image.open(tmp_path / "val" / "000_mask.png")) > 127)


def test_flat_folder_split_takes_the_last_files_for_validation(tmp_path):
  rng = np.random.default_rng(1)
  for i in range(10):
    image, mask = _pair(rng, 8, 8)
    _save(tmp_path / "images" / f"{i:02d}.jpg", image)
    _save(tmp_path / "masks" / f"{i:02d}.png", mask)   # masks may use another extension
  assert folder.detect_layout(tmp_path) == "images_masks"
  val = folder.find_pairs(tmp_path, "images_masks", "validation", val_count=3)
  assert [Path(i).name for i, _ in val] == ["07.jpg", "08.jpg", "09.jpg"]
  assert [Path(m).name for _, m in val] == ["07.png", "08.png", "09.png"]
  train = folder.find_pairs(tmp_path, "images_masks", "train", val_fraction=0.2)   # round(0.2 * 10) = 2
  assert [Path(i).name for i, _ in train] == [f"{i:02d}.jpg" for i in range(8)]
  cfg = _folder_cfg(tmp_path, val_count=3)
  assert data.build_train_data(cfg, batch_size=2, seed=0).num_examples == 7
  assert data.build_eval_data(cfg, batch_size=2).num_examples == 3


def test_images_masks_label_maps_with_varied_sizes(tmp_path):
  rng = np.random.default_rng(2)
  sizes = [(10, 14), (16, 12), (12, 12), (9, 20)]
  for i, (h, w) in enumerate(sizes):
    image, mask = _pair(rng, h, w)
    _save(tmp_path / "images" / f"im{i}.png", image)
    _save(tmp_path / "masks" / f"im{i}.png", mask)
  cfg = _folder_cfg(tmp_path, val_count=2, eval_size=8, crop_size=8)
  evald = data.build_eval_data(cfg, batch_size=2)
  assert evald.canvas == (12, 20)   # the largest height and width of the validation split
  batch = next(iter(evald))
  np.testing.assert_array_equal(batch["size"], [[12, 12], [9, 20]])
  np.testing.assert_array_equal(batch["mask"][1, :9, :20], np.asarray(Image.open(tmp_path / "masks" / "im3.png")))
  cfg.eval_size = 0
  with pytest.raises(ValueError, match="eval_size"):
    data.build_eval_data(cfg, batch_size=2)


def test_raw_pet_layout(tmp_path):
  rng = np.random.default_rng(3)
  names = ["Abyssinian_1", "Abyssinian_2", "beagle_1", "beagle_2"]
  for name in names:
    image = rng.integers(0, 256, (12, 10, 3)).astype(np.uint8)
    _save(tmp_path / "images" / f"{name}.jpg", image)
    _save(tmp_path / "annotations" / "trimaps" / f"{name}.png", rng.integers(1, 4, (12, 10)).astype(np.uint8))
  (tmp_path / "annotations" / "trimaps" / "._Abyssinian_1.png").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble
  (tmp_path / "annotations" / "trainval.txt").write_text("Abyssinian_1 1 1 1\nbeagle_1 13 2 1\n")
  (tmp_path / "annotations" / "test.txt").write_text("Abyssinian_2 1 1 1\nbeagle_2 13 2 1\n")
  cfg = _folder_cfg(tmp_path, pet_border="pet", crop_size=8)
  assert folder.detect_layout(tmp_path) == "pet"
  assert data.dataset_info(cfg).num_classes == 2
  assert data.build_train_data(cfg, batch_size=2, seed=0).num_examples == 2
  batch = next(iter(data.build_eval_data(cfg, batch_size=2)))
  trimap = np.asarray(Image.open(tmp_path / "annotations" / "trimaps" / "beagle_2.png"))
  np.testing.assert_array_equal(batch["mask"][1], np.array([0, 1, 0, 1])[trimap])


def test_voc_layout(tmp_path):
  """VOCdevkit/VOC2012: JPEGImages/, palette PNGs in SegmentationClass/ (index = class, 255 = void), split lists."""
  rng = np.random.default_rng(4)
  (tmp_path / "SegmentationClass").mkdir()
  (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
  for name in ("2007_000032", "2007_000033", "2007_000039"):
    _save(tmp_path / "JPEGImages" / f"{name}.jpg", rng.integers(0, 256, (10, 12, 3)).astype(np.uint8))
    mask = Image.fromarray(rng.choice(np.array([0, 1, 20, 255], np.uint8), (10, 12)), "P")
    mask.putpalette([0, 0, 0, 128, 0, 0] + [224, 224, 192] * 254)
    mask.save(tmp_path / "SegmentationClass" / f"{name}.png")
  (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n2007_000039\n")
  (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000033\n")
  assert folder.detect_layout(tmp_path) == "voc"
  assert folder.find_pairs(tmp_path, "auto", "validation") == [
      (str(tmp_path / "JPEGImages" / "2007_000033.jpg"), str(tmp_path / "SegmentationClass" / "2007_000033.png"))]
  cfg = _folder_cfg(tmp_path, layout="voc", num_classes=21, crop_size=8)
  assert data.build_train_data(cfg, batch_size=2, seed=0).num_examples == 2
  batch = next(iter(data.build_eval_data(cfg, batch_size=1)))
  want = np.asarray(Image.open(tmp_path / "SegmentationClass" / "2007_000033.png"))
  assert set(np.unique(want)) == {0, 1, 20, 255}
  np.testing.assert_array_equal(batch["mask"][0], want)


@pytest.mark.parametrize("layout, holding", [
    ("images_masks", "images/ + masks/ with matching file names"),
    ("liver", "NNN.png + NNN_mask.png files"),
    ("auto", "files in one of the layouts of data.layout"),
])
def test_missing_root_names_the_path_and_the_flag(tmp_path, monkeypatch, layout, holding):
  monkeypatch.chdir(tmp_path)
  cfg = _folder_cfg("data/em", layout=layout)
  with pytest.raises(data.DataRootNotFoundError) as error:
    data.build_train_data(cfg, batch_size=2, seed=0)
  message = str(error.value)
  assert message.startswith(f"data.root=data/em: no such folder (relative to the working directory {tmp_path}); "
                            f"set --config.data.root=DIR, a folder holding {holding}"), message
  assert f"(layout {layout}; see the README's Data section)" in message and "\n" not in message
  assert isinstance(error.value, FileNotFoundError)  # what the command line prints as one line
  cfg.root = str(tmp_path / "data" / "em")  # an absolute path needs no working directory
  with pytest.raises(data.DataRootNotFoundError, match=rf"^data.root={cfg.root}: no such folder; set"):
    data.build_eval_data(cfg, batch_size=2)
  assert os.path.isabs(cfg.root)


def test_read_image_and_mask_formats(tmp_path):
  grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
  image = data.read_image(_save(tmp_path / "grey.png", grey))
  assert image.shape == (3, 4, 3) and image.dtype == np.uint8 and (image == grey[..., None]).all()
  palette = Image.fromarray(np.array([[0, 1], [2, 255]], np.uint8), "P")
  palette.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [224, 224, 192] * 253)
  palette.save(tmp_path / "voc.png")
  np.testing.assert_array_equal(data.read_mask(tmp_path / "voc.png"), [[0, 1], [2, 255]])   # palette indices
  grey_rgb = np.repeat(np.array([[0, 200], [255, 10]], np.uint8)[..., None], 3, -1)
  np.testing.assert_array_equal(data.read_mask(_save(tmp_path / "m.png", grey_rgb), "binary"), [[0, 1], [1, 0]])
  for i in range(3):
    Image.new("RGB", (4, 4)).save(tmp_path / f"b{i}.png")
  (tmp_path / "notes.txt").write_text("x")
  assert data.list_images(tmp_path) == sorted(str(tmp_path / n) for n in
                                              ["grey.png", "voc.png", "m.png", "b0.png", "b1.png", "b2.png"])


# ---------------------------------------------------------------------------------------------------------------
# Real files from ../shared/data, read in place


def test_shared_isbi_em_images_masks(shared_data):
  cfg = _folder_cfg(shared_data / "isbi2012-em", mask_mode="binary", val_count=4, crop_size=128, vflip=True,
                    rot90=True)
  train = data.build_train_data(cfg, batch_size=2, seed=0)
  assert train.num_examples == 20 and train.skipped_files == []
  batch = next(train.iterator(0))
  assert batch["image"].shape == (2, 128, 128, 3) and set(np.unique(batch["mask"])) == {0, 1}
  pixels = np.rint((batch["image"] * np.array(cfg.std) + np.array(cfg.mean)) * 255)
  np.testing.assert_array_equal(pixels[..., 0], pixels[..., 1])                # grey -> equal RGB channels
  evald = data.build_eval_data(cfg, batch_size=4)
  first = next(iter(evald))
  assert evald.num_examples == 4 and first["mask"].shape == (4, 512, 512)
  mask = np.asarray(Image.open(shared_data / "isbi2012-em" / "masks" / "20.png"))
  np.testing.assert_array_equal(first["mask"][0], mask > 127)                 # 255 = cell -> 1
  assert 0.5 < first["mask"].mean() < 0.95


def test_shared_liver_sample(shared_data):
  cfg = _folder_cfg(shared_data / "liver-sample", mask_mode="binary", crop_size=256, eval_size=128)
  train = data.build_train_data(cfg, batch_size=1, seed=0)
  assert train.num_examples == 1
  assert next(train.iterator(0))["image"].shape == (1, 256, 256, 3)
  batch = next(iter(data.build_eval_data(cfg, batch_size=1)))
  assert batch["image"].shape == (1, 128, 128, 3) and batch["mask"].shape == (1, 512, 512)
  mask = np.asarray(Image.open(shared_data / "liver-sample" / "val" / "000_mask.png"))
  np.testing.assert_array_equal(batch["mask"][0], mask > 127)
