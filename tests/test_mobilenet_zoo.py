"""Parity of fcnjax's MobileNetV3-Large, lraspp_mobilenet_v3_large and deeplabv3_mobilenet_v3_large with torchvision,
through fcnjax.conversion.mobilenet_v3.

The torchvision models are built without weights and their BatchNorm affine parameters and running statistics are
randomised before conversion (fresh statistics make eval-mode BatchNorm nearly the identity, and a mis-assigned one
would go unnoticed). Outputs are compared at 67x53, a size no stride divides, so every padding, the dilated stage
and each bilinear resize meet uneven maps.
"""
from __future__ import annotations

import collections
import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_experiment, record_parity

import torch  # noqa: E402  (a hard import: parity tests must run, never skip)
import torchvision  # noqa: E402

from fcnjax import models  # noqa: E402
from fcnjax.conversion import CONVERTERS, get_converter  # noqa: E402
from fcnjax.conversion.common import ConversionError  # noqa: E402
from fcnjax.conversion.mobilenet_v3 import (convert_deeplabv3_mobilenet_v3_large,  # noqa: E402
                                            convert_lraspp_mobilenet_v3_large, convert_mobilenet_v3_large)
from fcnjax.models.mobilenet_v3 import (MobileNetV3LargeTrunk, hardsigmoid, hardswish,  # noqa: E402
                                        make_divisible)
from fcnjax.ops import depthwise  # noqa: E402
from test_resnet import nchw_to_nhwc  # noqa: E402
from torch_reference import randomize_batch_norm  # noqa: E402

# max|fcnjax - torch| <= RTOL * max|torch| on every compared tensor (float32 on CPU).
RTOL = 1e-5
NUM_CLASSES = 7  # not torchvision's default, so the converters must read it from the heads
SIZE = (67, 53)
segmentation = torchvision.models.segmentation


def assert_close(actual, expected, what: str, rtol: float = RTOL):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != torch {expected.shape}"
  diff, scale = np.abs(actual - expected).max(), np.abs(expected).max()
  assert scale > 0, f"{what}: torch output is all zeros, the comparison would prove nothing"
  record_parity(f"mobilenet_v3: {what}", diff, scale)
  assert diff <= rtol * scale, f"{what}: max|diff| {diff:.3g} > {rtol} * max|torch| {scale:.3g}"


def shapes(tree):
  return jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), tree)


def init_shapes(model, size=(32, 32)):
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((1, *size, 3)))


def param_count(variables) -> int:
  return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree_util.tree_leaves(variables["params"]))


