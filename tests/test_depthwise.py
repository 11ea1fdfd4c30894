"""fcnjax.ops.depthwise against PyTorch's grouped conv2d and its autograd (forward, input and weight gradients) for
the depthwise layers of the zoo (MobileNetV3's 3x3 and 5x5, strided and dilated; smp's separable ASPP at rates
wider than the map), through fcnjax.ops.conv's entry point; which convolutions take it; bfloat16 inputs."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fcnjax.ops import Conv, conv, depthwise, native, portable_forms, windows

# (batch, height, width, channels, kernel, stride, padding, dilation)
CASES = [
    (2, 17, 13, 16, 3, 1, ((1, 1), (1, 1)), 1),   # MobileNetV3 3x3
    (2, 15, 16, 24, 5, 2, ((2, 2), (2, 2)), 1),   # 5x5/2
    (1, 12, 11, 8, 3, 2, ((1, 1), (1, 1)), 1),    # 3x3/2, odd size
    (2, 9, 10, 16, 5, 1, ((4, 4), (4, 4)), 2),    # the dilated last stage of the segmentation trunk
    (1, 7, 9, 8, 3, 1, ((12, 12), (12, 12)), 12),  # smp's separable ASPP: every tap but the centre in the padding
    (2, 12, 12, 4, 3, 1, ((0, 2), (1, 0)), 1),    # uneven padding
    (2, 11, 10, 72, 5, 2, ((2, 2), (2, 2)), 1),   # whole register blocks of channels, then a part-vector tail
    (1, 9, 8, 136, 3, 1, ((2, 1), (1, 2)), 2),    # uneven padding, dilated, more channels than one block
]


def _case_id(case):
  return "n{}_{}x{}_c{}_k{}s{}_p{}_d{}".format(*case)


def _torch_depthwise(x, kernel, stride, padding, dilation, dy):
  """torch conv2d(groups=channels) on NHWC / (kh, kw, 1, c) numpy data: y, dx, dk."""
  xt = torch.tensor(np.transpose(x, (0, 3, 1, 2)), requires_grad=True)
  kt = torch.tensor(np.transpose(kernel, (3, 2, 0, 1)), requires_grad=True)
  (top, bottom), (left, right) = padding
  y = torch.nn.functional.conv2d(torch.nn.functional.pad(xt, (left, right, top, bottom)), kt, stride=stride,
                                 dilation=dilation, groups=x.shape[3])
  y.backward(torch.tensor(np.transpose(dy, (0, 3, 1, 2))))
  to_nhwc = lambda t: np.transpose(t.detach().numpy(), (0, 2, 3, 1))  # noqa: E731
  return to_nhwc(y), to_nhwc(xt.grad), np.transpose(kt.grad.numpy(), (2, 3, 1, 0))


def _forward_and_grads(stride, padding, dilation):
  @jax.jit
  def run(x, kernel, dy):
    y, vjp = jax.vjp(lambda x, k: conv.conv_general_dilated(
        x, k, (stride, stride), padding, rhs_dilation=(dilation, dilation), dimension_numbers=conv.NHWC_HWIO,
        feature_group_count=x.shape[3]), x, kernel)
    return (y, *vjp(dy))
  return run


def _scale(a):
  return max(1.0, float(np.max(np.abs(a))))


def _case_data(case, seed=0):
  n, h, w, c, k, stride, padding, dilation = case
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, h, w, c)).astype(np.float32)
  kernel = rng.standard_normal((k, k, 1, c)).astype(np.float32)
  out_h, out_w = windows.out_hw((h, w), (k, k), (stride, stride), padding, (dilation, dilation))
  dy = rng.standard_normal((n, out_h, out_w, c)).astype(np.float32)
  return x, kernel, dy


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_depthwise_and_its_gradients_match_torch(case):
  _, _, _, _, _, stride, padding, dilation = case
  x, kernel, dy = _case_data(case)
  y_ref, dx_ref, dk_ref = _torch_depthwise(x, kernel, stride, padding, dilation, dy)
  y, dx, dk = _forward_and_grads(stride, padding, dilation)(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(dy))
  for name, ours, ref in (("y", y, y_ref), ("dx", dx, dx_ref), ("dk", dk, dk_ref)):
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5 * _scale(ref), err_msg=name)


@pytest.mark.usefixtures("native_kernels")
def test_float32_parts_are_the_native_kernels_and_by_taps_without_them():
  """In float32 the forward pass and both gradients are fcnjax's C++ kernels (one call each); with the kernels turned
  off they are sums by taps; all give torch's values."""
  case = CASES[-1]
  _, _, _, _, _, stride, padding, dilation = case
  x, kernel, dy = _case_data(case, seed=1)
  references = _torch_depthwise(x, kernel, stride, padding, dilation, dy)
  for enabled, calls in ((True, 1), (False, 0)):
    with native.kernels_enabled(enabled):
      run = _forward_and_grads(stride, padding, dilation)
      hlo = run.lower(x, kernel, dy).compile().as_text()
      results = run(x, kernel, dy)
    for target in ("fcnjax_depthwise_forward", "fcnjax_depthwise_input_grad", "fcnjax_depthwise_weight_grad"):
      assert hlo.count(f'custom_call_target="{target}"') == calls, (target, enabled)
    for name, ours, ref in zip(("y", "dx", "dk"), results, references):
      np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5 * _scale(ref), err_msg=f"{name}, {enabled}")


