"""VGG16 and FCN-32s/16s/8s against PyTorch: torchvision's vgg16 and the FCN-8s reference in tests/torch_reference.

Tolerance everywhere: max|ours - reference| <= 1e-4 * max|reference| (float32 on CPU; the frameworks sum in
different orders over up to 25088 terms per output; measured ~1e-6). Weights are random (no downloads):
torchvision's own init for the VGG16 trunk, random non-zero score and upscore weights so the heads are not trivially
zero. The crop offsets of FCN-32s/16s (no PyTorch reference here) are checked against the receptive-field arithmetic.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from conftest import record_parity
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

import torch  # noqa: E402  (a hard import: parity tests must run, never skip)
import torchvision  # noqa: E402

from fcnjax.conversion.common import ConversionError  # noqa: E402
from fcnjax.conversion.vgg import convert_vgg16  # noqa: E402
from fcnjax.models import build_model  # noqa: E402
from fcnjax.models import padding_band  # noqa: E402
from fcnjax.models.vgg import VGG16Features  # noqa: E402
from fcnjax.ops import native  # noqa: E402
from torch_reference import fcn as torch_fcn  # noqa: E402

RTOL = 1e-4
NUM_CLASSES = 21
FCN_NAMES = ("fcn32s", "fcn16s", "fcn8s")


def assert_parity(ours, ref, what: str) -> None:
  ours, ref = np.asarray(ours, dtype=np.float32), np.asarray(ref, dtype=np.float32)
  assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != torch {ref.shape}"
  diff, scale = float(np.max(np.abs(ours - ref))), float(np.max(np.abs(ref)))
  record_parity(f"vgg/fcn: {what}", diff, scale)
  assert scale > 0, f"{what}: the reference is all zeros, the comparison would prove nothing"
  assert diff <= RTOL * scale, f"{what}: max|diff| {diff:.3g} > {RTOL} * max|ref| {scale:.3g}"


def nchw_to_nhwc(x):
  return np.transpose(np.asarray(x), (0, 2, 3, 1))


def random_images(hw, seed=0):
  return np.random.default_rng(seed).standard_normal((1, 3, *hw), dtype=np.float32)


def param_shapes(model, hw):
  """The model's parameter tree as ShapeDtypeStructs: no compute, no random numbers drawn."""
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *hw, 3)))["params"]


def init_params_except_trunk(model, hw):
  """The model's own init for every leaf outside features/fc6/fc7/conv6/conv7.

  Selecting inside jit lets XLA drop the random draws of the ~120M trunk weights, which would take seconds on CPU.
  """
  trunk = ("features", "fc6", "fc7", "conv6", "conv7")

  def head(key):
    params = model.init(key, jnp.zeros((1, *hw, 3)))["params"]
    return {k: v for k, v in params.items() if k not in trunk}

  return jax.tree.map(np.asarray, jax.jit(head)(jax.random.key(0)))


def variables_from(shapes, *sources, rng=None):
  """Fills the tree `shapes` by path from the first source that has each path (shapes must agree).

  Paths in no source get random weights (N(0, 2 / fan_in) kernels, N(0, 0.1) biases) when `rng` is given.
  """
  flat_sources = [flatten_dict(s) for s in sources]
  filled = {}
  for path, leaf in flatten_dict(shapes).items():
    match = next((src[path] for src in flat_sources if path in src), None)
    if match is None:
      assert rng is not None, f"no weights for {'/'.join(path)}"
      std = np.sqrt(2.0 / np.prod(leaf.shape[:-1])) if path[-1] == "kernel" else 0.1
      match = std * rng.standard_normal(leaf.shape, dtype=np.float32)
    assert tuple(match.shape) == tuple(leaf.shape), f"{'/'.join(path)}: {match.shape} vs model {leaf.shape}"
    filled[path] = jnp.asarray(match)
  return {"params": unflatten_dict(filled)}


@pytest.fixture(scope="module")
def tv_vgg16():
  torch.manual_seed(0)
  return torchvision.models.vgg16(weights=None).eval()


@pytest.fixture(scope="module")
def tv_state(tv_vgg16):
  return {k: v.numpy() for k, v in tv_vgg16.state_dict().items()}


@pytest.fixture(scope="module")
def vgg_variables(tv_state):
  return convert_vgg16(tv_state)


