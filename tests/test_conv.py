"""fcnjax.conv against PyTorch's conv2d and its autograd: forward, input gradient and weight gradient, through the
custom VJP and through each CPU form directly (GEMM forward and col2im input gradient; strip-wise weight gradient
with one strip, several, and several plus a remainder strip), for every option our models use."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fcnjax import conv

# (batch, height, width, in, out, kernel, stride, padding, dilation): U-Net/VGG 3x3, ResNet's 7x7/2 stem, 3x3/2
# and 1x1/2 downsampling, 1x1 widening, dilated 3x3 (fcn_resnet50's layer3/4), fc6's 7x7 VALID, odd sizes, uneven
# padding.
CASES = [
    (2, 17, 13, 3, 5, 3, 1, ((1, 1), (1, 1)), 1),
    (1, 20, 21, 4, 6, 3, 2, ((1, 1), (1, 1)), 1),
    (2, 15, 16, 5, 4, 7, 2, ((3, 3), (3, 3)), 1),
    (2, 19, 12, 6, 3, 3, 1, ((2, 2), (2, 2)), 2),
    (1, 21, 18, 4, 4, 3, 1, ((4, 4), (4, 4)), 4),
    (1, 9, 9, 8, 8, 1, 1, ((0, 0), (0, 0)), 1),
    (2, 7, 9, 4, 12, 1, 1, ((0, 0), (0, 0)), 1),  # more output channels than patch elements
    (1, 4, 3, 5, 24, 3, 1, ((1, 1), (1, 1)), 1),  # 12 output pixels <= 24 channels: the GEMM forms (by_gemm)
    (2, 11, 10, 8, 4, 1, 2, ((0, 0), (0, 0)), 1),
    (1, 12, 11, 6, 7, 7, 1, ((0, 0), (0, 0)), 1),
    (2, 12, 12, 3, 3, 3, 1, ((1, 2), (0, 3)), 1),
]


def _torch_conv(x, kernel, stride, padding, dilation):
  """torch conv2d on NHWC/HWIO numpy data; uneven padding as an explicit F.pad first. Returns y, dx, dk, dy."""
  xt = torch.tensor(np.transpose(x, (0, 3, 1, 2)), requires_grad=True)
  kt = torch.tensor(np.transpose(kernel, (3, 2, 0, 1)), requires_grad=True)
  (top, bottom), (left, right) = padding
  y = torch.nn.functional.conv2d(torch.nn.functional.pad(xt, (left, right, top, bottom)), kt, stride=stride,
                                 dilation=dilation)
  dy = torch.tensor(np.random.default_rng(1).standard_normal(y.shape).astype(np.float32))
  y.backward(dy)
  to_nhwc = lambda t: np.transpose(t.detach().numpy(), (0, 2, 3, 1))  # noqa: E731
  return to_nhwc(y), to_nhwc(xt.grad), np.transpose(kt.grad.numpy(), (2, 3, 1, 0)), to_nhwc(dy)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}_{}x{}_{}to{}_k{}s{}_p{}_d{}".format(*c[:7], c[7], c[8]))
@pytest.mark.parametrize("xla_grad_channels", [0, conv.MAX_XLA_GRAD_OUT_CHANNELS], ids=["strips", "default"])
def test_conv_and_its_gradients_match_torch(case, xla_grad_channels, monkeypatch):
  # These cases are small enough that by default their weight gradients are XLA's: 0 sends every one to the strips.
  monkeypatch.setattr(conv, "MAX_XLA_GRAD_OUT_CHANNELS", xla_grad_channels)
  n, h, w, cin, cout, k, stride, padding, dilation = case
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n, h, w, cin)).astype(np.float32)
  kernel = rng.standard_normal((k, k, cin, cout)).astype(np.float32)
  y_ref, dx_ref, dk_ref, dy = _torch_conv(x, kernel, stride, padding, dilation)

  def f(x, kernel):
    return conv.conv_general_dilated(x, kernel, (stride, stride), padding, rhs_dilation=(dilation, dilation),
                                     dimension_numbers=conv.NHWC)

  y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(kernel))
  dx, dk = jax.jit(vjp)(jnp.asarray(dy))
  scale = lambda a: max(1.0, float(np.max(np.abs(a))))  # noqa: E731
  np.testing.assert_allclose(np.asarray(y), y_ref, atol=1e-5 * scale(y_ref))
  np.testing.assert_allclose(np.asarray(dx), dx_ref, atol=1e-5 * scale(dx_ref))
  np.testing.assert_allclose(np.asarray(dk), dk_ref, atol=1e-5 * scale(dk_ref))
  # The same weight gradient with strips of 1, 2 and 3 output rows (several strips, and a remainder).
  for rows in (1, 2, 3):
    strips = conv.weight_grad_by_strips(jnp.asarray(x), jnp.asarray(dy), kernel.shape, (stride, stride), padding,
                                        (dilation, dilation), gemm_rows=rows * n * dy.shape[2])
    np.testing.assert_allclose(np.asarray(strips), dk_ref, atol=1e-5 * scale(dk_ref))
  # The GEMM forms of the forward pass and the input gradient (what by_gemm picks on CPU for some shapes).
  gemm_y = conv.conv_by_gemm(jnp.asarray(x), jnp.asarray(kernel), (stride, stride), padding, (dilation, dilation))
  np.testing.assert_allclose(np.asarray(gemm_y), y_ref, atol=1e-5 * scale(y_ref))
  gemm_dx = conv.input_grad_by_gemm(jnp.asarray(dy), jnp.asarray(kernel), x.shape, (stride, stride), padding,
                                    (dilation, dilation))
  np.testing.assert_allclose(np.asarray(gemm_dx), dx_ref, atol=1e-5 * scale(dx_ref))


def test_narrow_kernels_keep_xlas_weight_gradient():
  """Up to MAX_XLA_GRAD_OUT_CHANNELS output channels the gradient is XLA's on every platform; wider kernels get the
  per-platform choice (strips on CPU)."""
  x = jnp.zeros((1, 8, 8, 4))

  def grad_jaxpr(cout):
    loss = lambda k: conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=conv.NHWC).sum()  # noqa: E731
    return str(jax.make_jaxpr(jax.grad(loss))(jnp.ones((3, 3, 4, cout))))

  assert "platform_index" not in grad_jaxpr(conv.MAX_XLA_GRAD_OUT_CHANNELS)
  assert "platform_index" in grad_jaxpr(conv.MAX_XLA_GRAD_OUT_CHANNELS + 1)


def test_gemm_form_is_picked_for_1x1_kernels_and_few_output_pixels():
  assert conv.by_gemm((2, 56, 56, 256), (1, 1, 256, 64), (2, 2), ((0, 0), (0, 0)), (1, 1))
  assert conv.by_gemm((2, 14, 14, 512), (7, 7, 512, 4096), (1, 1), ((0, 0), (0, 0)), (1, 1))  # fc6: 128 pixels
  assert conv.by_gemm((2, 14, 14, 1024), (3, 3, 1024, 1024), (1, 1), ((1, 1), (1, 1)), (1, 1))  # 392 pixels
  assert not conv.by_gemm((2, 28, 28, 512), (3, 3, 512, 512), (1, 1), ((1, 1), (1, 1)), (1, 1))  # 1568 pixels
  x = jnp.zeros((1, 8, 8, 4))

  def jaxprs(kernel_shape):
    f = lambda x, k: conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=conv.NHWC)  # noqa: E731
    kernel = jnp.ones(kernel_shape)
    return str(jax.make_jaxpr(f)(x, kernel)), str(jax.make_jaxpr(jax.grad(lambda x: f(x, kernel).sum()))(x))

  assert all("platform_index" in j for j in jaxprs((1, 1, 4, 8)))
  assert not any("platform_index" in j for j in jaxprs((3, 3, 4, 8)))  # 64 pixels > 8 channels: XLA's


def test_strip_gemm_rows_follow_the_patch_bytes():
  assert conv.strip_gemm_rows((3, 3, 64, 64), 4) == conv.STRIP_PATCH_BYTES // (9 * 64 * 4)
  assert conv.strip_gemm_rows((3, 3, 2048, 512), 4) == conv.MIN_STRIP_GEMM_ROWS
  assert conv.strip_gemm_rows((3, 3, 3, 64), 4) == conv.MAX_STRIP_GEMM_ROWS


def test_strip_rows_divides_when_it_can():
  assert conv.strip_rows(224, 9) == 8      # 28 strips, no remainder
  assert conv.strip_rows(56, 36) == 28
  assert conv.strip_rows(29, 9) == 9       # 29 is prime: 3 strips of 9 and a remainder of 2
  assert conv.strip_rows(5, 100) == 5
  assert conv.strip_rows(7, 0) == 1


def test_other_convolutions_go_to_lax_unchanged():
  """Grouped, input-dilated or non-NHWC convolutions are not ours: the same function, the same values."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 8, 8, 4)), jnp.float32)
  kernel = jnp.ones((3, 3, 2, 4), jnp.float32)
  args = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=conv.NHWC, feature_group_count=2)
  np.testing.assert_array_equal(conv.conv_general_dilated(x, kernel, **args), jax.lax.conv_general_dilated(x, kernel,
                                                                                                          **args))
  jaxpr = str(jax.make_jaxpr(lambda x: conv.conv_general_dilated(x, kernel, **args))(x))
  assert "custom_vjp" not in jaxpr
  jaxpr = str(jax.make_jaxpr(lambda x: conv.conv_general_dilated(x, jnp.ones((3, 3, 4, 4)), (1, 1), "SAME",
                                                                 dimension_numbers=conv.NHWC))(x))
  assert "custom_vjp" in jaxpr


def test_models_use_it():
  """Every model's convolutions go through conv.Conv (the same parameter names as nn.Conv)."""
  from fcnjax import models  # pylint: disable=g-import-not-at-top
  model = models.build_model(dict(name="unet", num_classes=2, base_width=4, depth=2))
  x = jnp.zeros((1, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  assert variables["params"]["inc"]["conv1"]["kernel"].shape == (3, 3, 3, 4)
  jaxpr = str(jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(variables))
  assert "custom_vjp" in jaxpr
