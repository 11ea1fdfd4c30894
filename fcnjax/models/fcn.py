"""FCN-32s, FCN-16s and FCN-8s on VGG16 (Long, Shelhamer & Darrell, CVPR 2015), NHWC.

Two variants of the head, chosen by `variant`:

'paper' (the default) is the published network as in its reference code (shelhamer's Caffe nets in
fcn.berkeleyvision.org, ported to PyTorch by wkentaro/pytorch-fcn): conv1_1 padded by 100, ceil-mode pools, fc6 a
7x7 VALID convolution and fc7 a 1x1 convolution (VGG16's fully connected layers cast to convolutions, so ImageNet
weights carry over), zero-initialised score layers, bias-free transposed convolutions initialised to bilinear
interpolation, and skips aligned by cropping at offsets fixed by the receptive-field arithmetic (derived below). It is
the default because it is the architecture the paper's numbers were measured on, it keeps the pretrained fc6/fc7,
it aligns every map exactly (no interpolation anywhere) and it is what tests/test_vgg_fcn.py checks against PyTorch.

'simple' is the head found in Keras tutorials: no pad 100 and floor pools (torchvision's VGG16 trunk), 1x1
conv6/conv7 (fc_channels, 4096 by default) on pool5, the same score/upscore layers with padding chosen so each
upsampling multiplies the size exactly, a nearest resize to align an upsampled map with its skip when floor pooling
left them a pixel apart, and a final bilinear resize to the input size. It is cheaper (no 200-pixel margin, which
makes the paper variant's trunk 3.6x the work at 224x224, 2.4x with the band of pixels that see only that margin
cut from blocks 1-3: `cut_band`) but cannot use VGG16's 7x7 fc6 weights and its skips are
aligned only to within a pixel. Its conv6/conv7 are named apart from fc6/fc7 so that loading VGG16 weights by path
never puts fc weights where they do not fit.

Both return {'out': logits (N, H, W, num_classes)} at the input's exact size, in the compute dtype. Minimum input:
1x1 for 'paper' (pad 100 makes conv1_1's output at least 199, so pool5 is at least 7 and fc6 always has one window),
32x32 for 'simple' (five floor pools need pool5 >= 1).

Why the crop offsets are 5, 9, 19, 27 and 31 ('paper' variant)
------------------------------------------------------------------
Map each feature-map coordinate to the input coordinate of its receptive-field centre, x = a * y + b. A convolution
or pooling with kernel k, stride s, padding p gives x = s * y + (k - 1) / 2 - p; a transposed convolution with the
same k, s, p is its inverse, y_in = (y_out - (k - 1) / 2 + p) / s. Composing (this is Caffe's coord_map.py):

  conv1_1 (k3, p100)    x = y - 99                  3x3 pad-1 convs shift nothing
  pool1 (k2, s2)        x = 2 y - 98.5              each pool: x = 2 y + 0.5 in the previous map's coordinates
  pool2                 x = 4 y - 97.5
  pool3                 x = 8 y - 95.5
  pool4                 x = 16 y - 91.5
  pool5                 x = 32 y - 83.5
  fc6 (k7, VALID)       x = 32 y + 12.5             the window's centre is 3 pool5 pixels = 96 input pixels in
  fc7, score_fr (1x1)   x = 32 y + 12.5

FCN-32s: upscore (k64, s32) gives x = 32 (u - 31.5) / 32 + 12.5 = u - 19, so the input's pixel 0 is upscore's 19.
FCN-16s: upscore2 (k4, s2) gives x = 16 u - 11.5; score_pool4 sits at x = 16 p - 91.5, so p = u + 5: crop
  score_pool4 at 5. upscore16 (k32, s16) then gives x = v - 27: crop at 27.
FCN-8s: as FCN-16s up to the pool4 fusion (x = 16 u - 11.5); upscore_pool4 (k4, s2) gives x = 8 v - 23.5 and
  score_pool3 sits at x = 8 p - 95.5, so p = v + 9: crop at 9. upscore8 (k16, s8) gives x = w - 31: crop at 31.

The crops always fit: with S = H + 198 (conv1_1's output), pool_k has ceil(S / 2^k) rows and fc6 has
n = ceil(S / 32) - 6 >= 1; upscore2 has 2n + 2 <= ceil(S / 16) - 5 rows, upscore_pool4 has 4n + 6 <= ceil(S / 8) - 9,
and the final upsampling has 32n + 32 (FCN-32s), 32n + 48 (FCN-16s) or 32n + 56 (FCN-8s) >= H + 38 rows.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcnjax.ops import Conv
from fcnjax.ops import ConvTranspose, bilinear_upsample_init, crop, resize
from fcnjax.models.vgg import VGG16Features, conv_init, fc6_fc7

Array = jax.Array

VARIANTS = ("paper", "simple")
# The skips of FCN-32s, FCN-16s and FCN-8s, fused in this order.
SKIP_SETS = ((), ("pool4",), ("pool4", "pool3"))

# Crop offsets of the 'paper' variant, derived in the module docstring.
SCORE_POOL4_OFFSET = 5
SCORE_POOL3_OFFSET = 9
FINAL_OFFSET = {32: 19, 16: 27, 8: 31}

# The first conv's padding in the 'paper' variant: 100 as in the reference nets, so any input yields a fc6 window.
PAPER_PADDING = 100


def _check_variant(variant: str) -> None:
  if variant not in VARIANTS:
    raise ValueError(f"FCN variant={variant!r}; expected one of {VARIANTS}")


def _trunk(x: Array, variant: str, fc_channels: int, dropout_rate: float, train: bool, dtype: Any,
           cut_band: bool) -> tuple[Array, Array, Array]:
  """VGG16 trunk and fc6/fc7 (or conv6/conv7), created at the calling FCN's top level; returns pool3, pool4, fc7."""
  paper = variant == "paper"
  if not paper and min(x.shape[1:3]) < 32:
    raise ValueError(f"the 'simple' FCN variant needs inputs of at least 32x32 (five floor pools), got {x.shape[1:3]}")
  pool3, pool4, pool5 = VGG16Features(first_conv_padding=PAPER_PADDING if paper else 1, ceil_mode=paper,
                                      cut_band=cut_band, dtype=dtype, name="features")(x)
  if paper:
    return pool3, pool4, fc6_fc7(pool5, dropout_rate, train, dtype, fc_channels)
  h = pool5
  for name in ("conv6", "conv7"):
    h = Conv(fc_channels, (1, 1), padding="SAME", kernel_init=conv_init, dtype=dtype, param_dtype=jnp.float32,
             name=name)(h)
    h = nn.relu(h)
    h = nn.Dropout(dropout_rate, deterministic=not train)(h)
  return pool3, pool4, h