@pytest.fixture(scope="module")
def reference_fcn8s(tv_vgg16):
  """The PyTorch FCN-8s with torchvision's VGG16 weights (as FCN's surgery does) and random non-zero heads."""
  torch.manual_seed(1)
  ref = torch_fcn.FCN8s(NUM_CLASSES).eval()
  with torch.no_grad():
    ref.features.load_state_dict(tv_vgg16.features.state_dict())
    ref.fc6.weight.copy_(tv_vgg16.classifier[0].weight.view(4096, 512, 7, 7))
    ref.fc6.bias.copy_(tv_vgg16.classifier[0].bias)
    ref.fc7.weight.copy_(tv_vgg16.classifier[3].weight.view(4096, 4096, 1, 1))
    ref.fc7.bias.copy_(tv_vgg16.classifier[3].bias)
    for score in (ref.score_fr, ref.score_pool4, ref.score_pool3):
      score.weight.normal_(0, 0.5 / np.sqrt(score.in_channels))
      score.bias.uniform_(-0.1, 0.1)
    # Off-diagonal, asymmetric noise on the bilinear kernels catches a flipped or transposed kernel layout.
    for up in (ref.upscore2, ref.upscore_pool4, ref.upscore8):
      up.weight.add_(0.1 * torch.randn_like(up.weight))
  return ref


# ---------------------------------------------------------------------------------------------------------------
# (a) VGG16 vs torchvision


def test_vgg16_matches_torchvision(tv_vgg16, vgg_variables):
  x = random_images((224, 224))
  with torch.no_grad():
    ref_pool5 = tv_vgg16.features(torch.from_numpy(x))
    ref_logits = tv_vgg16.classifier(torch.flatten(tv_vgg16.avgpool(ref_pool5), 1))
  model = build_model({"name": "vgg16"})

  @jax.jit
  def forward(variables, images):
    return model.apply(variables, images, capture_intermediates=lambda mdl, _: isinstance(mdl, VGG16Features))

  out, state = forward(vgg_variables, nchw_to_nhwc(x))
  pool5 = state["intermediates"]["features"]["__call__"][0][2]
  assert_parity(pool5, nchw_to_nhwc(ref_pool5), "vgg16 pool5 at 224x224")
  assert out["out"].shape == (1, 1, 1, 1000)
  assert_parity(out["out"][:, 0, 0], ref_logits, "vgg16 logits at 224x224")


# ---------------------------------------------------------------------------------------------------------------
# (b) FCN-8s ('paper') vs the PyTorch reference, trunk initialised from the converted torchvision VGG16 by path


@pytest.fixture(scope="module")
def fcn8s_variables(reference_fcn8s, vgg_variables):
  """features/fc6/fc7 from convert_vgg16 (paths shared with 'vgg16'), the heads from the PyTorch reference."""
  reference = torch_fcn.to_flax_variables(reference_fcn8s)["params"]
  shapes = param_shapes(build_model({"name": "fcn8s", "num_classes": NUM_CLASSES}), (1, 1))
  return variables_from(shapes, vgg_variables["params"], reference)


# One size that pads evenly and one odd size in each direction (each costs a full VGG at +200 pixels: run once).
@pytest.mark.parametrize("hw", [(224, 224), pytest.param((361, 479), marks=pytest.mark.slow)])
def test_fcn8s_matches_torch_reference(hw, reference_fcn8s, fcn8s_variables):
  model = build_model({"name": "fcn8s", "num_classes": NUM_CLASSES})
  x = random_images(hw, seed=1)
  with torch.no_grad():
    ref = reference_fcn8s(torch.from_numpy(x))
  out = jax.jit(model.apply)(fcn8s_variables, nchw_to_nhwc(x))["out"]
  assert_parity(out, nchw_to_nhwc(ref), f"fcn8s at {hw[0]}x{hw[1]}")


def test_band_cuts_of_the_fcn_trunk():
  """At 224 the padding of 100 leaves 95, 42 and 14 band pixels a side out of blocks 1-3 (the narrowest band less the
  one copied back from); blocks 4-5 and torchvision's padding of 1 have none."""
  cuts = padding_band.band_cuts(224, 100, (2, 2, 3, 3, 3), ceil_mode=True)
  assert [(c.left, c.right) for c in cuts] == [(95, 95), (42, 42), (14, 14), (0, 0), (0, 0)]
  assert all((c.left, c.right) == (0, 0) for c in padding_band.band_cuts(224, 1, (2, 2, 3, 3, 3), ceil_mode=False))


