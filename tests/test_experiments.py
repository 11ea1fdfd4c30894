"""Every config in experiments/ fits its own data (head, loss, data keys); one config of each training set-up trains
one step on tiny synthetic data: the logged loss is that of the experiment's model at its initial parameters on the
first batch."""
import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, load_experiment
from fcnjax import checkpoint, data, losses, models, optim, reporting, training

EXPERIMENTS = sorted(path.stem for path in (REPO_ROOT / "experiments").glob("*.py"))
# The configs that train one step: one per kind of training that tests/test_train.py (multiclass, a U-Net with Adam:
# the quickstart's, shrunk) does not already run: an auxiliary head with SGD, smp's model with a loss sum. Binary
# training with weight maps is isbi_unet's, which tests/test_isbi.py trains on real slices. The others repeat one of
# these with another model, size or dataset, whose train step its own tests check (tests/test_vgg_fcn.py,
# test_resnet.py, test_torchvision_zoo.py, test_mobilenet_zoo.py); each one-step run compiles a train and an eval
# step, 1-2 minutes of a 2-core CI machine.
ONE_STEP = ["pet_unet_resnet34", "voc_fcn_resnet50"]


def _own_data_info(config) -> data.DatasetInfo:
  """The experiment's data settings checked as a run checks them; a folder source needs no files for this when
  its layout is named, so an unset root (the user's to give) is filled in."""
  cfg = data.resolve({**config.data.to_dict(), "root": config.data.root or "DIR"})
  return data.dataset_info(cfg)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_config_fits_its_data(name):
  config = load_experiment(name)
  info = _own_data_info(config)
  training.check_config(config, info)  # the head has the data's classes (1 logit if binary), the loss fits
  models.build_model(config.model)  # the model's options exist
  optim.make_optimizer(config.optim, 100)


def _on_synthetic_data(config, info):
  """The experiment with its data swapped for tiny synthetic data of (at most 5 of) its classes, one step of
  batch 2, without warm-up (a warm-up starts at a learning rate of 0)."""
  num_classes = min(info.num_classes, 5)  # the synthetic set has at most 5 classes
  config.data = data.default_config()
  config.data.source = "synthetic"
  config.data.num_classes = num_classes
  config.data.binary = info.binary
  config.model.num_classes = 1 if info.binary else num_classes
  config.data.image_size = 32
  config.data.synthetic_train_examples = 4
  config.data.synthetic_val_examples = 2
  config.model.pretrained = ""
  config.optim.warmup_steps = 0
  config.train.batch_size = 2
  config.train.num_steps = 1
  config.train.progress = False
  config.train.num_predictions = 0
  config.eval.batch_size = 2
  return config


@pytest.mark.slow
@pytest.mark.parametrize("name", ONE_STEP)
def test_experiment_config_runs_one_step(name, tmp_path):
  config = load_experiment(name)
  info = _own_data_info(config)
  config = _on_synthetic_data(config, info)
  summary = training.train_and_evaluate(config, str(tmp_path))

  # The initial parameters and the first batch, drawn as training draws them (init and state keys split from the
  # seed; dropout keyed by the step).
  model = models.build_model(config.model)
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  batch = next(data.build_train_data(config.data, batch_size=2, seed=config.seed).iterator(0))
  initial = training.initial_variables(config, model, init_rng, batch["image"].shape[1:])

  @jax.jit
  def initial_loss(variables, batch):
    outputs, _ = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"],
                             rngs={"dropout": jax.random.fold_in(state_rng, 0)})
    return losses.segmentation_loss(outputs, batch["mask"], config.loss, weights=batch.get("weight"))[0]

  (logged,) = [r["loss"] for r in reporting.read_metrics(str(tmp_path)) if r["kind"] == "train"]
  assert np.isfinite(logged)
  assert logged == pytest.approx(float(initial_loss(initial, batch)), rel=1e-5)

  ckpts = checkpoint.Checkpoints(str(tmp_path))
  stepped, step = ckpts.restore_variables(checkpoint.model_record(config), which="latest")
  ckpts.close()
  change = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                                        stepped["params"], initial["params"]))
  assert step == 1 and max(change) > 0, "the step left every parameter where it was"
  assert len(summary["per_class_iou"]) == config.data.num_classes
  assert summary["class_names"] == data.dataset_info(config.data).class_names
