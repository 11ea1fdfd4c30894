"""Data that changes under a running job: a file deleted or truncated after the check before the first step (a sync
job, a user tidying up) stops the run with one error naming the file, from the reading thread or a grain worker
process alike, or with data.on_bad_file='skip' is left out (another example takes its place, never scored twice)
and counted in skipped_files and in the training log."""
import json

import numpy as np
import pytest
from PIL import Image

import reliability_helpers as h
from fcnjax import data

NUM_IMAGES = 10  # 8 train, 2 validation


def _write_set(root, count=NUM_IMAGES, size=(12, 16), num_classes=3):
  rng = np.random.default_rng(0)
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir(parents=True)
  for i in range(count):
    Image.fromarray(rng.integers(0, 256, size + (3,)).astype(np.uint8)).save(root / "images" / f"{i}.png")
    Image.fromarray(rng.integers(0, num_classes, size).astype(np.uint8)).save(root / "masks" / f"{i}.png")


def _cfg(root, **overrides):
  cfg = data.default_config()
  cfg.source, cfg.root, cfg.num_classes, cfg.val_count, cfg.crop_size, cfg.eval_size = (
      "folder", str(root), 3, 2, 8, 8)
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def _truncate(path):
  content = path.read_bytes()
  path.write_bytes(content[:len(content) // 2])


def _epochs(train, count):
  """`count` epochs of batches (the first one read from a fresh iterator), closing the iterator after."""
  iterator = train.iterator(0)
  try:
    return [next(iterator) for _ in range(count * train.steps_per_epoch)]
  finally:
    iterator.close()


@pytest.mark.parametrize("change,workers", [("delete image", 0),
                                            pytest.param("truncate mask", 1, marks=pytest.mark.slow)])
def test_file_changed_after_the_check_is_named(tmp_path, change, workers):
  """In this process's read threads, and in a grain worker process, whose error reaches this process pickled."""
  _write_set(tmp_path)
  train = data.build_train_data(_cfg(tmp_path, read_threads=2, workers=workers), batch_size=2, seed=0)
  path = tmp_path / ("images/3.png" if change == "delete image" else "masks/5.png")
  if change == "delete image":
    path.unlink()
  else:
    _truncate(path)
  with pytest.raises(data.BadFileError) as error:
    _epochs(train, 1)
  assert error.value.path == str(path)
  message = str(error.value)
  assert message.startswith(f"{path}: ") and "\n" not in message
  assert ("no such file" if change == "delete image" else "truncated") in message
  assert "changed while the run was reading the data" in message and "data.on_bad_file='skip'" in message


def test_skip_mode_replaces_and_counts_each_changed_file_once(tmp_path):
  _write_set(tmp_path)
  cfg = _cfg(tmp_path, on_bad_file="skip", read_threads=2)
  train = data.build_train_data(cfg, batch_size=2, seed=0)
  reference = _epochs(train, 1)
  (tmp_path / "images" / "3.png").unlink()
  _truncate(tmp_path / "masks" / "5.png")
  batches = _epochs(train, 2)
  assert all(set(b) == {"image", "mask"} and b["image"].shape == (2, 8, 8, 3) for b in batches)
  assert sorted(bad.path for bad in train.skipped_files) == [str(tmp_path / "images/3.png"),
                                                            str(tmp_path / "masks/5.png")]
  # Only the two batches holding the gone examples differ (each by its replacement), in each epoch.
  changed = [i for i, (a, b) in enumerate(zip(reference, batches[:len(reference)]))
             if not np.array_equal(a["image"], b["image"])]
  assert 1 <= len(changed) <= 2, changed


def test_skip_mode_leaves_a_changed_validation_file_unscored(tmp_path):
  _write_set(tmp_path)
  cfg = _cfg(tmp_path, on_bad_file="skip", read_threads=0)
  eval_data = data.build_eval_data(cfg, batch_size=2)
  (tmp_path / "masks" / "8.png").unlink()  # the first validation pair: 9.png is read in its place
  batches = list(eval_data)
  assert all("unreadable" not in b for b in batches)
  assert int(sum(b["valid"].sum() for b in batches)) == 1
  assert [bad.path for bad in eval_data.skipped_files] == [str(tmp_path / "masks/8.png")]


# Deletes a training image once this process has read its K-th training batch.
_DELETE_AFTER = "delete_after_batch"


@pytest.mark.slow
@pytest.mark.parametrize("on_bad_file", ["error", "skip"])
def test_training_run_with_a_file_deleted_mid_run(tmp_path, on_bad_file):
  root, workdir = tmp_path / "data", tmp_path / "run"
  _write_set(root, size=(32, 32), num_classes=4)
  gone = root / "images" / "2.png"
  overrides = ["--config.data.source=folder", f"--config.data.root={root}", "--config.data.val_count=2",
               "--config.data.crop_size=32", "--config.data.eval_size=32", f"--config.data.on_bad_file={on_bad_file}",
               "--config.train.num_steps=12"]  # batches of 8: one a step, each step reads every training file
  # After the 2nd of 12 batches: read-ahead (data.prefetch_batches=4) has not read the later ones yet.
  result = h.run_train(workdir, *overrides, inject=f"{_DELETE_AFTER}:2,{gone}")
  if on_bad_file == "error":
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"BadFileError: {gone}: no such file; it passed the check"), lines[0]
  else:
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipping {gone}: no such file" in result.stderr
    records = h.train_records(workdir)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert records[0]["skipped_files"] == 0 and records[-1]["skipped_files"] == 1
    assert json.loads(result.stdout[result.stdout.index("{"):])["miou"] >= 0
