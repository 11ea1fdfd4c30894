"""Parity of fcnjax's resnet18/34/101, fcn_resnet101 and deeplabv3_resnet50/101 with torchvision, through
fcnjax.conversion; parameter counts; the converters' and models' refusals.

As in test_resnet.py, the torchvision models are built without weights and their BatchNorm parameters and running
statistics randomised before conversion. Each torchvision model is built once per module; images are small.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # a hard import: parity tests must run, never skip
import torchvision
from torchvision.models import segmentation

from test_resnet import assert_close, nchw_to_nhwc, shapes
from torch_reference import randomize_batch_norm
from fcnjax import models
from fcnjax.conversion import ConversionError, get_converter
from fcnjax.conversion.resnet import convert_layers, expected_shapes, resnet_trunk_layers
from fcnjax.models.deeplabv3 import ASPP, DeepLabHead
from fcnjax.pretrained import merge_pretrained

NUM_CLASSES = 7  # not torchvision's default, so the converters must read it from the heads
# Odd sizes: the resize back to the input interpolates unevenly. At 113x47, layer4 is 15x6 (output stride 8), so the
# off-centre taps of ASPP's rate-12 branch reach the features along the height (at rates above the map's size only
# the centre tap does; test_deeplab_head_on_other_channels_matches_torchvision covers every tap at small rates).
SIZE = (113, 47)

TORCH_BUILDERS = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "fcn_resnet101": segmentation.fcn_resnet101,
    "deeplabv3_resnet50": segmentation.deeplabv3_resnet50,
    "deeplabv3_resnet101": segmentation.deeplabv3_resnet101,
}
SEGMENTATION = ("fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101")
# torchvision's published parameter counts (the weights' meta 'num_params'; 21 classes and the auxiliary head for
# the segmentation models, 1000 classes for the classifiers).
PUBLISHED_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet101": 44_549_160,
    "fcn_resnet101": 54_314_346,
    "deeplabv3_resnet50": 42_004_074,
    "deeplabv3_resnet101": 60_996_202,
}


def build_torch(name: str, num_classes: int, **kwargs) -> torch.nn.Module:
  if name in SEGMENTATION:
    kwargs.update(weights_backbone=None, aux_loss=True)
  return TORCH_BUILDERS[name](weights=None, num_classes=num_classes, **kwargs)


@pytest.fixture(scope="module")
def torch_model():
  """name -> the torchvision model with random weights and BatchNorm statistics, in eval mode, built once."""
  @functools.cache
  def get(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    num_classes = NUM_CLASSES if name in SEGMENTATION else 10
    return randomize_batch_norm(build_torch(name, num_classes), seed=len(name)).eval()
  return get


@pytest.fixture(scope="module")
def init_shapes():
  """(name, options) -> the shapes of the fcnjax model's own variables, from jax.eval_shape (nothing computed)."""
  @functools.cache
  def get(name: str, **options):
    model = models.build_model({"name": name, **options})
    return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  return get


def param_count(variables) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(variables["params"]))


# ---------------------------------------------------------------------------------------------------------------------
# (a) outputs: the converted weights in fcnjax give torchvision's outputs


def _compare(name: str, torch_model, init_shapes, x: torch.Tensor, **options):
  reference = torch_model(name)
  variables = get_converter(name)(reference.state_dict())
  assert shapes(variables) == shapes(init_shapes(name, **options)), f"{name}: converted tree != the model's own"
  with torch.no_grad():
    expected = reference(x)
  model = models.build_model({"name": name, **options})
  out = jax.jit(model.apply)(variables, nchw_to_nhwc(x))
  if not isinstance(expected, dict):  # a classifier's logits
    expected = {"out": expected.numpy()}
  else:
    expected = {k: v.numpy().transpose(0, 2, 3, 1) for k, v in expected.items()}
  assert set(out) == set(expected)
  for key in expected:
    assert_close(out[key], expected[key], f"{name} {key!r}")