def torch_param_count(model: torch.nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def meta_state_dict(builder, **kwargs) -> dict:
  """A torchvision model's state_dict as shapes only (no initialisation)."""
  with torch.device("meta"):
    return builder(weights=None, **kwargs).state_dict()


def image(seed: int, batch: int = 1) -> torch.Tensor:
  return torch.randn(batch, 3, *SIZE, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# (a) the pieces: activations, squeeze channels, depthwise convolutions


def test_hardswish_and_hardsigmoid_values_and_gradients_match_torch():
  # The kinks at -3 and 3 (torch's gradients there are one-sided rules, not autodiff of a clip), and values around.
  points = np.concatenate([[-6.0, -3.0, -2.9999998, 0.0, 2.9999998, 3.0, 6.0],
                           np.random.default_rng(0).uniform(-5, 5, 200)]).astype(np.float32)
  for jax_fn, torch_fn in ((hardswish, torch.nn.functional.hardswish),
                           (hardsigmoid, torch.nn.functional.hardsigmoid)):
    x = torch.tensor(points, requires_grad=True)
    y = torch_fn(x)
    (grad,) = torch.autograd.grad(y.sum(), x)
    value, vjp = jax.vjp(jax_fn, jnp.asarray(points))
    np.testing.assert_allclose(np.asarray(value), y.detach().numpy(), rtol=1e-6, atol=1e-7,
                               err_msg=jax_fn.__name__)
    np.testing.assert_allclose(np.asarray(vjp(jnp.ones_like(value))[0]), grad.numpy(), rtol=1e-6, atol=1e-7,
                               err_msg=f"{jax_fn.__name__} gradient")
    # forward-mode gives the same slopes
    _, tangent = jax.jvp(jax_fn, (jnp.asarray(points),), (jnp.ones(points.shape),))
    np.testing.assert_allclose(np.asarray(tangent), grad.numpy(), rtol=1e-6, atol=1e-7)


def test_squeeze_channels_follow_torchvisions_make_divisible():
  from torchvision.models._utils import _make_divisible  # pylint: disable=g-import-not-at-top
  for value in list(range(1, 300)) + [3.5, 7.9, 0.9 * 72, 1280 * 0.75]:
    assert make_divisible(value, 8) == _make_divisible(value, 8), value


@pytest.mark.slow
def test_mobilenet_convolutions_take_fcnjax_conv_and_the_depthwise_ones_fcnjax_depthwise(monkeypatch):
  """Every dense convolution of lraspp_mobilenet_v3_large goes through fcnjax.ops.conv's custom VJP (the CPU
  forms), every depthwise one (kernel (k, k, 1, C)) through fcnjax.ops.depthwise's (tests/test_depthwise.py checks
  it against torch)."""
  from test_conv import _conv_kernel_shapes  # pylint: disable=g-import-not-at-top
  routed_depthwise = []
  by_taps = depthwise.depthwise_conv

  def counting_depthwise(x, kernel, *args):
    routed_depthwise.append(tuple(kernel.shape))
    return by_taps(x, kernel, *args)

  monkeypatch.setattr(depthwise, "depthwise_conv", counting_depthwise)
  model = models.build_model(dict(name="lraspp_mobilenet_v3_large", num_classes=3))
  # 96 pixels: the dilated last stage's 6x6 map is wider than its 5x5 taps at rate 2, so no tap is dropped
  # (fcnjax.ops.conv.drop_padding_taps) and every kernel keeps its shape.
  layers, routed = _conv_kernel_shapes(model, (1, 96, 96, 3))
  depthwise_layers = [shape for shape in layers if shape[2] == 1]
  # A depthwise conv per block; 51 others: the stem, 14 expansions, 15 projections, 8 squeeze-excitations' fc1 and
  # fc2, the last conv and the head's 4.
  assert len(depthwise_layers) == 15 and len(layers) == 15 + 51
  assert routed == sorted((collections.Counter(layers) - collections.Counter(depthwise_layers)).elements())
  assert sorted(routed_depthwise) == sorted(depthwise_layers * 2)  # once in init's forward pass, once in apply's


# ---------------------------------------------------------------------------------------------------------------------
# (b) parameter counts and variable trees (shapes only)


def test_parameter_counts_match_torchvision_and_trunk_paths_are_shared():
  """Parameter counts equal torchvision's own and its published figures (weights meta 'num_params': the ImageNet
  classifier at 1000 classes, the segmentation models at 21); converted ImageNet mobilenet_v3_large weights
  initialise both segmentation trunks by path: the same tree under 'backbone' (dilation changes no shape)."""
  torch_models = {
      "mobilenet_v3_large": (torchvision.models.mobilenet_v3_large, {}, 5_483_032),
      "lraspp_mobilenet_v3_large": (segmentation.lraspp_mobilenet_v3_large, {}, 3_221_538),
      "deeplabv3_mobilenet_v3_large": (segmentation.deeplabv3_mobilenet_v3_large, {"aux_loss": True}, 11_029_328),
      "deeplabv3_mobilenet_v3_large without aux": (segmentation.deeplabv3_mobilenet_v3_large, {"aux_loss": False},
                                                   None),
  }
  variables = {}
  for name, (torch_builder, options, published) in torch_models.items():
    with torch.device("meta"):
      extra = {} if name == "mobilenet_v3_large" else {"weights_backbone": None}
      expected = torch_param_count(torch_builder(weights=None, **extra, **options))
    variables[name] = init_shapes(models.build_model(dict(name=name.split()[0], **options)))
    ours = param_count(variables[name])
    assert ours == expected, f"{name}: {ours} parameters, torchvision {expected}"
    assert published is None or ours == published, f"{name}: {ours} parameters, published {published}"
  classifier = variables.pop("mobilenet_v3_large")
  for name, tree in variables.items():
    for collection in ("params", "batch_stats"):
      assert shapes(tree[collection]["backbone"]) == shapes(classifier[collection]["backbone"]), name


@pytest.mark.slow
def test_dilated_trunk_has_output_stride_16_and_the_plain_one_32():
  x = jnp.zeros((1, 64, 96, 3))
  for dilated, stride in [(True, 16), (False, 32)]:
    trunk = MobileNetV3LargeTrunk(dilated)
    features = jax.eval_shape(lambda x: trunk.init_with_output(jax.random.key(0), x)[0], x)
    assert features["features_16"].shape == (1, 64 // stride, 96 // stride, 960)
    assert features["features_4"].shape == (1, 8, 12, 40)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params():
  model = models.build_model(dict(name="lraspp_mobilenet_v3_large", num_classes=NUM_CLASSES, dtype="bfloat16"))
  variables = init_shapes(model, (40, 56))
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
  out = jax.eval_shape(functools.partial(model.apply, train=False), variables, jnp.zeros((2, 40, 56, 3)))
  assert out["out"].dtype == jnp.bfloat16 and out["out"].shape == (2, 40, 56, NUM_CLASSES)


# ---------------------------------------------------------------------------------------------------------------------
# (c) the converters name what does not fit (shapes only: meta-device state_dicts)


def test_converters_name_a_misshaped_depthwise_key_and_missing_or_unexpected_ones():
  state = meta_state_dict(segmentation.lraspp_mobilenet_v3_large, weights_backbone=None, num_classes=NUM_CLASSES)
  state["backbone.4.block.1.0.weight"] = torch.zeros(72, 72, 5, 5, device="meta")  # a dense kernel where a
  del state["backbone.16.1.running_var"]                                           # depthwise one belongs
  state["classifier.extra.weight"] = torch.zeros(3, device="meta")
  with pytest.raises(ConversionError) as info:
    convert_lraspp_mobilenet_v3_large(state, source="lraspp.pth")
  message = str(info.value)
  assert message.startswith("lraspp.pth (torchvision lraspp_mobilenet_v3_large) does not fit")
  assert "backbone.4.block.1.0.weight: got (72, 72, 5, 5), expected (72, 1, 5, 5)" in message
  assert "missing keys (1): backbone.16.1.running_var" in message
  assert "unexpected keys (1): classifier.extra.weight" in message

  # The ImageNet classifier's trunk is 'features.*', the segmentation models' 'backbone.*'.
  with pytest.raises(ConversionError) as info:
    convert_mobilenet_v3_large(meta_state_dict(segmentation.lraspp_mobilenet_v3_large, weights_backbone=None))
  assert "missing keys" in str(info.value) and "features.0.0.weight" in str(info.value)

  state = meta_state_dict(torchvision.models.mobilenet_v3_large, num_classes=NUM_CLASSES)
  state["classifier.3.bias"] = torch.zeros(NUM_CLASSES + 1, device="meta")
  with pytest.raises(ConversionError, match=rf"classifier.3.bias: got \({NUM_CLASSES + 1},\), "
                                            rf"expected \({NUM_CLASSES},\)"):
    convert_mobilenet_v3_large(state)


def test_deeplabv3_converter_names_bad_keys_and_a_missing_aux_head():
  state = meta_state_dict(segmentation.deeplabv3_mobilenet_v3_large, weights_backbone=None, aux_loss=True,
                          num_classes=NUM_CLASSES)
  state["aux_classifier.0.weight"] = torch.zeros(10, 40, 1, 1, device="meta")
  state["backbone.13.block.1.0.weight"] = torch.zeros(672, 1, 3, 3, device="meta")
  with pytest.raises(ConversionError) as info:
    convert_deeplabv3_mobilenet_v3_large(state)
  message = str(info.value)
  assert "aux_loss=True" in message
  assert "aux_classifier.0.weight: got (10, 40, 1, 1), expected (10, 40, 3, 3)" in message
  assert "backbone.13.block.1.0.weight: got (672, 1, 3, 3), expected (672, 1, 5, 5)" in message
  no_aux = meta_state_dict(segmentation.deeplabv3_mobilenet_v3_large, weights_backbone=None, aux_loss=False)
  with pytest.raises(ConversionError, match="aux_loss=False"):
    convert_deeplabv3_mobilenet_v3_large(no_aux, aux_loss=True)


def test_converters_are_registered_for_the_command_line():
  for arch in ("mobilenet_v3_large", "lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"):
    assert CONVERTERS[arch][1] == arch and arch in models.MODELS
    assert get_converter(arch).__module__ == "fcnjax.conversion.mobilenet_v3"


# ---------------------------------------------------------------------------------------------------------------------
# (d) eval-mode outputs against torchvision (converted random weights)


@pytest.fixture(scope="module")
def torch_lraspp():
  torch.manual_seed(0)
  model = segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
  return randomize_batch_norm(model, seed=1).eval()


@pytest.mark.slow
def test_mobilenet_v3_large_logits_and_features_match_torchvision():
  torch.manual_seed(0)
  torch_model = randomize_batch_norm(torchvision.models.mobilenet_v3_large(weights=None, num_classes=10), seed=2)
  with torch.no_grad():  # torchvision initialises the Linear layers with std 0.01: make the logits matter
    for layer in (torch_model.classifier[0], torch_model.classifier[3]):
      layer.weight.normal_(0, 0.05)
      layer.bias.normal_(0, 0.1)
  torch_model.eval()
  x = image(3)
  captured = {}
  hook = torch_model.features[16].register_forward_hook(lambda m, i, o: captured.update(features=o))
  with torch.no_grad():
    logits = torch_model(x).numpy()
  hook.remove()

  variables = convert_mobilenet_v3_large(torch_model.state_dict())
  model = models.build_model(dict(name="mobilenet_v3_large", num_classes=10))
  assert shapes(variables) == shapes(init_shapes(model))
  is_trunk = lambda module, method: isinstance(module, MobileNetV3LargeTrunk)  # noqa: E731
  out, state = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=is_trunk))(variables, nchw_to_nhwc(x))
  features = state["intermediates"]["backbone"]["__call__"][0]["features_16"]
  assert_close(out["out"], logits, "mobilenet_v3_large logits")
  assert_close(features, nchw_to_nhwc(captured["features"]), "mobilenet_v3_large features 16")


@pytest.mark.slow
def test_lraspp_matches_torchvision(torch_lraspp):
  x = image(4)
  with torch.no_grad():
    expected = torch_lraspp(x)
  variables = convert_lraspp_mobilenet_v3_large(torch_lraspp.state_dict())
  model = models.build_model(dict(name="lraspp_mobilenet_v3_large", num_classes=NUM_CLASSES))
  assert shapes(variables) == shapes(init_shapes(model))
  out = jax.jit(model.apply)(variables, nchw_to_nhwc(x))
  assert set(out) == {"out"}
  assert_close(out["out"], nchw_to_nhwc(expected["out"]), f"lraspp_mobilenet_v3_large out at {SIZE}")


@pytest.mark.slow
def test_deeplabv3_mobilenet_matches_torchvision_with_and_without_aux():
  torch.manual_seed(0)
  torch_model = segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, aux_loss=True,
                                                          num_classes=NUM_CLASSES)
  torch_model = randomize_batch_norm(torch_model, seed=5).eval()
  x = image(6)
  with torch.no_grad():
    expected = torch_model(x)
  variables = convert_deeplabv3_mobilenet_v3_large(torch_model.state_dict())
  model = models.build_model(dict(name="deeplabv3_mobilenet_v3_large", num_classes=NUM_CLASSES, aux_loss=True))
  assert shapes(variables) == shapes(init_shapes(model))
  out = jax.jit(model.apply)(variables, nchw_to_nhwc(x))
  assert set(out) == {"out", "aux"}
  for key in ("out", "aux"):
    assert_close(out[key], nchw_to_nhwc(expected[key]), f"deeplabv3_mobilenet_v3_large {key!r} at {SIZE}")

  # Without the auxiliary head: the same weights less aux_classifier, and the same 'out'.
  no_aux_state = {k: v for k, v in torch_model.state_dict().items() if not k.startswith("aux_classifier.")}
  no_aux = convert_deeplabv3_mobilenet_v3_large(no_aux_state)
  model = models.build_model(dict(name="deeplabv3_mobilenet_v3_large", num_classes=NUM_CLASSES, aux_loss=False))
  assert shapes(no_aux) == shapes(init_shapes(model))
  assert "aux_classifier" not in convert_deeplabv3_mobilenet_v3_large(torch_model.state_dict(),
                                                                      aux_loss=False)["params"]
  out = jax.jit(model.apply)(no_aux, nchw_to_nhwc(x))
  assert set(out) == {"out"}
  assert_close(out["out"], nchw_to_nhwc(expected["out"]), "deeplabv3_mobilenet_v3_large 'out' without aux")