@pytest.mark.parametrize("hw", [(7, 9), pytest.param((1, 1), marks=pytest.mark.slow),
                                pytest.param((20, 13), marks=pytest.mark.slow)])
def test_cut_band_keeps_the_trunks_maps_and_gradients(hw):
  """VGG16Features with the band cut (the default) returns the maps of the whole computation and the same gradients,
  at an odd, a tiny and a non-square size. The gradients are compared with XLA's own convolutions: they keep the
  band's pixels exactly equal, so that max-pool ties break alike (the C++ kernels round them apart, a legitimate but
  different choice of subgradient)."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, *hw, 3)), jnp.float32)
  cut, whole = (VGG16Features(first_conv_padding=100, ceil_mode=True, cut_band=c) for c in (True, False))
  variables = cut.init(jax.random.key(0), x)
  # Non-zero biases, so that the band is not zero.
  variables = jax.tree_util.tree_map_with_path(
      lambda path, a: a + 0.1 * jnp.cos(jnp.arange(a.size, dtype=jnp.float32)) if path[-1].key == "bias" else a,
      variables)
  for ours, ref, name in zip(jax.jit(cut.apply)(variables, x), jax.jit(whole.apply)(variables, x),
                             ("pool3", "pool4", "pool5")):
    assert_parity(ours, ref, f"{name} with the band cut at {hw}")

  def loss(model):
    return lambda v: sum(jnp.sum(m * jnp.sin(jnp.arange(m.size, dtype=jnp.float32).reshape(m.shape)))
                         for m in model.apply(v, x))

  with native.kernels_enabled(False):
    grads, ref_grads = (jax.jit(jax.grad(loss(m)))(variables) for m in (cut, whole))
  for (path, ours), ref in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
    if np.any(np.asarray(ref)):
      assert_parity(ours, ref, f"gradient {jax.tree_util.keystr(path)} with the band cut at {hw}")


def intercept_trunk(hw, score_maps):
  """Runs an FCN with its VGG trunk replaced by zeros and the named score layers replaced by given maps.

  The trunk's output shapes come from the real VGG16Features (by shape evaluation, no compute), so the head sees
  exactly the geometry it sees in the real net; `score_maps[name](shape)` gives the map that layer returns.
  """
  pools = jax.eval_shape(lambda x: VGG16Features(first_conv_padding=100, ceil_mode=True).init_with_output(
      jax.random.key(0), x)[0], jnp.zeros((1, *hw, 3)))

  def interceptor(next_fun, args, kwargs, context):
    name, x = context.module.name, args[0] if args else None
    if name == "features":
      return tuple(jnp.zeros(p.shape) for p in pools)
    if name == "fc6":  # 7x7 VALID
      return jnp.zeros((x.shape[0], x.shape[1] - 6, x.shape[2] - 6, 4096))
    if name == "fc7":
      return x
    if name in score_maps:
      return score_maps[name](x.shape[:3])
    return next_fun(*args, **kwargs)

  return nn.intercept_methods(interceptor)


def feature_coordinates(shape):
  """A 2-class score map holding each position's own row (class 0) and column (class 1) index."""
  n, h, w = shape
  rows = jnp.broadcast_to(jnp.arange(h, dtype=jnp.float32)[None, :, None], (n, h, w))
  cols = jnp.broadcast_to(jnp.arange(w, dtype=jnp.float32)[None, None, :], (n, h, w))
  return jnp.stack([rows, cols], axis=-1)


# Score layer -> (stride, offset): its map position y has its receptive-field centre at input pixel stride * y + offset
# (fcn.py's docstring). Each FCN must place that score at that pixel: a wrong crop offset shifts it by whole pixels.
SCORE_CENTRES = {"score_fr": (32, 12.5), "score_pool4": (16, -91.5), "score_pool3": (8, -95.5)}


