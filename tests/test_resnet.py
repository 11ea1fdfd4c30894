"""Parity of fcnjax's ResNet-50 and fcn_resnet50 with torchvision, through fcnjax.conversion.resnet.

The torchvision models are built without weights and their BatchNorm affine parameters and running statistics are
randomised before conversion: with fresh statistics (mean 0, var 1, scale 1, shift 0) eval-mode BatchNorm is nearly
the identity, and a transposed or mis-assigned statistic would go unnoticed.
"""
from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np

from conftest import record_parity
import pytest

import torch  # noqa: E402  (a hard import: parity tests must run, never skip)
import torchvision  # noqa: E402
from torch_reference import randomize_batch_norm  # noqa: E402

from fcnjax.conversion.common import ConversionError  # noqa: E402
from fcnjax.conversion.resnet import convert_fcn_resnet50, convert_resnet50  # noqa: E402
from fcnjax.models.fcn_resnet import fcn_resnet50  # noqa: E402
from fcnjax.models.resnet import ResNetTrunk, resnet50, resnet_trunk  # noqa: E402

# max|fcnjax - torch| <= RTOL * max|torch| on every compared tensor (float32 on CPU; measured ~1e-6 relative).
RTOL = 1e-4
NUM_CLASSES = 7  # not torchvision's default, so the converters must read it from the head's weight


def nchw_to_nhwc(x: torch.Tensor) -> jnp.ndarray:
  return jnp.asarray(x.detach().numpy().transpose(0, 2, 3, 1))


def assert_close(actual, expected, what: str):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != torch {expected.shape}"
  diff, scale = np.abs(actual - expected).max(), np.abs(expected).max()
  assert scale > 0, f"{what}: torch output is all zeros, the comparison would prove nothing"
  record_parity(f"resnet: {what}", diff, scale)
  assert diff <= RTOL * scale, f"{what}: max|diff| {diff:.3g} > {RTOL} * max|torch| {scale:.3g}"
  return diff, scale


def shapes(tree):
  return jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), tree)


@pytest.fixture(scope="module")
def torch_resnet50():
  torch.manual_seed(0)
  return randomize_batch_norm(torchvision.models.resnet50(weights=None, num_classes=10), seed=1).eval()


@pytest.fixture(scope="module")
def torch_fcn():
  torch.manual_seed(0)
  model = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=NUM_CLASSES,
                                                       aux_loss=True)
  return randomize_batch_norm(model, seed=2).eval()


@pytest.fixture(scope="module")
def fcn_variables(torch_fcn):
  return convert_fcn_resnet50(torch_fcn.state_dict())


# ---------------------------------------------------------------------------------------------------------------------
# (a) ResNet-50 classifier


def test_resnet50_logits_and_layer4_match_torchvision(torch_resnet50):
  x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
  captured = {}
  hook = torch_resnet50.layer4.register_forward_hook(lambda m, i, o: captured.update(layer4=o))
  with torch.no_grad():
    logits = torch_resnet50(x).numpy()
  hook.remove()

  variables = convert_resnet50(torch_resnet50.state_dict())
  model = resnet50(num_classes=10)
  is_trunk = lambda module, method: isinstance(module, ResNetTrunk)  # noqa: E731
  out, state = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=is_trunk))(variables, nchw_to_nhwc(x))
  layer4 = state["intermediates"]["backbone"]["__call__"][0]["layer4"]

  assert_close(out["out"], logits, "resnet50 logits")
  assert_close(layer4, captured["layer4"].numpy().transpose(0, 2, 3, 1), "resnet50 layer4")


# ---------------------------------------------------------------------------------------------------------------------
# (b) fcn_resnet50, at a size divisible by 8 and at an odd one (the bilinear resize then interpolates unevenly)


@pytest.mark.parametrize("size", [(224, 224), pytest.param((225, 193), marks=pytest.mark.slow)])
def test_fcn_resnet50_out_and_aux_match_torchvision(torch_fcn, fcn_variables, size):
  x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(4))
  with torch.no_grad():
    expected = torch_fcn(x)
  model = fcn_resnet50(num_classes=NUM_CLASSES, aux_loss=True)
  out = jax.jit(model.apply)(fcn_variables, nchw_to_nhwc(x))
  assert set(out) == {"out", "aux"}
  for key in ("out", "aux"):
    assert_close(out[key], expected[key].numpy().transpose(0, 2, 3, 1), f"fcn_resnet50 {key!r} at {size}")


# ---------------------------------------------------------------------------------------------------------------------
# (c) shapes and variable trees


