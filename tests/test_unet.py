"""U-Net: parity with the PyTorch twin (tests/torch_reference/unet.py), shapes at any size, gradients.

Small networks (base_width 8, depth 3) keep this fast. Tolerance: float32 outputs agree within 1e-5 times the
output's scale (max |torch|, at least 1); measured: <= 1e-7 in eval mode (outputs ~0.3), <= 2e-6 in train mode
(outputs ~2, batch statistics).
"""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from conftest import record_parity
import pytest

import torch  # noqa: E402  (a hard import: parity tests must run, never skip)

from fcnjax import steps  # noqa: E402
from fcnjax.models import build_model  # noqa: E402
from fcnjax.models.unet import unet  # noqa: E402
from torch_reference import randomize_batch_norm  # noqa: E402
from torch_reference.unet import UNet as TorchUNet, flax_variables  # noqa: E402

BASE, DEPTH, CLASSES = 8, 3, 3
EVEN, ODD = (32, 40), (29, 23)


def make_torch_unet(upsampling, seed=0, num_classes=CLASSES):
  """A torch U-Net whose BatchNorm affine parameters and running statistics are random, not the 1/0 defaults."""
  torch.manual_seed(seed)
  return randomize_batch_norm(TorchUNet(num_classes, BASE, DEPTH, upsampling), shift_std=0.2, var_range=(0.5, 2.0))


def images(size, n=2, seed=0):
  x = np.random.RandomState(seed).randn(n, 3, *size).astype(np.float32)
  return x, x.transpose(0, 2, 3, 1)  # NCHW for torch, NHWC for us


def assert_close(ours, theirs, name=""):
  scale = max(1.0, float(np.abs(theirs).max()))
  diff = float(np.abs(np.asarray(ours) - theirs).max())
  record_parity(f"unet: {name}", diff, float(np.abs(theirs).max()))
  assert diff <= 1e-5 * scale, f"{name}: max |diff| {diff:.3g} at output scale {scale:.3g}"


# Both upsampling modes and both sizes in the fast subset; the other two pairings in the full suite.
PARITY_CASES = [("transpose", EVEN), ("bilinear", ODD), pytest.param("bilinear", EVEN, marks=pytest.mark.slow),
                pytest.param("transpose", ODD, marks=pytest.mark.slow)]
PARITY_IDS = ["even-transpose", "odd-bilinear", "even-bilinear", "odd-transpose"]


@pytest.mark.parametrize("upsampling, size", PARITY_CASES, ids=PARITY_IDS)
def test_eval_mode_matches_torch(upsampling, size):
  torch_model = make_torch_unet(upsampling).eval()
  x_nchw, x_nhwc = images(size)
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(x_nchw)).numpy().transpose(0, 2, 3, 1)
  model = unet(num_classes=CLASSES, base_width=BASE, depth=DEPTH, upsampling=upsampling)
  out = jax.jit(model.apply)(flax_variables(torch_model), x_nhwc)["out"]
  assert out.shape == (2, *size, CLASSES)
  assert np.abs(expected).max() > 0.1  # a meaningful comparison, not of two near-zero maps
  assert_close(out, expected, f"{upsampling} {size}")


@pytest.mark.parametrize("upsampling, size", PARITY_CASES, ids=PARITY_IDS)
def test_train_mode_matches_torch(upsampling, size):
  """Batch statistics in the forward pass, and the running statistics each framework stores afterwards."""
  torch_model = make_torch_unet(upsampling)
  variables = flax_variables(torch_model)  # taken before torch's forward updates its running stats
  x_nchw, x_nhwc = images(size, n=3)
  torch_model.train()
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(x_nchw)).numpy().transpose(0, 2, 3, 1)
  model = unet(num_classes=CLASSES, base_width=BASE, depth=DEPTH, upsampling=upsampling)
  out, updates = jax.jit(model.apply, static_argnames=("train", "mutable"))(
      variables, x_nhwc, train=True, mutable=("batch_stats",))
  assert_close(out["out"], expected, f"{upsampling} {size} train")

  torch_stats = flax.traverse_util.flatten_dict(flax_variables(torch_model)["batch_stats"])
  new_stats = flax.traverse_util.flatten_dict(jax.device_get(updates["batch_stats"]))
  assert set(new_stats) == set(torch_stats)
  for path, value in new_stats.items():
    # fcnjax.ops.BatchNorm updates running_var with the unbiased batch variance, as torch does.
    np.testing.assert_allclose(value, torch_stats[path], rtol=1e-4, atol=1e-5, err_msg=str(path))


