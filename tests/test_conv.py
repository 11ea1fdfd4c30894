"""fcnjax.ops.conv against PyTorch's conv2d and its autograd: forward, input gradient and weight gradient, through
the custom VJP and through each CPU form directly (GEMM forward and col2im input gradient; strip-wise weight gradient
with one strip, several, and several plus a remainder strip; the native C++ kernels), for every option our models
use, and the native kernels on a batch sharded over 8 devices; which form each layer gets; and that every model
convolution goes through fcnjax.ops.conv."""
import collections
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import test_depthwise
from conftest import REPO_ROOT, subprocess_env
from fcnjax.ops import conv, native, tap_regions

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
    (1, 5, 6, 4, 4, 3, 1, ((12, 12), (12, 12)), 12),  # a rate wider than the map: only the centre tap reads it
    (2, 30, 14, 4, 4, 3, 1, ((24, 24), (24, 24)), 24),  # rate 24: all rows of taps read 30 rows, 14 columns one
    (2, 14, 14, 8, 16, 3, 1, ((12, 12), (12, 12)), 12),  # rate 12 on 14x14: 18% of the taps' pixels read the map
    (2, 6, 5, 3, 16, 3, 1, ((10, 10), (10, 10)), 1),  # FCN's padding of 100 in small: outputs that read only padding
    (1, 7, 6, 4, 5, 3, 2, ((9, 8), (7, 10)), 1),  # the same, strided and uneven
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


def _scale(a):
  return max(1.0, float(np.max(np.abs(a))))


def _case_data(case):
  """x, kernel, dy and torch's y, dx, d(kernel) for a CASES case."""
  n, h, w, cin, cout, k, stride, padding, dilation = case
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n, h, w, cin)).astype(np.float32)
  kernel = rng.standard_normal((k, k, cin, cout)).astype(np.float32)
  y_ref, dx_ref, dk_ref, dy = _torch_conv(x, kernel, stride, padding, dilation)
  return x, kernel, dy, y_ref, dx_ref, dk_ref


def _case_id(case):
  return "n{}_{}x{}_{}to{}_k{}s{}_p{}_d{}".format(*case[:7], case[7], case[8])


# Each test jits its function whole, as a model's step runs it: one compilation instead of one per operation.
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("xla_grad_channels", [0, conv.MAX_XLA_GRAD_OUT_CHANNELS], ids=["strips", "default"])
def test_conv_and_its_gradients_match_torch(case, xla_grad_channels, monkeypatch):
  """Through the custom VJP (conv_general_dilated), with the forms cpu_forms picks."""
  # These cases are small enough that by default their weight gradients are XLA's: 0 sends every one to the strips.
  monkeypatch.setattr(conv, "MAX_XLA_GRAD_OUT_CHANNELS", xla_grad_channels)
  _, _, _, _, _, _, stride, padding, dilation = case
  x, kernel, dy, y_ref, dx_ref, dk_ref = _case_data(case)

  @jax.jit
  def forward_and_grads(x, kernel, dy):
    y, vjp = jax.vjp(lambda x, kernel: conv.conv_general_dilated(
        x, kernel, (stride, stride), padding, rhs_dilation=(dilation, dilation),
        dimension_numbers=conv.NHWC_HWIO), x, kernel)
    return (y, *vjp(dy))

  y, dx, dk = forward_and_grads(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(dy))
  np.testing.assert_allclose(np.asarray(y), y_ref, atol=1e-5 * _scale(y_ref))
  np.testing.assert_allclose(np.asarray(dx), dx_ref, atol=1e-5 * _scale(dx_ref))
  np.testing.assert_allclose(np.asarray(dk), dk_ref, atol=1e-5 * _scale(dk_ref))


# The 7x7 cases compile for 2-3x as long as the others (4-7 s: 49 taps, three strip programs), so they are slow; in
# the fast subset the custom-VJP test above still checks the 7x7 layers, and the other cases check these forms.
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c[5] == 7 else c for c in CASES],
                         ids=_case_id)