# resnet34's and resnet101's blocks are resnet18's and the segmentation models' ResNet-101 trunk, with resnet50's
# pooling and fc (test_resnet.py): their converted trees are checked in (b).
@pytest.mark.slow
def test_resnet18_logits_match_torchvision(torch_model, init_shapes):
  _compare("resnet18", torch_model, init_shapes, torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(3)),
           num_classes=10)


@pytest.mark.slow
@pytest.mark.parametrize("name", SEGMENTATION)
def test_segmentation_out_and_aux_match_torchvision(torch_model, init_shapes, name):
  _compare(name, torch_model, init_shapes, torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(4)),
           num_classes=NUM_CLASSES)


def test_deeplab_head_on_other_channels_matches_torchvision():
  """DeepLabHead alone on 40 input channels (not ResNet's 2048), as another backbone would feed it, with rates
  below the 9x7 map's size so that every tap of every atrous kernel reaches the features."""
  torch.manual_seed(0)
  rates = (1, 2, 5)
  head = randomize_batch_norm(segmentation.deeplabv3.DeepLabHead(40, 5, atrous_rates=rates), seed=5).eval()
  variables = _head_variables(head, 40, 5)
  x = torch.randn(2, 40, 9, 7, generator=torch.Generator().manual_seed(6))
  with torch.no_grad():
    expected = head(x).numpy().transpose(0, 2, 3, 1)
  out = jax.jit(DeepLabHead(num_classes=5, atrous_rates=rates).apply)(variables, nchw_to_nhwc(x))
  assert_close(out, expected, f"DeepLabHead(40, 5, atrous_rates={rates})")


def _head_variables(head: torch.nn.Module, in_channels: int, num_classes: int):
  from fcnjax.conversion.deeplabv3 import deeplab_head_layers  # pylint: disable=g-import-not-at-top
  layers = list(deeplab_head_layers("head", "head", in_channels, num_classes))
  state = {f"head.{k}": v for k, v in head.state_dict().items() if not k.endswith("num_batches_tracked")}
  assert set(state) == set(expected_shapes(layers))
  return {collection: tree["head"] for collection, tree in convert_layers(state, layers).items()}


@pytest.mark.slow
def test_deeplab_head_training_gradients_and_batch_stats():
  """Train mode of the head torchvision adds: every parameter gets a finite, non-zero gradient (the pooling
  branch's too), and the running statistics of the BatchNorms ahead of the projection's Dropout(0.5) move as
  torch's do. (The last BatchNorm sees the dropout mask, which torch and jax draw differently.)"""
  torch.manual_seed(0)
  head = randomize_batch_norm(segmentation.deeplabv3.DeepLabHead(16, 3), seed=7)
  variables = _head_variables(head, 16, 3)
  x = torch.randn(2, 16, 9, 7, generator=torch.Generator().manual_seed(8))
  model = DeepLabHead(num_classes=3)

  def loss_fn(params, images):
    out, state = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images, train=True,
                             rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"])
    return jnp.mean(out ** 2), state["batch_stats"]

  (loss, new_stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"],
                                                                                nchw_to_nhwc(x))
  loss, new_stats, grads = jax.device_get((loss, new_stats, grads))
  assert np.isfinite(loss)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)) and np.any(g != 0), f"gradient at {jax.tree_util.keystr(path)}"

  head.train()
  with torch.no_grad():
    head(x)
  after = head.state_dict()
  torch_names = {"conv_1x1": "0.convs.0.1", "atrous_0": "0.convs.1.1", "atrous_1": "0.convs.2.1",
                 "atrous_2": "0.convs.3.1", "pooling": "0.convs.4.2", "project": "0.project.1"}
  for branch, torch_name in torch_names.items():
    for ours, theirs in (("mean", "running_mean"), ("var", "running_var")):
      old = variables["batch_stats"]["aspp"][branch]["bn"][ours]
      new = new_stats["aspp"][branch]["bn"][ours]
      assert_close(new - 0.9 * old, after[f"{torch_name}.{theirs}"].numpy() - 0.9 * old,
                   f"DeepLabHead {branch} running {ours} update")
  assert not np.allclose(new_stats["bn"]["var"], variables["batch_stats"]["bn"]["var"])