@pytest.mark.parametrize("num_classes", [pytest.param(1, marks=pytest.mark.slow), 4])
@pytest.mark.parametrize("size", [(1, 1), (2, 3), (7, 5), (61, 47), (64, 64)])
@pytest.mark.parametrize("upsampling", ["transpose", "bilinear"])
def test_output_has_input_size(num_classes, size, upsampling):
  model = unet(num_classes=num_classes, base_width=BASE, depth=4, upsampling=upsampling)
  out = jax.eval_shape(model.init_with_output, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((2, *size, 3), jnp.float32))
  assert out[0]["out"].shape == (2, *size, num_classes)


def test_one_pixel_input_runs_and_matches_torch():
  """1x1 is the extreme of ceil-mode pooling: every level is 1x1 and every up-sampled map is cropped from 2x2."""
  torch_model = make_torch_unet("transpose").eval()
  x_nchw, x_nhwc = images((1, 1))
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(x_nchw)).numpy().transpose(0, 2, 3, 1)
  model = unet(num_classes=CLASSES, base_width=BASE, depth=DEPTH)
  out = jax.jit(model.apply)(flax_variables(torch_model), x_nhwc)["out"]
  assert out.shape == (2, 1, 1, CLASSES)
  assert_close(out, expected, "1x1")


def test_default_widths_are_the_papers():
  model = unet()
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  params = variables["params"]
  assert params["inc"]["conv1"]["kernel"].shape == (3, 3, 3, 64)
  assert [params[f"down{i}"]["conv2"]["kernel"].shape[-1] for i in range(1, 5)] == [128, 256, 512, 1024]
  assert params["up1"]["up"]["kernel"].shape == (2, 2, 1024, 512)
  assert params["up4"]["conv"]["conv1"]["kernel"].shape == (3, 3, 128, 64)
  assert params["outc"]["kernel"].shape == (1, 1, 64, 2)
  ours = sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params))
  theirs = sum(p.numel() for p in TorchUNet().parameters())
  assert ours == theirs


@pytest.mark.slow
@pytest.mark.parametrize("upsampling", ["transpose", "bilinear"])
def test_gradients_finite_and_nonzero_for_every_parameter(upsampling):
  model = unet(num_classes=2, base_width=4, depth=2, upsampling=upsampling)
  # Weights from the torch twin: flax's initialisers compile slowly on CPU, and any weights do here.
  variables = flax_variables(TorchUNet(2, 4, 2, upsampling))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 13, 10, 3))
  target = jax.random.normal(jax.random.PRNGKey(2), (2, 13, 10, 2))

  @jax.jit
  @jax.grad
  def grad_fn(params):
    out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                         mutable=["batch_stats"])
    return jnp.mean((out["out"] - target) ** 2)

  grads = flax.traverse_util.flatten_dict(grad_fn(variables["params"]))
  assert len(grads) == len(flax.traverse_util.flatten_dict(variables["params"]))
  for path, g in grads.items():
    assert np.all(np.isfinite(g)), f"{path}: non-finite gradient"
    assert np.abs(g).max() > 0, f"{path}: gradient is all zeros"


def test_registry_and_bad_options():
  model = build_model({"name": "unet", "num_classes": 1, "base_width": 4, "depth": 1, "dtype": "bfloat16"})
  x = jnp.zeros((1, 9, 9, 3))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  assert shapes["params"]["inc"]["conv1"]["kernel"].dtype == jnp.float32  # params stay float32
  variables = flax_variables(TorchUNet(1, 4, 1))
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(shapes)
  out = jax.jit(model.apply)(variables, x)["out"]
  assert out.shape == (1, 9, 9, 1) and out.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="upsampling"):
    unet(upsampling="nearest")


def test_initial_variables_compiled_for_speed_equal_the_default_compilation():
  """fcnjax.steps.init_variables compiles the initialiser at LLVM level 1 (INIT_COMPILER_OPTIONS): its values must
  be those of the default compilation (level 2), bit for bit, so that a seed gives the same model either way."""
  model = build_model({"name": "unet", "num_classes": 3, "base_width": 4, "depth": 1})
  rng = jax.random.PRNGKey(3)
  fast = steps.init_variables(model, rng, (16, 16, 3))
  # Level 2 named: the tests' own default is level 1 (reliability_helpers.TEST_XLA_FLAGS).
  default = jax.jit(functools.partial(model.init, train=False), compiler_options={"xla_backend_optimization_level": 2})(
      {"params": rng}, jnp.zeros((1, 16, 16, 3)))
  assert jax.tree.structure(fast) == jax.tree.structure(flax.core.unfreeze(default))
  for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(default)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