def test_gemm_and_strip_forms_match_torch(case):
  """Each pure-JAX CPU form called directly: the weight gradient by strips of 1, 2 and 3 output rows (one strip,
  several, and several plus a remainder), and the GEMM forward pass and col2im input gradient (what by_gemm picks
  on CPU for some shapes)."""
  n, _, _, _, _, _, stride, padding, dilation = case
  x, kernel, dy, y_ref, dx_ref, dk_ref = _case_data(case)
  strides, dilations = (stride, stride), (dilation, dilation)

  @jax.jit
  def direct_forms(x, kernel, dy):
    strips = [conv.weight_grad_by_strips(x, dy, kernel.shape, strides, padding, dilations,
                                         gemm_rows=rows * n * dy.shape[2]) for rows in (1, 2, 3)]
    gemm_y = conv.conv_by_gemm(x, kernel, strides, padding, dilations)
    gemm_dx = conv.input_grad_by_gemm(dy, kernel, x.shape, strides, padding, dilations)
    return strips, gemm_y, gemm_dx

  strips, gemm_y, gemm_dx = direct_forms(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(dy))
  for rows, strip_dk in zip((1, 2, 3), strips):
    np.testing.assert_allclose(np.asarray(strip_dk), dk_ref, atol=1e-5 * _scale(dk_ref),
                               err_msg=f"strips of {rows} rows")
  np.testing.assert_allclose(np.asarray(gemm_y), y_ref, atol=1e-5 * _scale(y_ref))
  np.testing.assert_allclose(np.asarray(gemm_dx), dx_ref, atol=1e-5 * _scale(dx_ref))


@pytest.mark.parametrize("case", [c for c in CASES if c[6] == 1 and c[5] == 3], ids=_case_id)
def test_tap_region_forms_match_torch(case):
  """fcnjax.ops.tap_regions called directly, whatever share of its taps' pixels read padding: the forward pass,
  the input gradient and the weight gradient as one GEMM per tap over its rectangle."""
  _, _, _, _, _, _, _, padding, dilation = case
  x, kernel, dy, y_ref, dx_ref, dk_ref = _case_data(case)
  dilations = (dilation, dilation)

  @jax.jit
  def region_forms(x, kernel, dy):
    return (tap_regions.conv(x, kernel, padding, dilations),
            tap_regions.input_grad(dy, kernel, x.shape, padding, dilations),
            tap_regions.weight_grad(x, dy, kernel.shape, padding, dilations))

  y, dx, dk = region_forms(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(dy))
  np.testing.assert_allclose(np.asarray(y), y_ref, atol=1e-5 * _scale(y_ref))
  np.testing.assert_allclose(np.asarray(dx), dx_ref, atol=1e-5 * _scale(dx_ref))
  np.testing.assert_allclose(np.asarray(dk), dk_ref, atol=1e-5 * _scale(dk_ref))


def test_tap_regions_are_picked_where_most_taps_read_padding():
  """DeepLabV3's ASPP at 224x224 (a 28x28 map), rates 12 and 24 (51% and 18% of the taps' pixels read the map),
  takes the regions for its forward pass and input gradient, and for its weight gradient where the native kernels
  do not take it; ResNet's rate-4 layer4 (82%) keeps Winograd."""
  def forms(x_shape, kernel_shape, rate):
    return conv.cpu_forms(x_shape, kernel_shape, (1, 1), ((rate, rate), (rate, rate)), (rate, rate), jnp.float32)

  aspp = ((2, 28, 28, 2048), (3, 3, 2048, 256))
  assert tap_regions.live_share((28, 28), (3, 3), ((12, 12), (12, 12)), (12, 12)) == pytest.approx((60 / 84) ** 2)
  weight_grad = "native" if native.available() else "regions"
  for rate in (12, 24):
    assert forms(*aspp, rate) == {"forward": "regions", "input_grad": "regions", "weight_grad": weight_grad}
  assert forms((2, 28, 28, 2048), (3, 3, 2048, 250), 12)["weight_grad"] == "regions"  # not in 16s: no native
  assert "regions" not in forms((2, 28, 28, 512), (3, 3, 512, 512), 4).values()
  assert "regions" not in conv.cpu_forms((2, 28, 28, 64), (3, 3, 64, 64), (2, 2), ((12, 12), (12, 12)), (12, 12),
                                         jnp.float32).values()  # strided: no per-tap rectangles here


