"""fcnjax.ops against live PyTorch: every expected value below is computed by torch in the test.

Tolerance: these are small float32 ops on O(1) values; results agree within 1e-5 absolute (ATOL), and exactly where
no arithmetic is involved (pooling, cropping, nearest resizing, small-integer worked examples).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal

import torch  # noqa: E402  (a hard import: parity tests must run, never skip)
F = torch.nn.functional

from fcnjax.conversion.common import conv_transpose_kernel  # noqa: E402
from fcnjax.ops.batch_norm import normalize_two_pass, normalize_with_batch_statistics  # noqa: E402
from fcnjax.ops import (BatchNorm, ConvTranspose, bilinear_upsample_init, center_crop, conv_output_size,  # noqa: E402
                        conv_transpose, crop, max_pool, pad_or_crop_to, resize, resize_bilinear_to_sizes)

ATOL = 1e-5


def nhwc(t):
  return np.ascontiguousarray(t.detach().numpy().transpose(0, 2, 3, 1))


def nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


# --------------------------------------------------------------------------------------------------------------------
# Transposed convolution


def conv_transpose_cases(num_random=36, seed=0):
  """Hand-picked corner cases, then a seeded random sweep; every case has a positive output size."""
  cases = [
      # padding beyond the kernel's reach (negative pads in our lowering: pad by zero, then crop)
      dict(k=(1, 2), s=(2, 3), p=(1, 2), op=(0, 1), d=(1, 1), g=1, cin=2, cout=3, hw=(4, 3), bias=True),
      # output_padding below the dilation but not below the stride
      dict(k=(3, 2), s=(1, 1), p=(0, 1), op=(1, 1), d=(2, 2), g=1, cin=1, cout=2, hw=(3, 5), bias=False),
      # depthwise (groups = in = out channels), 1x1 input
      dict(k=(4, 4), s=(2, 2), p=(1, 1), op=(0, 0), d=(1, 1), g=3, cin=3, cout=3, hw=(1, 1), bias=True),
      # FCN's upscore: k=2s, no padding
      dict(k=(4, 4), s=(2, 2), p=(0, 0), op=(0, 0), d=(1, 1), g=1, cin=2, cout=2, hw=(5, 6), bias=False),
      # kernel = stride (U-Net's up-convolution), which conv_transpose computes as a matmul + pixel shuffle
      dict(k=(2, 2), s=(2, 2), p=(0, 0), op=(0, 0), d=(1, 1), g=1, cin=4, cout=3, hw=(3, 5), bias=True),
      # ... with groups, a non-square kernel, and padding / output_padding that crop and extend it
      dict(k=(2, 3), s=(2, 3), p=(1, 0), op=(1, 2), d=(1, 1), g=2, cin=4, cout=6, hw=(4, 3), bias=False),
      dict(k=(3, 3), s=(3, 3), p=(2, 1), op=(0, 2), d=(1, 1), g=1, cin=2, cout=2, hw=(2, 3), bias=True),
  ]
  rng = np.random.RandomState(seed)
  while len(cases) < 7 + num_random:
    k, s, d, p = (tuple(int(v) for v in rng.randint(lo, hi, size=2)) for lo, hi in ((1, 5), (1, 4), (1, 3), (0, 3)))
    op = tuple(int(rng.randint(0, max(si, di))) for si, di in zip(s, d))
    g = int(rng.choice([1, 2, 3]))
    hw = tuple(int(v) for v in rng.randint(1, 7, size=2))
    case = dict(k=k, s=s, p=p, op=op, d=d, g=g, cin=g * int(rng.randint(1, 3)), cout=g * int(rng.randint(1, 3)),
                hw=hw, bias=bool(rng.randint(2)))
    if min(conv_transpose_size(case)) > 0:
      cases.append(case)
  return cases


def conv_transpose_size(c):
  return tuple((n - 1) * s - 2 * p + d * (k - 1) + op + 1
               for n, s, p, d, k, op in zip(c["hw"], c["s"], c["p"], c["d"], c["k"], c["op"]))


def case_id(c):
  pair = lambda name: f"{name}{c[name][0]}x{c[name][1]}"  # noqa: E731
  return "-".join([pair("k"), pair("s"), pair("p"), pair("op"), pair("d"), f"g{c['g']}", f"{c['cin']}to{c['cout']}",
                   pair("hw"), f"bias{int(c['bias'])}"])


CASES = conv_transpose_cases()


def test_sweep_covers_every_option():
  """Guards the sweep itself: a change to the generator must not quietly drop an option."""
  assert any(c["g"] > 1 for c in CASES) and any(c["bias"] for c in CASES) and any(not c["bias"] for c in CASES)
  assert any(max(c["op"]) > 0 for c in CASES) and any(max(c["d"]) > 1 for c in CASES)
  assert any(c["k"][0] != c["k"][1] for c in CASES) and any(c["hw"][0] != c["hw"][1] for c in CASES)
  assert any(c["s"][0] != c["s"][1] for c in CASES)
  assert any(p > d * (k - 1) for c in CASES for p, d, k in zip(c["p"], c["d"], c["k"]))
  # Both lowerings of conv_transpose: the matmul one (kernel = stride, dilation 1) and the dilated convolution.
  assert sum(_disjoint(c) for c in CASES) >= 3 and sum(not _disjoint(c) for c in CASES) >= 30


def _disjoint(c):
  return c["k"] == c["s"] and c["d"] == (1, 1)


def torch_conv_transpose(c, seed):
  torch.manual_seed(seed)
  layer = torch.nn.ConvTranspose2d(c["cin"], c["cout"], c["k"], stride=c["s"], padding=c["p"],
                                   output_padding=c["op"], groups=c["g"], bias=c["bias"], dilation=c["d"])
  x = torch.randn(2, c["cin"], *c["hw"])
  return layer, x


def flax_conv_transpose(c):
  return ConvTranspose(c["cout"], c["k"], strides=c["s"], padding=c["p"], output_padding=c["op"], dilation=c["d"],
                       groups=c["g"], use_bias=c["bias"])


def flax_params(layer):
  params = {"kernel": conv_transpose_kernel(layer.weight.detach().numpy())}
  if layer.bias is not None:
    params["bias"] = layer.bias.detach().numpy()
  return {"params": params}


# The hand-picked cases and every third random one in the fast subset, all of them in the full suite.
@pytest.mark.parametrize("case", [c if i < 7 or i % 3 == 0 else pytest.param(c, marks=pytest.mark.slow)
                                  for i, c in enumerate(CASES)], ids=[case_id(c) for c in CASES])
def test_conv_transpose_matches_torch(case):
  layer, x = torch_conv_transpose(case, seed=len(case_id(case)))
  with torch.no_grad():
    expected = nhwc(layer(x))
  assert expected.shape[1:3] == conv_transpose_size(case)
  out = flax_conv_transpose(case).apply(flax_params(layer), nhwc(x))
  assert out.shape == expected.shape
  np.testing.assert_allclose(out, expected, rtol=0, atol=ATOL)
  # The functional form, without the bias.
  out = conv_transpose(nhwc(x), flax_params(layer)["params"]["kernel"], stride=case["s"], padding=case["p"],
                       output_padding=case["op"], dilation=case["d"], groups=case["g"])
  with torch.no_grad():
    expected = nhwc(F.conv_transpose2d(x, layer.weight, None, case["s"], case["p"], case["op"], case["g"], case["d"]))
  np.testing.assert_allclose(out, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", CASES[:7] + CASES[7:40:6], ids=case_id)
def test_conv_transpose_gradients_match_torch_autograd(case):
  layer, x = torch_conv_transpose(case, seed=1)
  x.requires_grad_(True)
  y = layer(x)
  cotangent = torch.randn(y.shape)
  y.backward(cotangent)

  def loss(x_nhwc, variables):
    return jnp.sum(flax_conv_transpose(case).apply(variables, x_nhwc) * nhwc(cotangent))

  grad_x, grad_vars = jax.jit(jax.grad(loss, argnums=(0, 1)))(nhwc(x), flax_params(layer))
  np.testing.assert_allclose(grad_x, nhwc(x.grad), rtol=0, atol=ATOL)
  np.testing.assert_allclose(grad_vars["params"]["kernel"], conv_transpose_kernel(layer.weight.grad),
                             rtol=0, atol=ATOL)
  if case["bias"]:
    np.testing.assert_allclose(grad_vars["params"]["bias"], layer.bias.grad.numpy(), rtol=0, atol=ATOL)


TWO_BY_TWO = np.array([[0, 1], [2, 3]], np.float32)


@pytest.mark.parametrize("kernel, stride, padding, output_padding, out_size", [
    (TWO_BY_TWO, 1, 0, 0, 3),
    (TWO_BY_TWO, 2, 0, 0, 4),
    (TWO_BY_TWO, 1, 1, 0, 1),
    (TWO_BY_TWO, 2, 1, 0, 2),
    (np.arange(9, dtype=np.float32).reshape(3, 3), 2, 1, 1, 4),  # the "same as x2 up-sampling" configuration
    (np.arange(9, dtype=np.float32).reshape(3, 3), 2, 0, 1, 6),
])
def test_worked_examples(kernel, stride, padding, output_padding, out_size):
  """Tutorial-style examples on x = [[0, 1], [2, 3]]; small integers, so the results are exact."""
  x = TWO_BY_TWO
  expected = F.conv_transpose2d(torch.from_numpy(x)[None, None], torch.from_numpy(kernel)[None, None], stride=stride,
                                padding=padding, output_padding=output_padding).numpy()[0, 0]
  assert expected.shape == (out_size, out_size)
  out = conv_transpose(x[None, :, :, None], kernel[:, :, None, None], stride=stride, padding=padding,
                       output_padding=output_padding)
  np.testing.assert_array_equal(np.asarray(out)[0, :, :, 0], expected)
  if (stride, padding, output_padding) == (1, 0, 0):
    # At stride 1 a transposed convolution is the full convolution, a third, independent reference.
    np.testing.assert_array_equal(expected, scipy.signal.convolve2d(x, kernel, mode="full"))


def test_conv_transpose_rejects_bad_arguments():
  x = jnp.zeros((1, 3, 3, 4))
  with pytest.raises(ValueError, match="4 channels"):
    conv_transpose(x, jnp.zeros((2, 2, 3, 1)))
  with pytest.raises(ValueError, match="output_padding"):
    conv_transpose(x, jnp.zeros((2, 2, 4, 1)), stride=2, output_padding=2)
  with pytest.raises(ValueError, match="groups"):
    conv_transpose(x, jnp.zeros((2, 2, 4, 1)), groups=3)


# --------------------------------------------------------------------------------------------------------------------
# FCN's bilinear initialisation


def get_upsampling_weight(in_channels, out_channels, kernel_size):
  """FCN's reference (surgery.upsample_filt / pytorch-fcn get_upsampling_weight), in torch's layout."""
  factor = (kernel_size + 1) // 2
  if kernel_size % 2 == 1:
    center = factor - 1
  else:
    center = factor - 0.5
  og = np.ogrid[:kernel_size, :kernel_size]
  filt = (1 - abs(og[0] - center) / factor) * (1 - abs(og[1] - center) / factor)
  weight = np.zeros((in_channels, out_channels, kernel_size, kernel_size), dtype=np.float64)
  weight[range(in_channels), range(out_channels), :, :] = filt
  return weight


@pytest.mark.parametrize("kernel_size", [1, 2, 3, 4, 5, 16, 32])
def test_bilinear_init_equals_fcn_reference(kernel_size):
  ours = bilinear_upsample_init(jax.random.PRNGKey(0), (kernel_size, kernel_size, 3, 3))
  reference = conv_transpose_kernel(get_upsampling_weight(3, 3, kernel_size))
  assert ours.dtype == jnp.float32
  np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-7)
  with pytest.raises(ValueError, match="as many input as output"):
    bilinear_upsample_init(None, (kernel_size, kernel_size, 3, 2))


@pytest.mark.parametrize("stride", [2, 4, 8])
def test_bilinear_conv_transpose_equals_interpolate_away_from_the_border(stride):
  """ConvTranspose(k=2s, stride s, padding s/2) with FCN's init is bilinear x s resizing (align_corners=False),
  except in an s/2-pixel border, where F.interpolate clamps to the edge pixel and the transposed convolution sees the
  zero padding instead."""
  x = np.random.RandomState(0).randn(1, 6, 7, 2).astype(np.float32)
  layer = ConvTranspose(2, 2 * stride, strides=stride, padding=stride // 2, use_bias=False,
                        kernel_init=bilinear_upsample_init)
  out = np.asarray(layer.apply(layer.init(jax.random.PRNGKey(0), x), x))
  expected = nhwc(F.interpolate(nchw(x), scale_factor=stride, mode="bilinear", align_corners=False))
  assert out.shape == expected.shape == (1, 6 * stride, 7 * stride, 2)
  b = stride // 2
  np.testing.assert_allclose(out[:, b:-b, b:-b], expected[:, b:-b, b:-b], rtol=0, atol=ATOL)
  diff = np.abs(out - expected).max(axis=(0, 3))
  for border in (diff[:b], diff[-b:], diff[:, :b].T, diff[:, -b:].T):
    assert np.all(border.max(axis=1) > 1e-3)  # every border row and column differs somewhere


# --------------------------------------------------------------------------------------------------------------------
# Resizing


RESIZE_SIZES = [((5, 7), (11, 3)), ((8, 8), (3, 5)), ((6, 4), (12, 8)), ((1, 1), (3, 2)), ((7, 5), (1, 1)),
                ((3, 9), (7, 2)), ((4, 6), (9, 13))]
RESIZE_MODES = [("bilinear", False), ("bilinear", True), ("nearest", False), ("nearest-exact", False)]


@pytest.mark.parametrize("method, align_corners", RESIZE_MODES, ids=[f"{m}-ac{int(a)}" for m, a in RESIZE_MODES])
@pytest.mark.parametrize("in_size, out_size", RESIZE_SIZES,
                         ids=[f"{a[0]}x{a[1]}to{b[0]}x{b[1]}" for a, b in RESIZE_SIZES])
def test_resize_matches_interpolate(in_size, out_size, method, align_corners):
  x = np.random.RandomState(0).randn(2, *in_size, 3).astype(np.float32)
  kwargs = {"align_corners": align_corners} if method == "bilinear" else {}
  expected = nhwc(F.interpolate(nchw(x), size=out_size, mode=method, **kwargs))
  out = resize(jnp.asarray(x), out_size, method, align_corners=align_corners)
  assert out.shape == expected.shape
  if method == "bilinear":
    np.testing.assert_allclose(out, expected, rtol=0, atol=ATOL)
  else:
    np.testing.assert_array_equal(out, expected)  # the same pixels are picked


def test_resize_same_size_and_bad_arguments():
  x = jnp.ones((1, 4, 5, 2))
  assert resize(x, (4, 5)) is x
  with pytest.raises(ValueError, match="align_corners"):
    resize(x, (8, 10), "nearest", align_corners=True)
  with pytest.raises(ValueError, match="unknown resize method"):
    resize(x, (8, 10), "bicubic")


def test_why_not_jax_image_resize():
  """jax.image.resize is not F.interpolate: it antialiases by default when shrinking, its 'nearest' is torch's
  'nearest-exact' (half-pixel centres) rather than torch's default 'nearest', and it has no align_corners=True.
  It does agree when enlarging bilinearly, and with antialias=False."""
  x = np.random.RandomState(1).randn(1, 8, 9, 1).astype(np.float32)

  def torch_resize(size, mode):
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return nhwc(F.interpolate(nchw(x), size=size, mode=mode, **kwargs))

  def jax_resize(size, method, **kwargs):
    return np.asarray(jax.image.resize(x, (1, *size, 1), method, **kwargs))

  np.testing.assert_allclose(jax_resize((16, 20), "bilinear"), torch_resize((16, 20), "bilinear"), atol=ATOL)
  shrink = (3, 4)
  assert np.abs(jax_resize(shrink, "bilinear") - torch_resize(shrink, "bilinear")).max() > 0.1
  np.testing.assert_allclose(jax_resize(shrink, "bilinear", antialias=False), torch_resize(shrink, "bilinear"),
                             atol=ATOL)
  np.testing.assert_allclose(np.asarray(resize(x, shrink)), torch_resize(shrink, "bilinear"), atol=ATOL)
  for size in ((3, 4), (16, 20)):
    assert np.abs(jax_resize(size, "nearest") - torch_resize(size, "nearest")).max() > 0.1
    np.testing.assert_array_equal(jax_resize(size, "nearest"), torch_resize(size, "nearest-exact"))


def test_resize_bilinear_to_sizes_matches_interpolate_per_image():
  x = np.random.RandomState(2).randn(3, 5, 6, 2).astype(np.float32)
  sizes = np.array([[9, 11], [5, 6], [2, 3]], np.int32)
  canvas = (12, 13)
  out = np.asarray(jax.jit(resize_bilinear_to_sizes, static_argnums=2)(x, sizes, canvas))
  assert out.shape == (3, *canvas, 2)
  for i, (h, w) in enumerate(sizes):
    expected = nhwc(F.interpolate(nchw(x[i:i + 1]), size=(int(h), int(w)), mode="bilinear", align_corners=False))
    np.testing.assert_allclose(out[i, :h, :w], expected[0], rtol=0, atol=ATOL, err_msg=f"image {i}")
    assert not out[i, h:].any() and not out[i, :, w:].any(), f"image {i}: non-zero outside its {h}x{w} size"


# --------------------------------------------------------------------------------------------------------------------
# Pooling, cropping, padding


POOL_CONFIGS = [(k, s, p, ceil) for k in (2, 3) for s in (1, 2, 3) for p in (0, 1) for ceil in (False, True)]


# Input sizes per pooling config: the first group in the fast subset (a 1x1 input, an odd and an even one), the rest
# in the full suite.
POOL_SIZES = [((1, 1), (5, 8), (9, 6)), pytest.param(((2, 5), (4, 3), (7, 7)), marks=pytest.mark.slow)]


@pytest.mark.parametrize("sizes", POOL_SIZES, ids=["sizes0", "sizes1"])
@pytest.mark.parametrize("window, stride, padding, ceil_mode", POOL_CONFIGS,
                         ids=[f"k{k}-s{s}-p{p}-{'ceil' if c else 'floor'}" for k, s, p, c in POOL_CONFIGS])
def test_max_pool_matches_torch(window, stride, padding, ceil_mode, sizes):
  """Values and gradients; images 2 and 3 of each batch have many ties, where the gradient must go to the first
  maximum in window order, as PyTorch's does. (Both kinds in one batch, and the pool and its gradient in one jitted
  function, as a model's step runs them: one compilation per size.)"""
  pool = torch.nn.MaxPool2d(window, stride, padding, ceil_mode=ceil_mode)

  @jax.jit
  def pool_and_grad(x, dy):
    out, vjp = jax.vjp(lambda x: max_pool(x, window, stride, padding, ceil_mode=ceil_mode), x)
    return out, vjp(dy)[0]

  compared = 0
  for h, w in sizes:
    rng = np.random.RandomState(h * w)
    # All negative, so that padding by zeros instead of -inf would show.
    x = np.concatenate([-1 - rng.rand(2, h, w, 3), -1 - rng.randint(0, 2, (2, h, w, 3))]).astype(np.float32)
    x_torch = nchw(x).requires_grad_()
    try:
      expected = pool(x_torch)
    except RuntimeError:  # torch: output size too small; nothing to compare
      continue
    dy = rng.standard_normal(expected.shape).astype(np.float32)
    expected.backward(torch.from_numpy(dy))
    out, dx = pool_and_grad(jnp.asarray(x), jnp.asarray(np.transpose(dy, (0, 2, 3, 1))))
    assert out.shape == nhwc(expected.detach()).shape, (h, w)
    np.testing.assert_array_equal(out, nhwc(expected.detach()), err_msg=f"input {h}x{w}")
    # Overlapping windows add their shares in another order than torch: float32 rounding, not a tie sent astray.
    np.testing.assert_allclose(dx, nhwc(x_torch.grad), rtol=0, atol=1e-6, err_msg=f"gradient, input {h}x{w}")
    compared += 1
  assert compared >= 2