# ---------------------------------------------------------------------------------------------------------------------
# (b) parameter counts (torchvision's own, and the published ones at 21 / 1000 classes) and variable trees


def _torch_param_count(name: str, num_classes: int) -> int:
  with torch.device("meta"):  # shapes only
    return sum(p.numel() for p in build_torch(name, num_classes).parameters())


@pytest.mark.parametrize("name", [
    "resnet18", pytest.param("resnet34", marks=pytest.mark.slow), pytest.param("resnet101", marks=pytest.mark.slow),
    pytest.param("fcn_resnet101", marks=pytest.mark.slow), "deeplabv3_resnet50",
    pytest.param("deeplabv3_resnet101", marks=pytest.mark.slow)])
def test_parameter_counts_and_converted_trees_are_torchvisions(init_shapes, name):
  num_classes = 21 if name in SEGMENTATION else 1000
  ours = init_shapes(name, num_classes=num_classes)
  assert param_count(ours) == _torch_param_count(name, num_classes) == PUBLISHED_PARAMS[name]
  # Every tensor of torchvision's state_dict lands on one of the model's own variables, with its shape.
  state = {k: np.zeros(tuple(v.shape), np.float32) for k, v in _meta_state_dict(name, num_classes).items()}
  assert shapes(get_converter(name)(state)) == shapes(ours)


# ---------------------------------------------------------------------------------------------------------------------
# (c) refusals: the converters name the keys that do not fit; the models refuse what torchvision refuses


def _meta_state_dict(name: str, num_classes: int = 21, **kwargs) -> dict:
  with torch.device("meta"):
    return build_torch(name, num_classes, **kwargs).state_dict()


def test_deeplabv3_converter_names_a_misshaped_key_and_a_foreign_head():
  state = dict(_meta_state_dict("deeplabv3_resnet50"))
  state["classifier.0.project.0.weight"] = torch.zeros(256, 1024, 1, 1, device="meta")
  with pytest.raises(ConversionError) as info:
    get_converter("deeplabv3_resnet50")(state, source="bad.pth")
  message = str(info.value)
  assert message.startswith("bad.pth (torchvision deeplabv3_resnet50, aux_loss=True) does not fit")
  assert ("mis-shaped keys (1): classifier.0.project.0.weight: got (256, 1024, 1, 1), expected (256, 1280, 1, 1)"
          in message)
  assert "missing" not in message and "unexpected" not in message

  # fcn_resnet101's FCNHead is not a DeepLabHead, and a ResNet-50 trunk is not a ResNet-101's.
  with pytest.raises(ConversionError) as info:
    get_converter("deeplabv3_resnet101")(_meta_state_dict("fcn_resnet101"))
  message = str(info.value)
  assert "classifier.0.convs.0.0.weight" in message
  assert "unexpected keys (4): classifier.0.weight, classifier.1.bias, classifier.1.running_mean" in message
  with pytest.raises(ConversionError, match=r"missing keys \(\d+\): backbone.layer3.10.bn1.bias"):
    get_converter("fcn_resnet101")(_meta_state_dict("deeplabv3_resnet50"))


def test_resnet_converters_tell_the_depths_apart():
  with pytest.raises(ConversionError, match=r"unexpected keys \(\d+\): layer1.2.bn1.bias"):
    get_converter("resnet18")(_meta_state_dict("resnet34", 1000))
  with pytest.raises(ConversionError) as info:
    get_converter("resnet34")(_meta_state_dict("resnet50", 1000))
  message = str(info.value)
  assert "unexpected keys (85): layer1.0.bn3.bias" in message and "missing keys" not in message
  assert "layer1.0.conv1.weight: got (64, 64, 1, 1), expected (64, 64, 3, 3)" in message