def test_narrow_kernels_keep_xlas_weight_gradient(monkeypatch):
  """Without the native kernels: up to MAX_XLA_GRAD_OUT_CHANNELS output channels the gradient is XLA's on every
  platform; wider kernels get the per-platform choice (strips on CPU)."""
  monkeypatch.setattr(native, "available", lambda: False)
  x = jnp.zeros((1, 8, 8, 4))

  def loss(kernel):
    return conv.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=conv.NHWC_HWIO).sum()

  def grad_jaxpr(cout):
    return str(jax.make_jaxpr(jax.grad(loss))(jnp.ones((3, 3, 4, cout))))

  assert "platform_index" not in grad_jaxpr(conv.MAX_XLA_GRAD_OUT_CHANNELS)
  assert "platform_index" in grad_jaxpr(conv.MAX_XLA_GRAD_OUT_CHANNELS + 1)


def test_gemm_form_is_picked_for_1x1_kernels_and_few_output_pixels(monkeypatch):
  monkeypatch.setattr(native, "available", lambda: False)
  assert conv.by_gemm((2, 56, 56, 256), (1, 1, 256, 64), (2, 2), ((0, 0), (0, 0)), (1, 1))
  assert conv.by_gemm((2, 14, 14, 512), (7, 7, 512, 4096), (1, 1), ((0, 0), (0, 0)), (1, 1))  # fc6: 128 pixels
  assert conv.by_gemm((2, 14, 14, 1024), (3, 3, 1024, 1024), (1, 1), ((1, 1), (1, 1)), (1, 1))  # 392 pixels
  assert not conv.by_gemm((2, 28, 28, 512), (3, 3, 512, 512), (1, 1), ((1, 1), (1, 1)), (1, 1))  # 1568 pixels
  x = jnp.zeros((1, 8, 8, 4))

  def jaxprs(kernel_shape):
    f = lambda x, k: conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=conv.NHWC_HWIO)  # noqa: E731
    kernel = jnp.ones(kernel_shape)
    return str(jax.make_jaxpr(f)(x, kernel)), str(jax.make_jaxpr(jax.grad(lambda x: f(x, kernel).sum()))(x))

  assert all("platform_index" in j for j in jaxprs((1, 1, 4, 8)))
  assert not any("platform_index" in j for j in jaxprs((3, 3, 4, 8)))  # 64 pixels > 8 channels: XLA's


# (batch, height, width, in, out, kernel, padding, dilation) for the native kernels (stride 1, out channels in 16s):
# widths that 6 and 7 divide and that neither does (the forward kernel's pixel blocks), 16-80 output channels (its
# 1-4-vector blocks and their remainder), more input channels than one of its passes takes (32 with AVX-512, 128
# with AVX2), input channels that 6 does not divide (the weight gradient's blocks) or 16 does not (input gradient:
# XLA's), dilations 2 and 4, 5x5 and 7x7 kernels, uneven padding, enough rows for several tasks, a kernel bigger
# than the activations (the weight gradient split by output channels), and maps blocked by channels.
NATIVE_CASES = [
    (2, 17, 13, 16, 32, 3, ((1, 1), (1, 1)), 1),
    (1, 14, 21, 32, 48, 3, ((1, 1), (1, 1)), 1),
    (2, 19, 12, 16, 80, 3, ((2, 2), (2, 2)), 2),
    (1, 21, 18, 80, 64, 3, ((4, 4), (4, 4)), 4),
    (2, 12, 12, 13, 16, 3, ((1, 2), (0, 3)), 1),
    (1, 12, 11, 3, 16, 7, ((0, 0), (0, 0)), 1),
    (1, 9, 30, 70, 64, 5, ((3, 1), (0, 2)), 1),
    (2, 40, 40, 16, 16, 3, ((1, 1), (1, 1)), 1),
    (1, 10, 20, 128, 144, 3, ((1, 1), (1, 1)), 1),
    # Blocked channels (>= 128; native_conv.cc's BlockedMap), with a narrower last block in every layout.
    (2, 7, 9, 136, 32, 3, ((1, 1), (1, 1)), 2),
    # Winograd: uneven padding on odd sizes (tiles past the map's edge, a last register block of fewer tiles), and
    # a kernel transform bigger than WINOGRAD_LOCAL_KERNEL_BYTES (the chunked schedule), with dilation 2 and, with
    # AVX-512, a narrower last block of output channels.
    (2, 11, 13, 48, 32, 3, ((1, 2), (0, 3)), 1),
    (2, 12, 13, 256, 272, 3, ((2, 2), (2, 2)), 2),
]


