"""The grain pipeline: determinism, exact resume, process sharding, workers, eval padding -- on synthetic data."""
import numpy as np
import pytest

from fcnjax import data
from fcnjax.data import synthetic

MEAN, STD = np.array(data.default_config().mean), np.array(data.default_config().std)


def _cfg(**overrides):
  cfg = data.default_config()
  cfg.image_size = 24
  cfg.synthetic_train_examples = 16
  cfg.synthetic_val_examples = 10
  cfg.read_threads = 0
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def _take(iterator, n):
  batches = [next(iterator) for _ in range(n)]
  if hasattr(iterator, "close"):
    iterator.close()
  return batches


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _denormalize(image):
  return np.rint((image * STD + MEAN) * 255.0).astype(np.uint8)


def test_config_rejects_unknown_keys_and_bad_values():
  cfg = data.default_config()
  with pytest.raises(AttributeError, match="crop_sise"):
    cfg.crop_sise = 10
  with pytest.raises(KeyError, match="crop_sise"):
    data.resolve({"crop_sise": 10})
  with pytest.raises(ValueError, match="source"):
    data.resolve({"source": "imagenet"})
  assert data.resolve({"crop_size": 10}).crop_size == 10   # a partial config is completed with defaults


def test_batch_shapes_dtypes_and_steps():
  train = data.build_train_data(_cfg(), batch_size=4, seed=0)
  assert train.num_examples == 16 and train.steps_per_epoch == 4
  batch = next(train.iterator(0))
  assert batch["image"].shape == (4, 24, 24, 3) and batch["image"].dtype == np.float32
  assert batch["mask"].shape == (4, 24, 24) and batch["mask"].dtype == np.int32
  assert data.build_train_data(_cfg(), batch_size=64, seed=0).steps_per_epoch == 1


def test_first_epoch_is_a_permutation_of_the_normalised_source():
  cfg = _cfg(hflip=False)   # no augmentation: batches are the source examples, normalised
  train = data.build_train_data(cfg, batch_size=4, seed=5)
  batches = _take(train.iterator(0), 4)
  source = synthetic.SyntheticShapes(split="train", num_examples=16, size=24, num_classes=4)
  want = sorted(source[i]["image"].tobytes() + source[i]["mask"].tobytes() for i in range(16))
  got = sorted(_denormalize(b["image"][j]).tobytes() + b["mask"][j].astype(np.uint8).tobytes()
               for b in batches for j in range(4))
  assert got == want
  order = [b["mask"][j].tobytes() for b in batches for j in range(4)]
  assert order != [source[i]["mask"].astype(np.int32).tobytes() for i in range(16)]   # shuffled


def test_exact_resume_across_epochs():
  train = data.build_train_data(_cfg(), batch_size=4, seed=1)
  stream = _take(train.iterator(0), 7)   # 4 steps per epoch: crosses into the second epoch
  for k in (1, 3, 4, 6):
    _assert_batches_equal(next(train.iterator(k)), stream[k])
  # A fresh pipeline with the same seed (a restarted run) gives the same batches.
  again = data.build_train_data(_cfg(), batch_size=4, seed=1)
  _assert_batches_equal(next(again.iterator(5)), stream[5])


def test_seed_changes_order_and_epochs_are_reshuffled():
  a = _take(data.build_train_data(_cfg(hflip=False), batch_size=16, seed=0).iterator(0), 2)
  b = _take(data.build_train_data(_cfg(hflip=False), batch_size=16, seed=1).iterator(0), 1)
  assert not np.array_equal(a[0]["mask"], b[0]["mask"])
  assert not np.array_equal(a[0]["mask"], a[1]["mask"])             # epoch 1 in another order...
  assert sorted(m.tobytes() for m in a[0]["mask"]) == sorted(m.tobytes() for m in a[1]["mask"])   # ...same set


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_together_make_the_global_batch(process_count):
  cfg = _cfg(scale_range=(0.75, 1.25), crop_size=16)   # with augmentation: its RNG follows the global position
  whole = _take(data.build_train_data(cfg, batch_size=8, seed=2).iterator(0), 5)
  shards = [_take(data.build_train_data(cfg, batch_size=8, seed=2, process_index=p,
                                        process_count=process_count).iterator(2), 3)
            for p in range(process_count)]
  for step in range(3):
    for key in ("image", "mask"):
      assert shards[0][step][key].shape[0] == 8 // process_count
      joined = np.concatenate([shards[p][step][key] for p in range(process_count)])
      np.testing.assert_array_equal(joined, whole[step + 2][key])


def test_bad_batch_and_process_arguments():
  with pytest.raises(ValueError, match="multiple of process_count"):
    data.build_train_data(_cfg(), batch_size=6, seed=0, process_count=4)
  with pytest.raises(ValueError, match="process_index"):
    data.build_train_data(_cfg(), batch_size=8, seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="ignore_margin=12 must be at least 0 and leave some of the 24x24"):
    data.build_train_data(_cfg(ignore_margin=12), batch_size=4, seed=0)
  with pytest.raises(ValueError, match="mirror_padding=-1 must be >= 0"):
    data.build_train_data(_cfg(mirror_padding=-1), batch_size=4, seed=0)