# ---------------------------------------------------------------------------------------------------------------------
# (e) training mode: gradients and BatchNorm statistics against torch's


@pytest.mark.slow
def test_lraspp_train_mode_gradients_and_batch_stats_match_torch(torch_lraspp):
  x = image(7, batch=2)
  labels = torch.randint(0, NUM_CLASSES, (2, *SIZE), generator=torch.Generator().manual_seed(8))
  torch_train = copy.deepcopy(torch_lraspp).train()
  torch_loss = torch.nn.functional.cross_entropy(torch_train(x)["out"], labels)
  torch_loss.backward()
  grads_state = {**torch_lraspp.state_dict(), **{k: p.grad for k, p in torch_train.named_parameters()}}
  expected_grads = convert_lraspp_mobilenet_v3_large(grads_state)["params"]
  torch_after = convert_lraspp_mobilenet_v3_large(torch_train.state_dict())["batch_stats"]

  variables = convert_lraspp_mobilenet_v3_large(torch_lraspp.state_dict())
  model = models.build_model(dict(name="lraspp_mobilenet_v3_large", num_classes=NUM_CLASSES))
  targets = jnp.asarray(labels.numpy())

  def loss_fn(params, images):
    out, state = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images, train=True,
                             mutable=["batch_stats"])
    log_p = jax.nn.log_softmax(out["out"])
    return -jnp.mean(jnp.take_along_axis(log_p, targets[..., None], axis=-1)), state["batch_stats"]

  (loss, new_stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"],
                                                                                nchw_to_nhwc(x))
  loss, new_stats, grads = jax.device_get((loss, new_stats, grads))
  np.testing.assert_allclose(loss, torch_loss.item(), rtol=1e-5)
  flat_expected = dict(jax.tree_util.tree_leaves_with_path(expected_grads))
  flat_grads = dict(jax.tree_util.tree_leaves_with_path(grads))
  assert flat_grads.keys() == flat_expected.keys()
  # Per tensor against its own scale. A bias just before a train-mode BatchNorm (through a residual sum and a 1x1
  # conv) has a gradient of 0 in exact arithmetic, as the batch mean removes any shift: its float32 gradients are
  # rounding noise in both libraries, so tensors whose gradient is below 1e-4 of the largest are held to the
  # all-tensor comparison below only.
  largest = max(np.abs(e).max() for e in flat_expected.values())
  relative = {jax.tree_util.keystr(p): np.abs(flat_grads[p] - e).max() / np.abs(e).max()
              for p, e in flat_expected.items() if np.abs(e).max() >= 1e-4 * largest}
  assert len(relative) >= 0.9 * len(flat_expected)
  worst = max(relative, key=relative.get)
  record_parity(f"mobilenet_v3: lraspp train-mode gradient, worst tensor ({worst})", relative[worst], 1.0)
  assert relative[worst] <= 1e-3, f"gradient of {worst}: max|diff| is {relative[worst]:.3g} of its max|torch|"
  total = np.concatenate([np.ravel(g) for g in flat_grads.values()])
  reference = np.concatenate([np.ravel(flat_expected[p]) for p in flat_grads])
  assert_close(total, reference, "lraspp train-mode gradients (all tensors)")
  # Running statistics after one train-mode forward: momentum 0.01 in the trunk, 0.1 in the head, as torch; each
  # update (new - old) against torch's, relative to its own size.
  before = dict(jax.tree_util.tree_leaves_with_path(variables["batch_stats"]))
  after = dict(jax.tree_util.tree_leaves_with_path(torch_after))
  updates = {jax.tree_util.keystr(p): (np.asarray(v) - before[p], np.asarray(after[p]) - before[p])
             for p, v in jax.tree_util.tree_leaves_with_path(new_stats)}
  # 46 BatchNorms in the trunk (stem, 14 expansions, 15 depthwise, 15 projections, last conv), 1 in the head
  assert len(updates) == 2 * 47
  relative = {k: np.abs(ours - theirs).max() / np.abs(theirs).max() for k, (ours, theirs) in updates.items()}
  worst = max(relative, key=relative.get)
  record_parity(f"mobilenet_v3: lraspp running-statistic update, worst ({worst})", relative[worst], 1.0)
  assert relative[worst] <= 1e-4, f"running statistic {worst}: max|diff| is {relative[worst]:.3g} of torch's update"