def expected_native_forms(cin, cout, k):
  """The forms for a NATIVE_CASES case: Winograd for 3x3 kernels whose convolution (the forward one, or the input
  gradient's, from cout to cin channels) has at least 32 input channels in 16s, else the direct kernels; the input
  gradient is XLA's when cin is not a multiple of 16."""
  def winograd(channels_in):
    return k == 3 and channels_in % 16 == 0 and channels_in >= native.WINOGRAD_MIN_IN_CHANNELS
  return {"forward": "winograd" if winograd(cin) else "native", "weight_grad": "native",
          "input_grad": "xla" if cin % 16 else "winograd" if winograd(cout) else "native"}


@pytest.mark.parametrize("case", NATIVE_CASES,
                         ids=lambda c: "n{}_{}x{}_{}to{}_k{}".format(*c[:6]) + f"_p{c[6]}_d{c[7]}")
@pytest.mark.usefixtures("native_kernels")
def test_native_kernels_match_torch(case):
  n, h, w, cin, cout, k, padding, dilation = case
  forms = conv.cpu_forms((n, h, w, cin), (k, k, cin, cout), (1, 1), padding, (dilation, dilation), jnp.float32)
  assert forms == expected_native_forms(cin, cout, k), forms
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n, h, w, cin)).astype(np.float32)
  kernel = rng.standard_normal((k, k, cin, cout)).astype(np.float32)
  y_ref, dx_ref, dk_ref, dy = _torch_conv(x, kernel, 1, padding, dilation)

  def f(x, kernel):
    return conv.conv_general_dilated(x, kernel, (1, 1), padding, rhs_dilation=(dilation, dilation),
                                     dimension_numbers=conv.NHWC_HWIO)

  def forward_and_grads(x, kernel, dy):
    y, vjp = jax.vjp(f, x, kernel)
    return (y, *vjp(dy))

  step = jax.jit(forward_and_grads)
  hlo = step.lower(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(dy)).compile().as_text()
  assert "fcnjax_conv_forward" in hlo and "fcnjax_conv_weight_grad" in hlo
  y, dx, dk = step(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(dy))
  scale = lambda a: max(1.0, float(np.max(np.abs(a))))  # noqa: E731
  np.testing.assert_allclose(np.asarray(y), y_ref, atol=1e-5 * scale(y_ref))
  np.testing.assert_allclose(np.asarray(dx), dx_ref, atol=1e-5 * scale(dx_ref))
  np.testing.assert_allclose(np.asarray(dk), dk_ref, atol=1e-5 * scale(dk_ref))


@pytest.mark.usefixtures("native_kernels")
def test_native_input_gradient_is_kept_for_wide_inputs():
  """With AVX-512's blocks, more than MAX_NATIVE_INPUT_GRAD_CHANNELS input channels: XLA's input gradient, native
  forward and weight grad; with AVX2's, native throughout."""
  forms = conv.cpu_forms((2, 28, 28, 1024), (3, 3, 1024, 512), (1, 1), ((1, 1), (1, 1)), (1, 1), jnp.float32)
  wide_input_grad = "xla" if native.vector_lanes() == 16 else "winograd"
  assert native.vector_lanes() in (8, 16)
  assert forms == {"forward": "winograd", "input_grad": wide_input_grad, "weight_grad": "native"}
  # Not for the native kernels: strides, bfloat16, output channels not in 16s, 1x1 kernels (GEMM).
  assert conv.cpu_forms((2, 28, 28, 64), (3, 3, 64, 64), (2, 2), ((1, 1), (1, 1)), (1, 1),
                        jnp.float32)["forward"] == "xla"
  assert conv.cpu_forms((2, 28, 28, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1)), (1, 1),
                        jnp.bfloat16)["forward"] == "xla"
  assert conv.cpu_forms((2, 28, 28, 64), (3, 3, 64, 24), (1, 1), ((1, 1), (1, 1)), (1, 1),
                        jnp.float32)["weight_grad"] == "strips"
  assert conv.cpu_forms((2, 28, 28, 64), (1, 1, 64, 64), (1, 1), ((0, 0), (0, 0)), (1, 1),
                        jnp.float32)["forward"] == "gemm"