@pytest.mark.usefixtures("native_kernels")
def test_per_example_weight_gradients_under_vmap():
  """jax.vmap of the gradient: the forward pass on the examples folded into one batch, one weight-gradient call
  per example, each example's own sum (lax's values)."""
  case = CASES[1]
  _, _, _, c, k, stride, padding, dilation = case
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((3, 1, 15, 16, c)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((k, k, 1, c)), jnp.float32)

  def loss(conv_fn):
    return lambda kernel, x: jnp.sum(jnp.sin(conv_fn(x, kernel, (stride, stride), padding,
                                                     rhs_dilation=(dilation, dilation),
                                                     dimension_numbers=conv.NHWC_HWIO, feature_group_count=c)))

  ours = jax.jit(jax.vmap(jax.grad(loss(conv.conv_general_dilated)), in_axes=(None, 0)))(kernel, x)
  reference = jax.vmap(jax.grad(loss(jax.lax.conv_general_dilated)), in_axes=(None, 0))(kernel, x)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), atol=1e-5 * _scale(reference))


def test_bfloat16_inputs_are_summed_in_float32():
  """A 5x5 window of bfloat16 terms summed in float32 and rounded once: within one bfloat16 rounding of the
  float32 result, for the output and both gradients."""
  case = CASES[1]
  _, _, _, _, _, stride, padding, dilation = case
  x, kernel, dy = (jnp.asarray(a) for a in _case_data(case))
  run = _forward_and_grads(stride, padding, dilation)
  exact = run(*(a.astype(jnp.bfloat16).astype(jnp.float32) for a in (x, kernel, dy)))
  halves = run(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), dy.astype(jnp.bfloat16))
  for ours, ref in zip(halves, exact):
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref), rtol=2 ** -8, atol=1e-6 * _scale(ref))


def test_only_depthwise_convolutions_take_the_taps_and_never_in_portable_forms():
  x = jnp.zeros((1, 8, 8, 4), jnp.float32)

  def jaxpr(kernel_shape, groups):
    return str(jax.make_jaxpr(lambda x, k: conv.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=conv.NHWC_HWIO, feature_group_count=groups))(
            x, jnp.zeros(kernel_shape, jnp.float32)))

  assert depthwise.is_depthwise((1, 8, 8, 4), (3, 3, 1, 4), 4)
  assert not depthwise.is_depthwise((1, 8, 8, 4), (3, 3, 2, 4), 2)  # two channels per group
  assert not depthwise.is_depthwise((1, 8, 8, 4), (3, 3, 1, 8), 4)  # two outputs per channel
  assert not depthwise.is_depthwise((1, 8, 8, 4), (3, 3, 4, 4), 1)
  with portable_forms():
    assert "custom_vjp" not in jaxpr((3, 3, 1, 4), 4)
  assert "custom_vjp" in jaxpr((3, 3, 1, 4), 4)
  assert "custom_vjp" not in jaxpr((3, 3, 2, 4), 2)  # other grouped convolutions: lax's


def test_flax_depthwise_layer_equals_lax():
  """fcnjax.ops.Conv with feature_group_count = channels (as the zoo's models build it) gives lax's values."""
  layer = Conv(6, (3, 3), strides=2, padding=((1, 1), (1, 1)), kernel_dilation=1, feature_group_count=6)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 11, 10, 6)), jnp.float32)
  variables = layer.init(jax.random.PRNGKey(0), x)
  reference = nn.Conv(6, (3, 3), strides=2, padding=((1, 1), (1, 1)), feature_group_count=6).apply(variables, x)
  np.testing.assert_allclose(np.asarray(jax.jit(layer.apply)(variables, x)), np.asarray(reference), atol=1e-5)