# ---------------------------------------------------------------------------------------------------------------------
# (f) experiments/synthetic_lraspp.py trains


@pytest.mark.slow
def test_synthetic_lraspp_config_trains_and_the_loss_falls():
  """The experiment's model, loss, optimiser and data pipeline, shrunk to 64-pixel images and a batch of 4, take six
  steps on one batch from variables drawn without flax's initialisers (whose compilation alone takes ~30 s on a
  2-core CPU)."""
  from fcnjax import data, optim, steps  # pylint: disable=g-import-not-at-top
  config = load_experiment("synthetic_lraspp")
  config.data.image_size = 64
  config.data.synthetic_train_examples = 8
  config.optim.warmup_steps = 0
  config.optim.schedule = "constant"
  config.optim.learning_rate = 3e-3
  num_steps = 6
  model = models.build_model(config.model)
  shapes_ = init_shapes(model, (64, 64))
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = path[-1].key
    if name in ("scale", "var"):
      return np.ones(leaf.shape, np.float32)
    if name in ("bias", "mean"):
      return np.zeros(leaf.shape, np.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))  # He initialisation, as torchvision's kaiming_normal_
    return (rng.standard_normal(leaf.shape) * np.sqrt(2 / fan_in)).astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(draw, shapes_)
  state = steps.create_train_state(model, optim.make_optimizer(config.optim, num_steps), variables,
                                   jax.random.key(1))
  train_step = jax.jit(functools.partial(steps.train_step, loss_config=config.loss,
                                         learning_rate_fn=optim.learning_rate_schedule(config.optim, num_steps)))
  batch = next(data.build_train_data(config.data, batch_size=4, seed=0).iterator(0))
  losses = []
  for _ in range(num_steps):
    state, metrics = train_step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < 0.7 * losses[0], losses