@pytest.mark.usefixtures("native_kernels")
def test_kernels_enabled_false_turns_the_native_forms_off():
  """native.kernels_enabled(False) (a run's config.native_kernels=False): a 3x3 64 -> 64 layer gets no native or
  Winograd form and its traced gradient no custom call; outside the block (and inside kernels_enabled(True)) it
  gets them again."""
  shapes = ((2, 28, 28, 64), (3, 3, 64, 64), (1, 1), ((1, 1), (1, 1)), (1, 1), jnp.float32)
  native_forms = {"native", "winograd"}

  def loss(x, kernel):
    return conv.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=conv.NHWC_HWIO).sum()

  def traced_gradient():
    # 16x16 pixels: more than the 64 output channels, so not a GEMM case.
    return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(jnp.zeros((1, 16, 16, 64)), jnp.zeros((3, 3, 64, 64))))

  forms = conv.cpu_forms(*shapes)
  assert set(forms.values()) <= native_forms and forms["weight_grad"] == "native", forms
  jaxpr = traced_gradient()
  assert "fcnjax_conv_forward" in jaxpr and "fcnjax_conv_weight_grad" in jaxpr
  with native.kernels_enabled(False):
    assert conv.cpu_forms(*shapes) == {"forward": "xla", "input_grad": "xla", "weight_grad": "strips"}
    assert "fcnjax_conv" not in traced_gradient()
    with native.kernels_enabled(True):
      assert conv.cpu_forms(*shapes) == forms
  assert conv.cpu_forms(*shapes) == forms