@pytest.mark.parametrize("name, score, first, last", [
    # Exact only where every upsampling interpolates between complete outputs of the one before: upscore (k64)
    # between score_fr's first and last centres (pixels 13 .. 32n - 20); upscore2 (k4) is complete for
    # u = 2 .. 2n - 1 and upscore_pool4 then for v = 6 .. 4n - 1, which narrows FCN-16s to pixels 21 .. 32n - 28
    # and FCN-8s to 25 .. 32n - 32 (n = fc6 positions per axis; at 361x479 these bounds are tight).
    ("fcn32s", "score_fr", 13, -20),
    ("fcn16s", "score_fr", 21, -28),
    ("fcn8s", "score_fr", 25, -32),
    # The skips are cropped, not interpolated, before their upsampling, whose centres cover the whole output.
    ("fcn16s", "score_pool4", None, None),
    ("fcn8s", "score_pool4", None, None),
    ("fcn8s", "score_pool3", None, None),
])
def test_fcn_crops_put_each_score_at_its_receptive_field_centre(name, score, first, last):
  """Each score map holds its own coordinates; bilinear upsampling + crops must return them at the right pixels.

  With bilinear upscore weights, an affine map is reproduced exactly, so pixel x must read (x - offset) / stride:
  the coordinate of the score whose receptive field is centred on x. This pins the crop offsets 19, 27, 31, 5 and 9
  to the receptive-field arithmetic independently of any reference implementation.
  """
  hw = (361, 479)
  model = build_model({"name": name, "num_classes": 2})
  variables = {"params": init_params_except_trunk(model, hw)}
  zero = lambda shape: jnp.zeros((*shape, 2))  # noqa: E731
  score_maps = {layer: zero for layer in SCORE_CENTRES}
  score_maps[score] = feature_coordinates
  with intercept_trunk(hw, score_maps):
    out = np.asarray(jax.jit(model.apply)(variables, jnp.zeros((1, *hw, 3)))["out"])[0]
  stride, centre = SCORE_CENTRES[score]
  expected = np.stack(np.meshgrid((np.arange(hw[0]) - centre) / stride, (np.arange(hw[1]) - centre) / stride,
                                  indexing="ij"), axis=-1)
  n = [-(-(size + 198) // 32) - 6 for size in hw]  # fc6 positions per axis
  window = tuple(slice(first, 32 * k + last + 1) if first is not None else slice(None) for k in n)
  assert_parity(out[window], expected[window], f"{name} {score} coordinates at 361x479")
  assert out[window].shape[0] > 300 and out[window].shape[1] > 400  # the check covers most of the image


# ---------------------------------------------------------------------------------------------------------------
# (c) output shapes


@pytest.mark.parametrize("name", FCN_NAMES)
@pytest.mark.parametrize("variant, sizes", [
    ("paper", [(1, 1), (2, 3), (33, 47), (224, 224), (361, 479)]),
    ("simple", [(32, 32), (33, 47), (224, 224), (361, 479)]),
])
def test_fcn_output_has_input_size(name, variant, sizes):
  model = build_model({"name": name, "variant": variant, "num_classes": 5})
  for hw in sizes:
    out = jax.eval_shape(model.init_with_output, jax.random.key(0), jnp.zeros((2, *hw, 3)))[0]["out"]
    assert out.shape == (2, *hw, 5), f"{name} {variant} at {hw}: {out.shape}"


def test_fcn_simple_rejects_inputs_below_32():
  model = build_model({"name": "fcn8s", "variant": "simple"})
  with pytest.raises(ValueError, match="at least 32x32"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 31, 64, 3)))


def test_fcn_rejects_unknown_variant():
  with pytest.raises(ValueError, match="'keras'"):
    build_model({"name": "fcn8s", "variant": "keras"})


def test_vgg16_score_map_shape():
  model = build_model({"name": "vgg16"})
  out = jax.eval_shape(model.init_with_output, jax.random.key(0), jnp.zeros((1, 361, 479, 3)))[0]["out"]
  assert out.shape == (1, 361 // 32 - 6, 479 // 32 - 6, 1000)
  with pytest.raises(ValueError, match="at least 224x224"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 223, 224, 3)))


def test_bfloat16_compute_keeps_float32_params():
  model = build_model({"name": "fcn8s", "dtype": "bfloat16"})
  out, variables = jax.eval_shape(model.init_with_output, jax.random.key(0), jnp.zeros((1, 33, 47, 3)))
  assert out["out"].dtype == jnp.bfloat16
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


# ---------------------------------------------------------------------------------------------------------------
# (d) gradients