def test_crop_and_center_crop():
  x = np.arange(2 * 6 * 7 * 1, dtype=np.float32).reshape(2, 6, 7, 1)
  np.testing.assert_array_equal(crop(x, (1, 2), (3, 4)), x[:, 1:4, 2:6])
  np.testing.assert_array_equal(center_crop(x, (3, 4)), x[:, 1:4, 1:5])  # offsets floor((6-3)/2), floor((7-4)/2)
  np.testing.assert_array_equal(center_crop(x, 5), x[:, 0:5, 1:6])
  with pytest.raises(ValueError, match=r"crop of 4x4 at offset \(3, 0\) does not fit in a 6x7 map"):
    crop(x, (3, 0), (4, 4))
  with pytest.raises(ValueError, match="does not fit"):
    crop(x, (-1, 0), (2, 2))
  with pytest.raises(ValueError, match="does not fit"):
    center_crop(x, (7, 7))


@pytest.mark.parametrize("in_size, size", [((2, 3), (5, 4)), ((4, 4), (4, 7)), ((6, 5), (3, 3)), ((5, 2), (2, 6)),
                                           ((3, 3), (3, 3))])
def test_pad_or_crop_to(in_size, size):
  x = np.random.RandomState(0).randn(1, *in_size, 2).astype(np.float32)
  out = np.asarray(pad_or_crop_to(jnp.asarray(x), size))
  assert out.shape == (1, *size, 2)
  dh, dw = size[0] - in_size[0], size[1] - in_size[1]
  # Growing: torch's F.pad with milesial/Pytorch-UNet's split (the odd pixel at the bottom/right).
  grown = F.pad(nchw(x), [max(dw, 0) // 2, max(dw, 0) - max(dw, 0) // 2, max(dh, 0) // 2, max(dh, 0) - max(dh, 0) // 2])
  # Shrinking: center_crop (the odd pixel leaves at the bottom/right, unlike F.pad with negative pads, which takes it
  # from the top/left; in U-Net the extra row of a ceil-mode pooled map is at the bottom).
  expected = np.asarray(center_crop(nhwc(grown), size))
  np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("size, kernel, stride, padding, dilation", [(7, 3, 1, 1, 1), (8, 3, 2, 1, 1), (9, 7, 1, 0, 1),
                                                                      (10, 3, 2, 2, 2), (5, 1, 3, 0, 1)])
def test_conv_output_size_matches_torch(size, kernel, stride, padding, dilation):
  conv = torch.nn.Conv2d(1, 1, kernel, stride, padding, dilation)
  expected = conv(torch.zeros(1, 1, size, size)).shape[-1]
  assert conv_output_size(size, kernel, stride, padding, dilation) == expected
  flax_conv = nn.Conv(1, (kernel, kernel), stride, padding=[(padding, padding)] * 2, kernel_dilation=dilation)
  out = jax.eval_shape(lambda x: flax_conv.init_with_output(jax.random.PRNGKey(0), x)[0],
                       jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32))
  assert out.shape[1] == expected


# --------------------------------------------------------------------------------------------------------------------
# BatchNorm


@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 1, 2, 4), (4, 9, 9, 16)])
def test_batch_norm_training_matches_torch(shape):
  """Train mode: the output, the gradients of input, scale and bias (fcnjax's closed-form VJP against torch's
  autograd), and the running statistics (the unbiased variance folded in)."""
  rng = np.random.default_rng(sum(shape))
  x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32)
  upstream = rng.standard_normal(shape).astype(np.float32)
  channels = shape[-1]
  scale, bias = (1 + 0.3 * rng.standard_normal(channels)).astype(np.float32), rng.standard_normal(channels)
  mean, var = rng.standard_normal(channels).astype(np.float32), (0.5 + rng.random(channels)).astype(np.float32)

  torch_bn = torch.nn.BatchNorm2d(channels, momentum=0.1).train()
  with torch.no_grad():
    torch_bn.weight.copy_(torch.from_numpy(scale))
    torch_bn.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    torch_bn.running_mean.copy_(torch.from_numpy(mean))
    torch_bn.running_var.copy_(torch.from_numpy(var))
  torch_x = nchw(x).requires_grad_(True)
  torch_y = torch_bn(torch_x)
  torch_y.backward(nchw(upstream))

  variables = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias, jnp.float32)},
               "batch_stats": {"mean": jnp.asarray(mean), "var": jnp.asarray(var)}}
  module = BatchNorm(use_running_average=False)

  def forward(params, inputs):
    return module.apply({**variables, "params": params}, inputs, mutable=["batch_stats"])

  (y, updated), vjp = jax.vjp(forward, variables["params"], jnp.asarray(x))
  zero_stats = jax.tree.map(jnp.zeros_like, updated)
  param_grads, x_grad = vjp((jnp.asarray(upstream), zero_stats))
  np.testing.assert_allclose(np.asarray(y), nhwc(torch_y), atol=ATOL, rtol=0)
  np.testing.assert_allclose(np.asarray(x_grad), nhwc(torch_x.grad), atol=ATOL, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(param_grads["scale"]), torch_bn.weight.grad.numpy(), atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(param_grads["bias"]), torch_bn.bias.grad.numpy(), atol=1e-4, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(updated["batch_stats"]["mean"]), torch_bn.running_mean.numpy(), atol=1e-6)
  np.testing.assert_allclose(np.asarray(updated["batch_stats"]["var"]), torch_bn.running_var.numpy(), atol=1e-5)
  # Eval mode with those running statistics, as torch's.
  torch_bn.eval()
  eval_y = BatchNorm(use_running_average=True).apply({**variables, **updated}, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(eval_y), nhwc(torch_bn(nchw(x))).copy(), atol=ATOL, rtol=0)


def test_batch_norm_gradient_equals_autodiff_of_the_two_pass_formula():
  """The closed-form VJP is the derivative of the forward formula, up to float32 rounding."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((2, 6, 5, 8)) * 4 + 1, jnp.float32)
  scale, bias = jnp.asarray(rng.standard_normal(8), jnp.float32), jnp.asarray(rng.standard_normal(8), jnp.float32)
  upstream = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

  def loss(normalize):
    return lambda *args: jnp.sum(normalize(*args, 1e-5)[0] * upstream)

  closed_form = jax.grad(loss(normalize_with_batch_statistics), argnums=(0, 1, 2))(x, scale, bias)
  autodiff = jax.grad(loss(normalize_two_pass), argnums=(0, 1, 2))(x, scale, bias)
  for ours, reference in zip(closed_form, autodiff):
    np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), atol=2e-5, rtol=1e-5)