@pytest.mark.usefixtures("native_kernels")
def test_native_kernels_under_vmap():
  """jax.vmap over the images (folded into the batch: one call), over images and kernels, and per-example gradients
  (one weight-gradient call per example) give lax's values."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 2, 9, 10, 16)), jnp.float32)
  kernels = jnp.asarray(rng.standard_normal((3, 3, 3, 16, 32)), jnp.float32)

  def ours(x, k):
    return conv.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=conv.NHWC_HWIO)

  def lax_conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=conv.NHWC_HWIO)

  def loss(conv_fn):
    return lambda k, x: jnp.sum(jnp.sin(conv_fn(x, k)))

  def close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * float(jnp.max(jnp.abs(b))))

  images_only = jax.jit(jax.vmap(ours, in_axes=(0, None)))
  assert 'custom_call_target="fcnjax_conv_forward"' in images_only.lower(x, kernels[0]).compile().as_text()
  close(images_only(x, kernels[0]), jax.vmap(lax_conv, in_axes=(0, None))(x, kernels[0]))
  close(jax.jit(jax.vmap(ours))(x, kernels), jax.vmap(lax_conv)(x, kernels))
  per_example = jax.jit(jax.vmap(jax.grad(loss(ours), argnums=(0, 1)), in_axes=(None, 0)))(kernels[0], x)
  reference = jax.vmap(jax.grad(loss(lax_conv), argnums=(0, 1)), in_axes=(None, 0))(kernels[0], x)
  close(per_example[0], reference[0])
  close(per_example[1], reference[1])


def test_native_build_failure_falls_back_with_a_warning(monkeypatch, tmp_path):
  monkeypatch.setenv("FCNJAX_CACHE_DIR", str(tmp_path))
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  with pytest.warns(UserWarning, match="could not build or load native_conv.cc"):
    assert native._library.__wrapped__() is None  # pylint: disable=protected-access
  monkeypatch.setenv("FCNJAX_NATIVE", "0")
  assert native.available() is False


SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from fcnjax.ops import conv
    assert jax.device_count() == 8
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    rng = np.random.default_rng(0)
    x = jax.device_put(jnp.asarray(rng.standard_normal((8, 12, 14, 16)), jnp.float32), NamedSharding(mesh, P("data")))
    kernel = jax.device_put(jnp.asarray(rng.standard_normal((3, 3, 16, 32)), jnp.float32), NamedSharding(mesh, P()))

    def loss(conv_fn, x, kernel):
      y = conv_fn(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=conv.NHWC_HWIO)
      return (y * jnp.cos(y)).sum()

    ours = jax.jit(jax.value_and_grad(lambda x, k: loss(conv.conv_general_dilated, x, k), argnums=(0, 1)))
    hlo = ours.lower(x, kernel).compile().as_text()
    calls = [l for l in hlo.splitlines() if "custom_call_target=" in l and "fcnjax_conv" in l]
    assert len(calls) == 3, calls  # forward, input gradient, weight gradient
    assert all("f32[1," in l or "f32[3,3," in l for l in calls), calls  # one image per device
    assert "all-gather" not in hlo
    (value, (dx, dk)) = ours(x, kernel)
    (ref_value, (ref_dx, ref_dk)) = jax.value_and_grad(
        lambda x, k: loss(jax.lax.conv_general_dilated, x, k), argnums=(0, 1))(x, kernel)
    rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
    print("REL", rel(value, ref_value), rel(dx, ref_dx), rel(dk, ref_dk))
    assert max(rel(value, ref_value), rel(dx, ref_dx), rel(dk, ref_dk)) < 1e-5

    # A depthwise layer: each device convolves its own image and sums its weight gradient, then the sums are
    # all-reduced.
    depthwise = jax.device_put(jnp.asarray(rng.standard_normal((3, 3, 1, 16)), jnp.float32), NamedSharding(mesh, P()))
    grouped = lambda conv_fn: lambda x, k, *args, **kw: conv_fn(x, k, *args, **kw, feature_group_count=16)
    ours = jax.jit(jax.grad(lambda k, x: loss(grouped(conv.conv_general_dilated), x, k), argnums=(0, 1)))
    hlo = ours.lower(depthwise, x).compile().as_text()
    calls = [l for l in hlo.splitlines() if 'custom_call_target="fcnjax_depthwise_' in l]
    assert len(calls) == 3 and all("f32[1," in l for l in calls) and "all-gather" not in hlo, calls
    reference = jax.grad(lambda k, x: loss(grouped(jax.lax.conv_general_dilated), x, k), argnums=(0, 1))(depthwise, x)
    errors = [rel(a, b) for a, b in zip(ours(depthwise, x), reference)]
    assert max(errors) < 1e-5, errors
    """)


@pytest.mark.slow
@pytest.mark.usefixtures("native_kernels")
def test_native_kernels_keep_a_sharded_batch_on_its_devices():
  """Data parallelism over 8 devices: each device convolves its own image (no gathered batch), and the weight
  gradient is the all-reduced sum; values as lax's."""
  result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=subprocess_env(8), capture_output=True,
                          text=True, timeout=300, cwd=REPO_ROOT)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  assert "REL" in result.stdout


@pytest.mark.slow  # a second build of the kernels and the parity cases again in a subprocess: ~30 s
@pytest.mark.usefixtures("native_kernels")
def test_native_kernels_with_the_other_targets_blocks(tmp_path):
  """The register blocks of the vector width this machine does not have (AVX-512's 16-float vectors on an AVX2
  machine, AVX2's on an AVX-512 one; GCC's generic vectors run either anywhere): the torch parity cases of the
  convolutions and of the depthwise layers again, in a build of their own."""
  lanes = 8 if native.vector_lanes() == 16 else 16
  env = subprocess_env(1, FCNJAX_NATIVE_LANES=str(lanes), FCNJAX_CACHE_DIR=str(tmp_path))
  result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_conv.py",
                           "tests/test_depthwise.py", "-k",
                           "test_native_kernels_match_torch or test_depthwise_and_its_gradients_match_torch"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
  assert f"{len(NATIVE_CASES) + len(test_depthwise.CASES)} passed" in result.stdout
  assert list(tmp_path.glob("native_conv-*.so")), "the other build was not made"


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


