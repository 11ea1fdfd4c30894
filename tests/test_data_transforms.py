"""Joint image/mask transforms: geometry kept in step, PIL/torchvision resize semantics, normalisation numbers."""
import logging

import numpy as np
import pytest

from fcnjax import data
from fcnjax.data import transforms

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _coded_example(h, w, num_classes=4, seed=0):
  """An example whose image encodes its mask (red = 40 * class), so any misalignment shows."""
  rng = np.random.default_rng(seed)
  mask = rng.integers(0, num_classes, size=(h, w)).astype(np.uint8)
  image = np.stack([mask * 40, rng.integers(0, 256, (h, w)), np.full((h, w), 7)], -1).astype(np.uint8)
  return {"image": image, "mask": mask}


def _denormalize(image):
  return np.rint((image * np.array(STD) + np.array(MEAN)) * 255.0)


def test_normalize_known_values():
  image = np.array([[[0, 255, 128]]], np.uint8)
  cfg = data.default_config()
  got = data.normalize(image, cfg)
  expected = [(0 - 0.485) / 0.229, (1 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
  assert got.dtype == np.float32
  np.testing.assert_allclose(got[0, 0], expected, rtol=1e-6)
  np.testing.assert_allclose(got[0, 0], [-2.117904, 2.428571, 0.426492], atol=1e-5)


def test_resize_matches_torchvision_pil_semantics():
  """torchvision's segmentation references resize PIL images: bilinear for the image, nearest for the mask."""
  tf = pytest.importorskip("torchvision.transforms.functional")
  from PIL import Image
  from torchvision.transforms import InterpolationMode
  example = _coded_example(37, 53)
  for size in [(20, 31), (80, 90)]:
    want_image = np.asarray(tf.resize(Image.fromarray(example["image"]), list(size), InterpolationMode.BILINEAR))
    want_mask = np.asarray(tf.resize(Image.fromarray(example["mask"]), list(size), InterpolationMode.NEAREST))
    np.testing.assert_array_equal(transforms.resize_image(example["image"], size), want_image)
    np.testing.assert_array_equal(transforms.resize_mask(example["mask"], size), want_mask)
    assert set(np.unique(transforms.resize_mask(example["mask"], size))) <= {0, 1, 2, 3}


def test_random_crop_pads_image_with_zero_and_mask_with_ignore():
  example = _coded_example(5, 7)
  image, mask = transforms.random_crop(example["image"], example["mask"], 8, np.random.default_rng(0), 255)
  assert image.shape == (8, 8, 3) and mask.shape == (8, 8)
  # Only one placement fits: the original sits top-left, padding bottom and right.
  np.testing.assert_array_equal(image[:5, :7], example["image"])
  np.testing.assert_array_equal(mask[:5, :7], example["mask"])
  assert (image[5:] == 0).all() and (image[:, 7:] == 0).all()
  assert (mask[5:] == 255).all() and (mask[:, 7:] == 255).all()


def test_random_crop_is_a_window_of_the_input():
  example = _coded_example(30, 40)
  image, mask = transforms.random_crop(example["image"], example["mask"], 16, np.random.default_rng(3), 255)
  windows = [(t, l) for t in range(15) for l in range(25)
             if np.array_equal(example["mask"][t:t + 16, l:l + 16], mask)
             and np.array_equal(example["image"][t:t + 16, l:l + 16], image)]
  assert len(windows) == 1


@pytest.mark.parametrize("flags", [dict(hflip=True), dict(vflip=True, rot90=True),
                                   dict(hflip=True, vflip=True, rot90=True)])
def test_train_transform_keeps_image_and_mask_aligned(flags):
  example = _coded_example(24, 24)
  transform = transforms.TrainTransform(crop_size=(16, 16), **flags)
  seen = set()
  for seed in range(12):
    out = transform(example, np.random.default_rng(seed))
    assert out["image"].shape == (16, 16, 3) and out["image"].dtype == np.float32
    assert out["mask"].shape == (16, 16) and out["mask"].dtype == np.int32
    np.testing.assert_array_equal(_denormalize(out["image"])[..., 0], out["mask"] * 40)
    seen.add(out["mask"].tobytes())
  assert len(seen) > 6  # the augmentation does vary


def test_train_transform_is_a_function_of_the_rng():
  example = _coded_example(40, 40)
  transform = transforms.TrainTransform(crop_size=(24, 24), scale_range=(0.5, 2.0), vflip=True, rot90=True)
  a = transform(example, np.random.default_rng(11))
  b = transform(example, np.random.default_rng(11))
  c = transform(example, np.random.default_rng(12))
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["mask"], b["mask"])
  assert not np.array_equal(a["image"], c["image"])


def test_random_scale_changes_size_within_range_and_keeps_labels():
  example = _coded_example(40, 50)
  sizes = []
  for seed in range(20):
    image, mask = transforms.random_scale(example["image"], example["mask"], np.random.default_rng(seed), (0.5, 1.5))
    assert image.shape[:2] == mask.shape
    assert set(np.unique(mask)) <= {0, 1, 2, 3}
    sizes.append(mask.shape)
  heights = [h for h, _ in sizes]
  assert 20 <= min(heights) < 30 and 50 < max(heights) <= 60


def test_elastic_hook_is_called_only_when_enabled(monkeypatch):
  calls = []

  def recording_hook(image, mask, rng, **kwargs):
    calls.append((image.shape, mask.shape, isinstance(rng, np.random.Generator)))
    return image, np.zeros_like(mask)

  monkeypatch.setattr(transforms, "elastic_deform", recording_hook)
  example = _coded_example(12, 12)
  out = transforms.TrainTransform(crop_size=(8, 8), elastic=True)(example, np.random.default_rng(0))
  assert calls == [((8, 8, 3), (8, 8), True)] and (out["mask"] == 0).all()   # its output is what is returned
  transforms.TrainTransform(crop_size=(8, 8))(example, np.random.default_rng(0))
  assert len(calls) == 1


def test_eval_transform_canvas_and_size():
  example = _coded_example(30, 20)
  transform = transforms.EvalTransform(eval_size=(16, 16), canvas=(40, 32))
  out = transform(example)
  assert out["image"].shape == (16, 16, 3)
  assert out["mask"].shape == (40, 32) and out["mask"].dtype == np.int32
  np.testing.assert_array_equal(out["mask"][:30, :20], example["mask"])
  assert (out["mask"][30:] == 255).all() and (out["mask"][:, 20:] == 255).all()
  np.testing.assert_array_equal(out["size"], [30, 20])
  assert out["valid"]
  padding = transform(example, valid=False)
  assert not padding["valid"] and (padding["mask"] == 255).all()


def test_eval_transform_shrinks_a_mask_larger_than_the_canvas(caplog):
  example = _coded_example(60, 30)
  transform = transforms.EvalTransform(eval_size=None, canvas=(40, 40))
  with caplog.at_level(logging.WARNING):
    out = transform(example)
  np.testing.assert_array_equal(out["size"], [40, 20])
  np.testing.assert_array_equal(out["mask"][:40, :20], transforms.resize_mask(example["mask"], (40, 20)))
  assert "eval_canvas" in caplog.text


def test_prepare_inference_image():
  cfg = data.default_config()
  cfg.eval_size = 32
  image = np.full((50, 70, 3), 128, np.uint8)
  out = data.prepare_inference_image(image, cfg)
  assert out.shape == (32, 32, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out[5, 5], data.normalize(image[:1, :1], cfg)[0, 0], rtol=1e-6)


def test_mirror_padding_is_torchvision_symmetric_padding_before_the_crop():
  """A crop of the padded size has one placement: the example with 3 mirrored pixels on each side, image and mask
  alike (red = 40 * class, so a mask mirrored apart from its image shows)."""
  tf = pytest.importorskip("torchvision.transforms.functional")
  from PIL import Image
  example = _coded_example(9, 11)
  out = transforms.TrainTransform(crop_size=(15, 17), hflip=False, mirror_padding=3)(example,
                                                                                      np.random.default_rng(0))
  want_image = np.asarray(tf.pad(Image.fromarray(example["image"]), 3, padding_mode="symmetric"))
  want_mask = np.asarray(tf.pad(Image.fromarray(example["mask"]), 3, padding_mode="symmetric"))
  np.testing.assert_array_equal(_denormalize(out["image"]), want_image)
  np.testing.assert_array_equal(out["mask"], want_mask)
  np.testing.assert_array_equal(out["mask"][3:12, 3:14], example["mask"])


def test_ignore_margin_leaves_the_crop_inside_it_and_ignores_the_rest():
  example = _coded_example(24, 24)
  plain = transforms.TrainTransform(crop_size=(16, 16))(example, np.random.default_rng(5))
  out = transforms.TrainTransform(crop_size=(16, 16), ignore_margin=3)(example, np.random.default_rng(5))
  np.testing.assert_array_equal(out["image"], plain["image"])
  np.testing.assert_array_equal(out["mask"][3:13, 3:13], plain["mask"][3:13, 3:13])
  inside = np.zeros((16, 16), bool)
  inside[3:13, 3:13] = True
  assert np.all(out["mask"][~inside] == 255)