@pytest.mark.parametrize("name", ["deeplabv3_resnet50", pytest.param("fcn_resnet101", marks=pytest.mark.slow)])
def test_segmentation_converters_without_the_auxiliary_head(init_shapes, name):
  state = {k: np.zeros(tuple(v.shape), np.float32) for k, v in _meta_state_dict(name, NUM_CLASSES).items()
           if not k.startswith("aux_classifier.")}
  convert = get_converter(name)
  variables = convert(state)
  assert shapes(variables) == shapes(init_shapes(name, num_classes=NUM_CLASSES, aux_loss=False))
  with pytest.raises(ConversionError, match="aux_loss=False"):
    convert(state, aux_loss=True)


def test_basic_block_refuses_dilation_as_torchvision_does():
  with pytest.raises(NotImplementedError, match="Dilation"):
    torchvision.models.resnet18(weights=None, replace_stride_with_dilation=[False, False, True])
  model = models.build_model({"name": "resnet18", "replace_stride_with_dilation": (False, False, True)})
  with pytest.raises(ValueError, match="BasicBlock .* does not support dilation"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_aspp_pooling_refuses_to_train_on_one_image():
  """torch's BatchNorm raises on one value per channel in training; the image pooling branch has exactly that."""
  aspp = ASPP(atrous_rates=(2,), features=4)
  x = jnp.zeros((1, 5, 5, 3))
  variables = jax.eval_shape(aspp.init, jax.random.key(0), x)
  with pytest.raises(ValueError, match="at least 2 images"):
    jax.eval_shape(lambda v, x: aspp.apply(v, x, train=True, mutable=["batch_stats"],
                                           rngs={"dropout": jax.random.key(1)}), variables, x)
  out, _ = jax.eval_shape(lambda v, x: aspp.apply(v, x, train=True, mutable=["batch_stats"],
                                                  rngs={"dropout": jax.random.key(1)}),
                          variables, jnp.zeros((2, 5, 5, 3)))
  assert out.shape == (2, 5, 5, 4)


# ---------------------------------------------------------------------------------------------------------------------
# (d) ImageNet weights initialise the segmentation models' trunks by path


@pytest.mark.slow
@pytest.mark.parametrize("depth, name", [(101, "fcn_resnet101"), (101, "deeplabv3_resnet101"),
                                         (50, "deeplabv3_resnet50")])
def test_imagenet_resnet_initialises_the_trunk(init_shapes, depth, name):
  layers = [*resnet_trunk_layers(depth, "", ("backbone",)), ("fc", ("fc",), "linear", (1000, 2048))]
  state = {k: np.full(shape, 0.5, np.float32) for k, shape in expected_shapes(layers).items()}
  imagenet = get_converter(f"resnet{depth}")(state)
  merged, report = merge_pretrained(init_shapes(name, num_classes=3), imagenet, scope="backbone")
  assert report["unused"] == ["params/fc/bias", "params/fc/kernel"] and not report["skipped"]
  trunk = {p for p in report["loaded"]}
  assert trunk and all(p.split("/")[1] == "backbone" for p in trunk)
  assert all(p.split("/")[1] != "backbone" for p in report["left_at_init"])
  assert np.all(merged["params"]["backbone"]["layer3_5"]["conv2"]["kernel"] == 0.5)


# ---------------------------------------------------------------------------------------------------------------------
# (e) converted weights by name: Segmenter.from_weights builds the model and reads the class count


@pytest.mark.slow
def test_segmenter_from_converted_deeplabv3_weights(tmp_path):
  import fcnjax  # pylint: disable=g-import-not-at-top
  from fcnjax.pretrained import save_variables  # pylint: disable=g-import-not-at-top
  state = {k: np.full(tuple(v.shape), 0.5, np.float32)
           for k, v in _meta_state_dict("deeplabv3_resnet50", NUM_CLASSES).items()}
  path = save_variables(tmp_path / "deeplabv3", get_converter("deeplabv3_resnet50")(state))
  seg = fcnjax.Segmenter.from_weights(path, model="deeplabv3_resnet50")
  assert seg.model.num_classes == NUM_CLASSES and seg.model.aux_loss
  # The converted weights are those Segmenter applies (read back through orbax).
  assert np.all(seg.variables["params"]["classifier"]["aspp"]["pooling"]["conv"]["kernel"] == 0.5)
