"""Bad input through the command line: bad data files, a workdir of another model, a misspelt config key, a .pth of
another architecture. Each must stop the program before it trains (or converts) anything, name what is wrong, and
leave existing files as they were; with data.on_bad_file=skip, bad files are left out and counted.
"""
import sys

import numpy as np
import pytest
from PIL import Image

import reliability_helpers as h
from conftest import load_converter
from fcnjax import memory

FOLDER = ("--config.data.source=folder", "--config.data.layout=images_masks", "--config.data.val_count=2",
          "--config.train.num_steps=2")


def _write_pair(root, name, rng, image_hw=(32, 32), mask=None):
  Image.fromarray(rng.integers(0, 255, (*image_hw, 3), dtype=np.uint8)).save(root / "images" / f"{name}.png")
  if mask is None:
    mask = rng.integers(0, 4, image_hw, dtype=np.uint8)
  if mask is not False:
    Image.fromarray(mask).save(root / "masks" / f"{name}.png")


def _folder(root, bad=(), good=12):
  """images/ + masks/ with `good` usable 32x32 pairs (g00...) and the named bad ones (b_..., sorted first, so they
  fall in the training split; the last 2 good pairs validate)."""
  rng = np.random.default_rng(0)
  (root / "images").mkdir(parents=True)
  (root / "masks").mkdir()
  for i in range(good):
    _write_pair(root, f"g{i:02d}", rng)
  made = {}
  for kind in bad:
    name = f"b_{kind}"
    if kind == "truncated_png":
      _write_pair(root, name, rng)
      image = root / "images" / f"{name}.png"
      image.write_bytes(image.read_bytes()[:-900])  # the header still says 32x32; the pixel data stops short
      made[kind] = image
    elif kind == "mask_of_another_size":
      _write_pair(root, name, rng, mask=rng.integers(0, 4, (24, 32), dtype=np.uint8))
      made[kind] = root / "masks" / f"{name}.png"
    elif kind == "labels_out_of_range":
      mask = rng.integers(0, 4, (32, 32), dtype=np.uint8)
      mask[3, 5] = 7  # data.num_classes is 4
      _write_pair(root, name, rng, mask=mask)
      made[kind] = root / "masks" / f"{name}.png"
    elif kind == "rgb_mask":
      _write_pair(root, name, rng, mask=False)
      colours = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)  # a colour-coded mask (VOC style) as RGB
      Image.fromarray(colours).save(root / "masks" / f"{name}.png")
      made[kind] = root / "masks" / f"{name}.png"
    elif kind == "image_without_mask":
      _write_pair(root, name, rng, mask=False)
      made[kind] = root / "images" / f"{name}.png"
  return made


BAD_FILES = ("truncated_png", "mask_of_another_size", "labels_out_of_range", "rgb_mask")
REASONS = {"truncated_png": "truncated", "mask_of_another_size": "mask is 24x32 but its image",
           "labels_out_of_range": "values [7]", "rgb_mask": "channels differ", "image_without_mask": "no mask"}


def _assert_stopped_before_training(result, workdir, *expected_in_stderr):
  assert result.returncode != 0, result.stdout[-2000:]
  for text in expected_in_stderr:
    assert str(text) in result.stderr, f"{text!r} not in stderr:\n{result.stderr[-3000:]}"
  assert not (workdir / "metrics.jsonl").exists(), "a step ran before the error"
  assert not (workdir / "checkpoints").exists(), "the run got as far as its checkpoints before the error"


@pytest.mark.slow
def test_bad_data_stops_before_the_first_step_naming_the_file(tmp_path):
  bad = _folder(tmp_path / "bad", BAD_FILES)
  no_mask = _folder(tmp_path / "no_mask", ("image_without_mask",))
  (tmp_path / "empty" / "images").mkdir(parents=True)
  (tmp_path / "empty" / "masks").mkdir()
  runs = {name: tmp_path / f"run_{name}" for name in ("bad", "no_mask", "empty", "missing")}
  results = h.run_together(*[(h.train_command(runs[name], *FOLDER, f"--config.data.root={tmp_path / name}"), h.env())
                             for name in runs])
  _assert_stopped_before_training(results[0], runs["bad"], *bad.values(), *(REASONS[k] for k in BAD_FILES))
  _assert_stopped_before_training(results[1], runs["no_mask"], no_mask["image_without_mask"], "no mask")
  _assert_stopped_before_training(results[2], runs["empty"], tmp_path / "empty" / "images", "empty folder")
  # A data.root that does not exist: one line naming it and the flag to set, no traceback.
  _assert_stopped_before_training(results[3], runs["missing"])
  assert results[3].returncode == 1 and "Traceback" not in results[3].stderr, results[3].stderr[-3000:]
  assert results[3].stderr.strip().splitlines()[-1].startswith(
      f"DataRootNotFoundError: data.root={tmp_path / 'missing'}: no such folder; set --config.data.root=DIR, a "
      "folder holding images/ + masks/"), results[3].stderr[-3000:]


SKIPPED = BAD_FILES + ("image_without_mask",)


def _skip_data(root):
  return (*FOLDER, f"--config.data.root={root / 'data'}", "--config.data.on_bad_file=skip")


@pytest.fixture(scope="module")
def skip_run(tmp_path_factory):
  """A 2-step run on a folder holding every kind of bad file, with data.on_bad_file=skip: (workdir, stderr). Its
  workdir is also the one the resume tests below try to continue with another model."""
  root = tmp_path_factory.mktemp("skip")
  _folder(root / "data", SKIPPED)
  result = h.run_train(root / "run", *_skip_data(root))
  assert result.returncode == 0, result.stderr[-3000:]
  return root / "run", result.stderr