@pytest.mark.slow
def test_workers_give_the_same_batches():
  """Two grain worker processes."""
  cfg = _cfg(scale_range=(0.75, 1.25), crop_size=16)
  want = _take(data.build_train_data(cfg, batch_size=4, seed=3).iterator(1), 4)
  cfg.workers = 2
  got = _take(data.build_train_data(cfg, batch_size=4, seed=3).iterator(1), 4)
  for a, b in zip(want, got):
    _assert_batches_equal(a, b)


def test_eval_pads_the_last_batch_and_keeps_original_masks():
  cfg = _cfg()
  evald = data.build_eval_data(cfg, split="validation", batch_size=4)
  batches = list(evald)
  assert evald.num_examples == 10 and len(evald) == len(batches) == 3
  valid = np.concatenate([b["valid"] for b in batches])
  np.testing.assert_array_equal(valid, [True] * 10 + [False] * 2)
  source = synthetic.SyntheticShapes(split="validation", num_examples=10, size=24, num_classes=4)
  for i in range(10):
    b, j = batches[i // 4], i % 4
    np.testing.assert_array_equal(b["mask"][j], source[i]["mask"])   # native size: canvas = image size
    np.testing.assert_array_equal(_denormalize(b["image"][j]), source[i]["image"])
    np.testing.assert_array_equal(b["size"][j], [24, 24])
  assert (batches[-1]["mask"][2:] == 255).all()


def test_eval_resized_images_on_a_larger_canvas():
  cfg = _cfg(eval_size=16, eval_canvas=32)
  batch = next(iter(data.build_eval_data(cfg, batch_size=4)))
  assert batch["image"].shape == (4, 16, 16, 3)
  assert batch["mask"].shape == (4, 32, 32) and batch["size"].dtype == np.int32
  source = synthetic.SyntheticShapes(split="validation", num_examples=10, size=24, num_classes=4)
  np.testing.assert_array_equal(batch["mask"][1, :24, :24], source[1]["mask"])
  assert (batch["mask"][:, 24:] == 255).all() and (batch["mask"][:, :, 24:] == 255).all()


def test_eval_shards_have_equal_batch_counts_and_join_up():
  cfg = _cfg()
  whole = list(data.build_eval_data(cfg, batch_size=4))
  shards = [list(data.build_eval_data(cfg, batch_size=4, process_index=p, process_count=2)) for p in range(2)]
  assert len(shards[0]) == len(shards[1]) == len(whole) == 3
  for step in range(3):
    for key in whole[step]:
      np.testing.assert_array_equal(np.concatenate([shards[0][step][key], shards[1][step][key]]), whole[step][key])


def test_dataset_info_synthetic_and_binary():
  info = data.dataset_info(_cfg())
  assert info == data.DatasetInfo(4, ["background", "circle", "rectangle", "triangle"], 255, False)
  assert data.dataset_info(_cfg(num_classes=2, binary=True)).binary
  with pytest.raises(ValueError, match="binary"):
    data.dataset_info(_cfg(binary=True))
  with pytest.raises(ValueError, match="class_names"):
    data.dataset_info(_cfg(class_names=("a", "b")))


def test_synthetic_examples_are_deterministic_and_varied():
  a = synthetic.make_example(0, "train", 3, 32, 4)
  b = synthetic.make_example(0, "train", 3, 32, 4)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(a["mask"], synthetic.make_example(0, "validation", 3, 32, 4)["mask"])
  assert not np.array_equal(a["mask"], synthetic.make_example(1, "train", 3, 32, 4)["mask"])
  masks = np.stack([synthetic.make_example(0, "train", i, 32, 4)["mask"] for i in range(40)])
  fractions = np.bincount(masks.ravel(), minlength=4) / masks.size
  assert fractions[0] > 0.5 and (fractions[1:] > 0.02).all()


def _shape_colours(example):
  """The median colour of each class's pixels (noise and shading removed), per class present."""
  image, mask = example["image"].astype(np.float32), example["mask"]
  return {int(c): np.median(image[mask == c], axis=0) for c in np.unique(mask) if c}


def test_random_colour_fraction_changes_colours_only():
  """synthetic_random_colour picks which shapes leave their class's hue; the geometry stays the same, and with 0
  every shape is near its hue, with 1 most are not."""
  hue = np.array(synthetic._CLASS_COLOURS)  # pylint: disable=protected-access
  distances = {}
  for fraction in (0.0, 1.0):
    far = []
    for i in range(30):
      example = synthetic.make_example(0, "train", i, 48, 4, random_colour=fraction)
      np.testing.assert_array_equal(example["mask"], synthetic.make_example(0, "train", i, 48, 4)["mask"])
      far += [np.linalg.norm(colour - hue[c - 1]) > 100 for c, colour in _shape_colours(example).items()]
    distances[fraction] = np.mean(far)
  assert distances[0.0] < 0.05 and distances[1.0] > 0.5, distances
  with pytest.raises(ValueError, match="synthetic_random_colour"):
    data.build_train_data(_cfg(synthetic_random_colour=1.5), batch_size=2, seed=0)