# FCN-8s has every kind of layer of each head (FCN-32s/16s differ only in upscore kernel sizes); each case compiles
# a VGG backward pass. Sizes: the smallest each variant takes, odd ('paper' pads by 100: a 201x201 VGG).
@pytest.mark.slow
@pytest.mark.parametrize("name, variant, hw", [("fcn8s", "paper", (1, 1)), ("fcn8s", "simple", (35, 33))])
def test_gradients_finite_and_nonzero(name, variant, hw, vgg_variables):
  model = build_model({"name": name, "variant": variant, "num_classes": 3})
  # Random (non-zero) score layers: with their zero init no gradient would reach the trunk.
  variables = variables_from(param_shapes(model, hw), vgg_variables["params"], rng=np.random.default_rng(4))
  x = jnp.asarray(np.random.default_rng(5).standard_normal((1, *hw, 3)), dtype=jnp.float32)
  target = jnp.asarray(np.random.default_rng(6).standard_normal((1, *hw, 3)), dtype=jnp.float32)

  def loss(params):
    out = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(7)})["out"]
    return jnp.sum(out * target)

  grads = flatten_dict(jax.jit(jax.grad(loss))(variables["params"]))
  assert set(grads) == set(flatten_dict(variables["params"]))
  for path, g in grads.items():
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), f"{name}/{variant}: non-finite gradient for {'/'.join(path)}"
    assert np.any(g != 0), f"{name}/{variant}: zero gradient for {'/'.join(path)}"


# ---------------------------------------------------------------------------------------------------------------
# (e) the converter refuses state_dicts that do not fit, naming the keys


def test_convert_vgg16_refuses_missing_extra_and_misshaped_keys(tv_state):
  state = dict(tv_state)
  del state["features.0.bias"]
  state["features.99.weight"] = np.zeros((1,), np.float32)
  state["classifier.6.weight"] = np.zeros((10, 4096), np.float32)
  with pytest.raises(ConversionError) as info:
    convert_vgg16(state)
  message = str(info.value)
  assert "missing keys (1): features.0.bias" in message
  assert "unexpected keys (1): features.99.weight" in message
  assert "classifier.6.weight: got (10, 4096), expected (1000, 4096)" in message


def test_convert_vgg16_refuses_a_resnet():
  state = {k: v.numpy() for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}
  with pytest.raises(ConversionError, match="missing keys") as info:
    convert_vgg16(state)
  assert "features.0.weight" in str(info.value) and "conv1.weight" in str(info.value)


def test_converted_vgg16_paths_fit_the_fcn_backbones(vgg_variables):
  converted = flatten_dict(vgg_variables["params"])
  for name in FCN_NAMES:
    shapes = flatten_dict(param_shapes(build_model({"name": name}), (64, 64)))
    shared = {path for path in shapes if path[0] in ("features", "fc6", "fc7")}
    assert len(shared) == 30  # 13 convs + fc6 + fc7, kernel and bias each
    for path in shared:
      assert converted[path].shape == shapes[path].shape, "/".join(path)


# ---------------------------------------------------------------------------------------------------------------
# (f) initialisation of the heads


@pytest.mark.parametrize("name, scores, upscores", [
    ("fcn32s", ["score_fr"], {"upscore": 64}),
    ("fcn16s", ["score_fr", "score_pool4"], {"upscore2": 4, "upscore16": 32}),
    ("fcn8s", ["score_fr", "score_pool4", "score_pool3"], {"upscore2": 4, "upscore_pool4": 4, "upscore8": 16}),
])
def test_head_init_is_bilinear_and_zero(name, scores, upscores):
  channels = 3
  params = init_params_except_trunk(build_model({"name": name, "num_classes": channels}), (1, 1))
  assert set(params) == {*scores, *upscores}
  for layer in scores:
    assert not np.any(params[layer]["kernel"]) and not np.any(params[layer]["bias"]), f"{layer} must start at zero"
  for layer, kernel_size in upscores.items():
    assert set(params[layer]) == {"kernel"}, f"{layer} must have no bias"
    # The reference's own (independent) bilinear weights, moved to our (kh, kw, in, out) layout.
    expected = np.transpose(torch_fcn.upsampling_weight(channels, kernel_size).numpy(), (2, 3, 0, 1))
    np.testing.assert_array_equal(params[layer]["kernel"], expected, err_msg=layer)
  if "upscore2" in params:
    # Known case: a 4-tap bilinear filter is [1/4, 3/4, 3/4, 1/4], on the channel diagonal only.
    taps = np.array([0.25, 0.75, 0.75, 0.25], np.float32)
    np.testing.assert_allclose(params["upscore2"]["kernel"][:, :, 1, 1], np.outer(taps, taps))
    assert not np.any(params["upscore2"]["kernel"][:, :, 0, 1])