def _score(x: Array, num_classes: int, name: str, dtype: Any) -> Array:
  # Zero-initialised, as in the reference nets: a new skip starts by contributing nothing, so FCN-16s/8s begin
  # exactly where the coarser net they are fine-tuned from left off, and fresh score_fr starts from zero logits.
  return Conv(num_classes, (1, 1), kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros,
              dtype=dtype, param_dtype=jnp.float32, name=name)(x)


def _upscore(x: Array, factor: int, variant: str, name: str, dtype: Any) -> Array:
  # Kernel 2 * factor with bilinear weights is FCN's learnable bilinear upsampling. 'paper' uses no padding and crops
  # afterwards; 'simple' pads factor / 2 so the output is exactly factor times the input (Keras' padding='same').
  return ConvTranspose(x.shape[-1], 2 * factor, strides=factor, padding=0 if variant == "paper" else factor // 2,
                       use_bias=False, kernel_init=bilinear_upsample_init, dtype=dtype, name=name)(x)


def _fuse(upsampled: Array, skip_score: Array, offset: int, variant: str) -> Array:
  """upsampled + skip_score on upsampled's grid ('paper': crop the skip at `offset`) or skip's grid ('simple')."""
  if variant == "paper":
    return upsampled + crop(skip_score, offset, upsampled.shape[1:3])
  # Floor pooling makes 2 * pool5 one pixel short of pool4 (and so on) on odd sizes; nearest repeats the last row.
  return resize(upsampled, skip_score.shape[1:3], method="nearest") + skip_score


def _to_input_size(x: Array, stride: int, size: tuple[int, int], variant: str) -> Array:
  if variant == "paper":
    return crop(x, FINAL_OFFSET[stride], size)
  return resize(x, size, method="bilinear")


class FCN(nn.Module):
  """score_fr on fc7, upsampled 2x and fused with the score of each skip in `skips` in turn, then upsampled to the
  input's stride: skips () is FCN-32s, ("pool4",) FCN-16s, ("pool4", "pool3") FCN-8s.

  fc_channels is the width of fc6/fc7 (conv6/conv7): VGG16's 4096, which its ImageNet weights and converted FCN
  files need; a narrower head (for example 512 when training from scratch on a small set) drops most of the 134 M
  parameters, which are fc6's 7x7x512x4096 and fc7's 4096x4096.

  cut_band ('paper' only): the trunk leaves out of blocks 1-3 most of the pixels that see only the padding of 100
  and copies them back before block 4 (fcnjax.models.padding_band): the same outputs and gradients, 30% fewer
  multiply-adds at 224x224. False convolves every pixel, as the reference nets do.
  """
  num_classes: int = 21
  skips: tuple[str, ...] = ()
  variant: str = "paper"
  fc_channels: int = 4096
  dropout_rate: float = 0.5
  cut_band: bool = True
  dtype: Any = jnp.float32

  def __post_init__(self):
    _check_variant(self.variant)
    if tuple(self.skips) not in SKIP_SETS:
      raise ValueError(f"FCN skips={self.skips!r}; expected one of {SKIP_SETS}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
    pool3, pool4, h = _trunk(x, self.variant, self.fc_channels, self.dropout_rate, train, self.dtype, self.cut_band)
    skip_maps = {"pool4": (pool4, SCORE_POOL4_OFFSET), "pool3": (pool3, SCORE_POOL3_OFFSET)}
    h = _score(h, self.num_classes, "score_fr", self.dtype)
    # Parameter names as in the reference nets: upscore2, then upscore_pool4 after the pool4 fusion.
    upsample_name = "upscore2"
    for skip in self.skips:
      h = _upscore(h, 2, self.variant, upsample_name, self.dtype)
      skip_map, offset = skip_maps[skip]
      h = _fuse(h, _score(skip_map, self.num_classes, f"score_{skip}", self.dtype), offset, self.variant)
      upsample_name = f"upscore_{skip}"
    stride = 32 >> len(self.skips)
    h = _upscore(h, stride, self.variant, f"upscore{stride}" if self.skips else "upscore", self.dtype)
    return {"out": _to_input_size(h, stride, x.shape[1:3], self.variant)}


fcn32s = functools.partial(FCN, skips=())
fcn16s = functools.partial(FCN, skips=("pool4",))
fcn8s = functools.partial(FCN, skips=("pool4", "pool3"))
