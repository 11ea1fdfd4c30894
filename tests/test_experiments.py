"""Every config in experiments/ builds its model, loss and optimiser and trains one step (on tiny synthetic data)."""
import importlib.util

import numpy as np
import pytest

from conftest import REPO_ROOT
from fcnjax import reporting, training


def train_losses(workdir):
  return {r["step"]: r["loss"] for r in reporting.read_metrics(str(workdir)) if r["kind"] == "train"}


def _load_experiment(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


EXPERIMENTS = sorted((REPO_ROOT / "experiments").glob("*.py"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_config_runs_one_step(path, tmp_path):
  """Each experiment's model, loss and optimiser train one step; the data is swapped for tiny synthetic data with
  the experiment's number of classes (the real sets are tested in the data tests)."""
  config = _load_experiment(path)
  from fcnjax import data
  num_classes = data.dataset_info(config.data).num_classes if config.data.source != "folder" else (
      2 if config.data.mask_mode == "binary" else config.data.num_classes)
  binary = config.data.binary or config.data.mask_mode == "binary"
  # The synthetic set has at most 5 classes: a 21-class VOC head becomes a 5-class one, the rest of the model stays.
  num_classes = min(max(num_classes, 2), 5)
  config.data = data.default_config()
  config.data.source = "synthetic"
  config.data.num_classes = num_classes
  config.data.binary = binary
  config.model.num_classes = 1 if binary else num_classes
  config.data.image_size = 32
  config.data.synthetic_train_examples = 4
  config.data.synthetic_val_examples = 2
  config.model.pretrained = ""
  config.train.batch_size = 2
  config.train.num_steps = 1
  config.train.progress = False
  config.train.num_predictions = 0
  config.eval.batch_size = 2
  summary = training.train_and_evaluate(config, str(tmp_path))
  assert 0.0 <= summary["miou"] <= 1.0
  assert np.isfinite(train_losses(tmp_path)[1])