@pytest.mark.slow
def test_skipped_bad_files_are_counted_in_metrics(skip_run):
  workdir, stderr = skip_run
  records = h.train_records(workdir)
  assert [r["step"] for r in records] == [1, 2]
  assert all(r["skipped_files"] == len(SKIPPED) for r in records), records
  assert all(np.isfinite(r["loss"]) for r in records)
  for kind in SKIPPED:  # each skipped file is named in the log, with its reason
    assert f"b_{kind}.png" in stderr and REASONS[kind] in stderr, kind


@pytest.mark.slow
def test_resuming_another_model_fails_and_leaves_checkpoints_untouched(skip_run):
  trained = skip_run[0]
  before = h.tree_digest(trained)
  data = _skip_data(trained.parent)
  wrong_classes, typo = h.run_together(
      (h.train_command(trained, *data, "--config.train.num_steps=4", "--config.model.num_classes=5",
                       "--config.data.num_classes=5"), h.env()),
      (h.train_command(trained, *data, "--config.trian.lr=1"), h.env()))
  assert wrong_classes.returncode != 0
  assert "CheckpointMismatchError" in wrong_classes.stderr, wrong_classes.stderr[-3000:]
  assert "num_classes: checkpoint has 4, config has 5" in wrong_classes.stderr, wrong_classes.stderr[-3000:]
  assert str(trained / "checkpoints" / "2") in wrong_classes.stderr  # names the checkpoint it refused
  assert typo.returncode != 0 and "'trian'" in typo.stderr and 'Did you mean "train"' in typo.stderr, typo.stderr
  assert h.tree_digest(trained) == before  # not a byte changed: checkpoints, metrics, config.json


def _abstract_state(config):
  """The train state `config` would restore into, as shapes only (nothing is compiled or allocated)."""
  return memory.TrainStep(config, config.data.image_size).abstract_state


@pytest.mark.slow
def test_restore_names_the_differing_key_or_shape(skip_run):
  """The two checks behind CheckpointMismatchError, in-process: the model record (an architecture option), and,
  where records agree but arrays do not (a checkpoint from before a model change), each mis-shaped array."""
  from fcnjax import checkpoint  # pylint: disable=g-import-not-at-top
  trained = skip_run[0]
  before = h.tree_digest(trained)
  saved_config = h.get_config()
  wider = h.get_config()
  wider.model.base_width = 8
  five_classes = h.get_config()
  five_classes.model.num_classes = 5
  ckpts = checkpoint.Checkpoints(str(trained))
  try:
    with pytest.raises(checkpoint.CheckpointMismatchError, match="base_width: checkpoint has 4, config has 8"):
      ckpts.restore(_abstract_state(wider), checkpoint.model_record(wider))
    with pytest.raises(checkpoint.CheckpointMismatchError) as error:
      ckpts.restore(_abstract_state(five_classes), checkpoint.model_record(saved_config))
  finally:
    ckpts.close()
  message = str(error.value)
  # The 1x1 classifier 'outc' and its two Adam moments, nothing else.
  assert "shape differs (6)" in message and "params/outc/kernel: checkpoint (1, 1, 4, 4), model (1, 1, 4, 5)" in \
      message and "params/outc/bias: checkpoint (4,), model (5,)" in message, message
  assert str(trained / "checkpoints" / "2") in message
  assert h.tree_digest(trained) == before


@pytest.fixture(scope="module")
def foreign_pth(tmp_path_factory):
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  folder = tmp_path_factory.mktemp("pth")
  torch.save(torchvision.models.resnet18(weights=None).state_dict(), folder / "resnet18.pth")
  tiny = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
  torch.save(tiny.state_dict(), folder / "tiny.pth")
  (folder / "truncated.pth").write_bytes((folder / "resnet18.pth").read_bytes()[:1000])
  return folder


CONVERSIONS = [
    # resnet18's basic blocks where resnet50 has bottlenecks: conv3 missing, conv1 3x3 instead of 1x1
    ("resnet50", "resnet18.pth", ["layer1.0.conv3.weight", "layer1.0.conv1.weight: got (64, 64, 3, 3), expected "
                                  "(64, 64, 1, 1)", "fc.weight: got (1000, 512), expected (1000, 2048)"]),
    ("vgg16", "tiny.pth", ["features.0.weight", "unexpected keys (4): 0.bias, 0.weight, 2.bias, 2.weight"]),
    ("resnet50", "truncated.pth", ["not a readable PyTorch state_dict"]),
]


@pytest.mark.slow
def test_converter_refuses_another_architecture(foreign_pth, tmp_path, capsys):
  """The first case through the command line (exit status included), the others through the same main(argv)."""
  cli = load_converter()
  for i, (arch, pth, expected) in enumerate(CONVERSIONS):
    out = tmp_path / f"converted{i}"
    argv = [f"--arch={arch}", f"--pth={foreign_pth / pth}", f"--out={out}"]
    if i == 0:
      result = h.run_together(([sys.executable, "conversions/convert_torchvision.py", *argv], h.env()))[0]
      returncode, stderr = result.returncode, result.stderr
    else:
      returncode, stderr = cli.main(argv), capsys.readouterr().err
    assert returncode == 1, (arch, pth, stderr[-3000:])
    for text in expected:
      assert text in stderr, f"{arch} {pth}: {text!r} not in:\n{stderr[-3000:]}"
    assert not out.exists()