@pytest.mark.parametrize("aux_loss", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_fcn_resnet50_output_shapes(aux_loss):
  model = fcn_resnet50(num_classes=NUM_CLASSES, aux_loss=aux_loss)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  for h, w in [(64, 64), (97, 61), (33, 47)]:
    out = jax.eval_shape(model.apply, variables, jnp.zeros((2, h, w, 3)))
    assert set(out) == ({"out", "aux"} if aux_loss else {"out"})
    for value in out.values():
      assert value.shape == (2, h, w, NUM_CLASSES)


def test_fcn_trunk_has_output_stride_8_and_resnet50_32():
  x = jnp.zeros((1, 64, 96, 3))
  for dilation, stride in [((False, True, True), 8), ((False, False, False), 32)]:
    trunk = resnet_trunk(50, dilation)
    features = jax.eval_shape(lambda x: trunk.init_with_output(jax.random.key(0), x)[0], x)
    assert features["layer4"].shape == (1, 64 // stride, 96 // stride, 2048)
    assert features["layer3"].shape == (1, 64 // min(stride, 16), 96 // min(stride, 16), 1024)


def test_converted_trees_match_the_models_own(torch_resnet50, fcn_variables):
  x = jnp.zeros((1, 32, 32, 3))
  resnet_init = jax.eval_shape(resnet50(num_classes=10).init, jax.random.key(0), x)
  fcn_init = jax.eval_shape(fcn_resnet50(num_classes=NUM_CLASSES).init, jax.random.key(0), x)
  resnet_variables = convert_resnet50(torch_resnet50.state_dict())
  assert shapes(resnet_variables) == shapes(resnet_init)
  assert shapes(fcn_variables) == shapes(fcn_init)
  # ImageNet resnet50 weights initialise fcn_resnet50's trunk by path: same tree under 'backbone'.
  for collection in ("params", "batch_stats"):
    assert shapes(resnet_variables[collection]["backbone"]) == shapes(fcn_variables[collection]["backbone"])


# ---------------------------------------------------------------------------------------------------------------------
# (d) training mode: gradients, and BatchNorm running statistics updated like torch's


@pytest.mark.slow
def test_fcn_resnet50_train_step_gradients_and_batch_stats(torch_fcn, fcn_variables):
  x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
  model = fcn_resnet50(num_classes=NUM_CLASSES, aux_loss=True)
  labels = jax.random.randint(jax.random.key(1), (2, 64, 64), 0, NUM_CLASSES)

  def loss_fn(params, batch_stats, images):
    out, state = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                             rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"])
    def ce(logits):
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], axis=-1))
    return ce(out["out"]) + 0.5 * ce(out["aux"]), state["batch_stats"]

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss, new_stats), grads = grad_fn(fcn_variables["params"], fcn_variables["batch_stats"], nchw_to_nhwc(x))
  # Checked in numpy: comparing jax arrays leaf by leaf would compile one tiny program per shape.
  loss, new_stats, grads = jax.device_get((loss, new_stats, grads))
  assert np.isfinite(loss)
  flat_grads = jax.tree_util.tree_leaves_with_path(grads)
  assert len(flat_grads) == len(jax.tree_util.tree_leaves(fcn_variables["params"]))
  for path, g in flat_grads:
    name = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(g)), f"non-finite gradient at {name}"
    assert np.any(g != 0), f"zero gradient at {name}"

  # torch: one train-mode forward updates running stats with momentum 0.1; ours must match it.
  torch_train = copy.deepcopy(torch_fcn).train()
  batch_norms = [name for name, m in torch_train.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    torch_train(x)
  torch_after = torch_train.state_dict()
  torch_before = torch_fcn.state_dict()
  old_stats = convert_fcn_resnet50(torch_before)["batch_stats"]

  flat_new = dict(jax.tree_util.tree_leaves_with_path(new_stats))
  assert len(batch_norms) == len(flat_new) // 2 == 55  # 53 in the trunk, one in each head
  for torch_name in batch_norms:
    path = _flax_path(torch_name)
    old_mean, old_var = (np.asarray(_get(old_stats, path)[k]) for k in ("mean", "var"))
    new_mean, new_var = (np.asarray(_get(new_stats, path)[k]) for k in ("mean", "var"))
    torch_mean = torch_after[f"{torch_name}.running_mean"].numpy()
    torch_var = torch_after[f"{torch_name}.running_var"].numpy()
    assert not np.allclose(new_mean, old_mean) and not np.allclose(new_var, old_var), f"{path}: stats unchanged"
    # fcnjax.ops.BatchNorm folds the batch's unbiased variance into running_var, as torch does.
    assert_close(new_mean - 0.9 * old_mean, torch_mean - 0.9 * old_mean, f"{path} running mean update")
    assert_close(new_var - 0.9 * old_var, torch_var - 0.9 * old_var, f"{path} running var update")


def _flax_path(torch_name: str) -> tuple[str, ...]:
  """'backbone.layer2.0.downsample.1' -> ('backbone', 'layer2_0', 'downsample_1'); heads' '1' -> 'bn'."""
  parts = torch_name.split(".")
  if parts[0] in ("classifier", "aux_classifier"):
    return (parts[0], "bn")
  if len(parts) == 2:
    return tuple(parts)
  return (parts[0], f"{parts[1]}_{parts[2]}", "_".join(parts[3:]))


def _get(tree, path):
  for name in path:
    tree = tree[name]
  return tree


# ---------------------------------------------------------------------------------------------------------------------
# (e) the converters name what does not fit


def test_converters_refuse_a_vgg16_state_dict():
  with torch.device("meta"):  # shapes only: no 138M-parameter initialisation
    vgg_state = torchvision.models.vgg16(weights=None).state_dict()
  for convert in (convert_resnet50, convert_fcn_resnet50):
    with pytest.raises(ConversionError) as info:
      convert(vgg_state)
    message = str(info.value)
    assert "missing keys" in message and "unexpected keys" in message
    assert "features.0.weight" in message and "classifier.6.weight" in message


def test_convert_resnet50_names_missing_extra_and_misshaped_keys(torch_resnet50):
  state = dict(torch_resnet50.state_dict())
  del state["layer3.2.bn2.running_var"]
  state["layer5.0.conv1.weight"] = torch.zeros(1)
  state["layer2.0.conv2.weight"] = torch.zeros(128, 128, 1, 1)
  with pytest.raises(ConversionError) as info:
    convert_resnet50(state)
  message = str(info.value)
  assert "missing keys (1): layer3.2.bn2.running_var" in message
  assert "unexpected keys (1): layer5.0.conv1.weight" in message
  assert "layer2.0.conv2.weight: got (128, 128, 1, 1), expected (128, 128, 3, 3)" in message
  # num_batches_tracked may be present or absent
  without = {k: v for k, v in torch_resnet50.state_dict().items() if not k.endswith("num_batches_tracked")}
  assert shapes(convert_resnet50(without)) == shapes(convert_resnet50(torch_resnet50.state_dict()))


def test_convert_fcn_resnet50_names_bad_keys_and_handles_a_missing_aux_head(torch_fcn, fcn_variables):
  state = dict(torch_fcn.state_dict())
  del state["classifier.1.running_mean"]
  state["aux_classifier.4.weight"] = torch.zeros(NUM_CLASSES + 1, 256, 1, 1)
  with pytest.raises(ConversionError) as info:
    convert_fcn_resnet50(state)
  message = str(info.value)
  assert "missing keys (1): classifier.1.running_mean" in message
  assert (f"aux_classifier.4.weight: got ({NUM_CLASSES + 1}, 256, 1, 1), expected ({NUM_CLASSES}, 256, 1, 1)"
          in message)

  no_aux = {k: v for k, v in torch_fcn.state_dict().items() if not k.startswith("aux_classifier.")}
  variables = convert_fcn_resnet50(no_aux)
  assert "aux_classifier" not in variables["params"] and "aux_classifier" not in variables["batch_stats"]
  init = jax.eval_shape(fcn_resnet50(num_classes=NUM_CLASSES, aux_loss=False).init, jax.random.key(0),
                        jnp.zeros((1, 32, 32, 3)))
  assert shapes(variables) == shapes(init)
  # The same weights as the aux model's, minus the auxiliary head.
  for collection in ("params", "batch_stats"):
    expected = {k: v for k, v in fcn_variables[collection].items() if k != "aux_classifier"}
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables[collection], expected)
  # Dropping a present auxiliary head must be asked for; a missing one cannot be conjured.
  assert "aux_classifier" not in convert_fcn_resnet50(torch_fcn.state_dict(), aux_loss=False)["params"]
  with pytest.raises(ConversionError, match="aux_loss=False"):
    convert_fcn_resnet50(no_aux, aux_loss=True)


def test_bfloat16_compute_keeps_float32_params():
  model = fcn_resnet50(num_classes=NUM_CLASSES, dtype=jnp.bfloat16)
  x = jnp.zeros((1, 40, 56, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
  out = jax.eval_shape(model.apply, variables, x)
  assert out["out"].dtype == jnp.bfloat16 and out["out"].shape == (1, 40, 56, NUM_CLASSES)