def test_taps_reading_only_padding_are_dropped():
  """drop_padding_taps keeps the live taps and the output size: ASPP's rates on small maps, and nothing else."""
  kernel = jnp.zeros((3, 3, 2, 2))
  assert conv.drop_padding_taps((14, 14), kernel, (1, 1), ((36, 36), (36, 36)), (36, 36))[0].shape == (1, 1, 2, 2)
  live, pads = conv.drop_padding_taps((30, 14), kernel, (1, 1), ((24, 24), (24, 24)), (24, 24))
  assert live.shape == (3, 1, 2, 2) and pads == ((24, 24), (0, 0))
  for in_hw, pads, dilation in [((14, 14), ((12, 12), (12, 12)), (12, 12)), ((8, 8), ((1, 1), (1, 1)), (1, 1)),
                                ((3, 3), ((0, 0), (0, 0)), (1, 1))]:
    same, same_pads = conv.drop_padding_taps(in_hw, kernel, (1, 1), pads, dilation)
    assert same is kernel and same_pads == pads


def test_other_convolutions_go_to_lax_unchanged():
  """Grouped, input-dilated or non-NHWC convolutions are not ours: the same function, the same values."""
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 8, 8, 4)), jnp.float32)
  kernel = jnp.ones((3, 3, 2, 4), jnp.float32)
  args = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=conv.NHWC_HWIO, feature_group_count=2)
  np.testing.assert_array_equal(conv.conv_general_dilated(x, kernel, **args), jax.lax.conv_general_dilated(x, kernel,
                                                                                                          **args))
  jaxpr = str(jax.make_jaxpr(lambda x: conv.conv_general_dilated(x, kernel, **args))(x))
  assert "custom_vjp" not in jaxpr
  jaxpr = str(jax.make_jaxpr(lambda x: conv.conv_general_dilated(x, jnp.ones((3, 3, 4, 4)), (1, 1), "SAME",
                                                                 dimension_numbers=conv.NHWC_HWIO))(x))
  assert "custom_vjp" in jaxpr


def _conv_kernel_shapes(model, image_shape):
  """The kernel shapes of a model's convolution layers (its 4-D "kernel" parameters, less those of its transposed
  convolutions) and of the convolutions its forward pass sends through fcnjax.ops.conv's custom VJP, both sorted.
  Shapes only (jax.eval_shape): no parameter is allocated."""
  from fcnjax.ops import ConvTranspose  # pylint: disable=g-import-not-at-top
  x = jax.ShapeDtypeStruct(image_shape, jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
  transposed = set()

  def record_transposed(next_fun, args, kwargs, context):
    if isinstance(context.module, ConvTranspose):
      transposed.add(context.module.path)
    return next_fun(*args, **kwargs)

  routed = []
  conv_vjp = conv._conv  # pylint: disable=protected-access

  def counting_conv_vjp(x, kernel, *args):
    routed.append(tuple(kernel.shape))
    return conv_vjp(x, kernel, *args)

  conv._conv = counting_conv_vjp  # pylint: disable=protected-access
  try:
    with nn.intercept_methods(record_transposed):
      jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  finally:
    conv._conv = conv_vjp  # pylint: disable=protected-access
  layers = [tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
            if path[-1].key == "kernel" and leaf.ndim == 4
            and tuple(k.key for k in path[:-1]) not in transposed]
  return sorted(layers), sorted(routed)


@pytest.mark.parametrize("name, options, image_size, num_layers", [
    ("unet", dict(base_width=4, depth=2), 20, 11),  # 10 3x3 layers, outc; 2 transposed up-convolutions
    ("unet", dict(base_width=4, depth=2, upsampling="bilinear"), 20, 13),  # + each Up's 1x1 "up" layer
    ("fcn8s", {}, 32, 18),  # 13 VGG layers, fc6, fc7, score_fr, score_pool3/4; 3 transposed upscore layers
    ("fcn_resnet50", {}, 64, 57),  # ResNet-50's 53, the classifier's and the aux head's 3x3 and 1x1; 64 pixels
                                   # make layer4's map (8x8) wider than its dilation, so no tap is dropped
])
def test_every_model_convolution_goes_through_fcnjax_conv(name, options, image_size, num_layers):
  """Each convolution layer of the model calls fcnjax.ops.conv's custom VJP once in its forward pass, with that
  layer's kernel: a layer on flax's plain nn.Conv (or lax's convolution) would bypass the CPU forms and fail here."""
  from fcnjax import models  # pylint: disable=g-import-not-at-top
  model = models.build_model(dict(name=name, num_classes=3, **options))
  layers, routed = _conv_kernel_shapes(model, (1, image_size, image_size, 3))
  assert len(layers) == num_layers, layers
  bypassing = collections.Counter(layers) - collections.Counter(routed)
  assert not bypassing, f"{name}: convolutions with these kernels bypass fcnjax.ops.conv: {dict(bypassing)}"
  assert routed == layers


def test_kernel_cache_trusts_only_private_folders_and_files(tmp_path):
  """A library that another user owns or can write would run as whoever loads it: such folders and files are
  refused (untrusted_reason), and the cache folder is created 0700."""
  fresh = tmp_path / "fresh"
  assert native.untrusted_reason(fresh) is None and native._private_dir(fresh) == fresh  # pylint: disable=protected-access
  assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700
  shared = tmp_path / "shared"
  shared.mkdir()
  os.chmod(shared, 0o777)
  assert "writable by group and others" in native.untrusted_reason(shared)
  with pytest.warns(UserWarning, match="not loading C.. kernels from .*shared"):
    fallback = native._private_dir(shared)  # pylint: disable=protected-access
  assert fallback != shared and native.untrusted_reason(fallback) is None
  os.chmod(shared, 0o775)
  assert "writable by its group" in native.untrusted_reason(shared)
  planted = fresh / "native_conv-0000.so"
  planted.write_bytes(b"not a library")
  assert native.untrusted_reason(planted) is None
  os.chown(planted, 65534, 65534)  # the tests run as root on CI: hand the file to `nobody`
  if os.getuid() == 0:
    assert "owned by uid 65534" in native.untrusted_reason(planted)
  link = fresh / "link.so"
  link.symlink_to(planted)
  assert "symbolic link" in native.untrusted_reason(link)


PLANTED_SCRIPT = textwrap.dedent("""
    import warnings, jax.numpy as jnp
    from fcnjax.ops import conv, native
    x, k = jnp.ones((1, 8, 8, 16)), jnp.ones((3, 3, 16, 16))
    y = conv.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=conv.NHWC_HWIO)
    print("available", native.available(), float(y[0, 4, 4, 0]))
""")


@pytest.mark.slow
def test_planted_library_is_not_loaded_and_concurrent_builds_work(tmp_path):
  """A library planted under the expected name in a group-writable cache folder is never loaded (the kernels are
  built privately instead); two processes building into one new cache at once both load a whole library."""
  if shutil.which(os.environ.get("CXX", "c++")) is None and shutil.which("g++") is None:
    pytest.skip("no C++ compiler")
  probe = subprocess.run([sys.executable, "-c", "from fcnjax.ops import native; "
                          "print(native.library_path(native._compiler()).name)"],
                         env=subprocess_env(1, FCNJAX_CACHE_DIR=str(tmp_path / "probe")), capture_output=True,
                         text=True, check=True)
  shared = tmp_path / "shared"
  shared.mkdir()
  os.chmod(shared, 0o777)
  planted = shared / probe.stdout.strip()
  planted.write_bytes(b"planted: not a library")
  together = tmp_path / "together"
  runs = [subprocess.Popen([sys.executable, "-c", PLANTED_SCRIPT], env=subprocess_env(1, FCNJAX_CACHE_DIR=str(d)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for d in (shared, together, together)]
  outputs = [run.communicate(timeout=600) for run in runs]
  for run, (out, err) in zip(runs, outputs):
    assert run.returncode == 0 and "available True 144.0" in out, (out, err[-3000:])
  assert "not loading C++ kernels from" in outputs[0][1] and str(shared) in outputs[0][1]
  assert planted.read_bytes() == b"planted: not a library"
  assert [p.name for p in together.iterdir()] == [planted.name]
  assert stat.S_IMODE(os.stat(together).st_mode) == 0o700
