"""VGG16 (Simonyan & Zisserman 2015, configuration D) as a fully convolutional network, NHWC.

`VGG16Features` is the 13-conv trunk shared by the 'vgg16' classifier and the FCN models, so a converted torchvision
checkpoint initialises either by matching parameter paths ('features/conv1_1', ..., 'fc6', 'fc7').

The classifier is torchvision's vgg16 written as convolutions, as FCN casts it: fc6 is a 7x7 VALID convolution over
pool5 and fc7/fc8 are 1x1 convolutions. At 224x224 pool5 is 7x7, torchvision's AdaptiveAvgPool2d(7) is the
identity, and the 1x1 score map equals torchvision's logits. At other sizes the output is a score map (one 224x224
window per 32 pixels) instead of torchvision's average-pooled logits -- which is the point of the FCN paper.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcnjax.models import padding_band
from fcnjax.ops import Conv
from fcnjax.ops import max_pool

Array = jax.Array

# (block, number of 3x3 convs, channels): VGG16 = configuration "D" of the paper, torchvision's cfgs["D"].
VGG16_BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))

# torchvision's vgg16 init: kaiming_normal_(mode="fan_out", nonlinearity="relu") for convs, N(0, 0.01) for Linear.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
fc_init = nn.initializers.normal(stddev=0.01)


class VGG16Features(nn.Module):
  """conv1_1 ... conv5_3 with ReLU and five 2x2/2 max-pools; returns the pool3, pool4 and pool5 maps.

  first_conv_padding: 1 as in torchvision; 100 as in FCN, whose padding lets the 7x7 VALID fc6 see any input, however
    small, and leaves a margin that the FCN heads crop away again.
  ceil_mode: False as in torchvision; True as in Caffe (and so FCN), whose pooling rounds the output size up.
  cut_band: run blocks 1-3 without the middle of the band of pixels that see only that padding, copying it back
    before the pools (fcnjax.models.padding_band): the same maps, values and gradients, for 30% fewer multiply-adds
    in fcn8s at 224x224. False computes every pixel.
  """
  first_conv_padding: int = 1
  ceil_mode: bool = False
  cut_band: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array, Array]:
    convs_per_block = [num_convs for _, num_convs, _ in VGG16_BLOCKS]
    no_cut = [padding_band.BlockCut(0, 0, 0, 0)] * len(VGG16_BLOCKS)
    cuts = [padding_band.band_cuts(x.shape[axis], self.first_conv_padding, convs_per_block, self.ceil_mode)
            if self.cut_band else no_cut for axis in (1, 2)]
    pools = []
    for b, (block, num_convs, channels) in enumerate(VGG16_BLOCKS):
      for i in range(1, num_convs + 1):
        if (block, i) == (1, 1):
          pads = tuple((self.first_conv_padding - c[0].left, self.first_conv_padding - c[0].right) for c in cuts)
        else:
          pads = ((1, 1), (1, 1))
        x = Conv(channels, (3, 3), padding=pads, kernel_init=conv_init, dtype=self.dtype, param_dtype=jnp.float32,
                 name=f"conv{block}_{i}")(x)
        x = nn.relu(x)
      for axis, axis_cuts in zip((1, 2), cuts):
        following = axis_cuts[b + 1] if b + 1 < len(axis_cuts) else no_cut[0]
        x = _copy_band_back(x, axis, axis_cuts[b], 2 * following.left, 2 * following.right)
      x = max_pool(x, 2, 2, ceil_mode=self.ceil_mode)
      pools.append(x)
    return pools[2], pools[3], pools[4]


def _copy_band_back(x: Array, axis: int, cut: padding_band.BlockCut, left: int, right: int) -> Array:
  """x with its band along `axis` grown back from `cut` to a cut of (left, right) pixels: copies of the band pixels
  at cut.left_band and cut.right_band put in beside them."""
  more_left, more_right = cut.left - left, cut.right - right
  if more_left == more_right == 0:
    return x
  def piece(start, stop):
    return jax.lax.slice_in_dim(x, start, stop, axis=axis)
  def copies(index, count):
    shape = list(x.shape)
    shape[axis] = count
    return jnp.broadcast_to(piece(index, index + 1), shape)
  parts = [piece(0, cut.left_band), copies(cut.left_band, more_left), piece(cut.left_band, cut.right_band),
           copies(cut.right_band, more_right), piece(cut.right_band, x.shape[axis])]
  return jnp.concatenate([p for p in parts if p.shape[axis]], axis=axis)


class VGG16(nn.Module):
  """torchvision's vgg16 as a fully convolutional classifier: {'out': score map (N, h, w, num_classes)}.

  h = w = 1 at 224x224; in general h = H // 32 - 6 (pool5 minus fc6's 7x7 window), so inputs must be >= 224.
  """
  num_classes: int = 1000
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
    _, _, pool5 = VGG16Features(dtype=self.dtype, name="features")(x)
    if min(pool5.shape[1:3]) < 7:
      raise ValueError(f"vgg16 needs inputs of at least 224x224 (pool5 >= 7x7 for fc6), got {x.shape[1:3]}")
    x = fc6_fc7(pool5, self.dropout_rate, train, self.dtype)
    x = Conv(self.num_classes, (1, 1), kernel_init=fc_init, dtype=self.dtype, param_dtype=jnp.float32,
             name="fc8")(x)
    return {"out": x}


def fc6_fc7(pool5: Array, dropout_rate: float, train: bool, dtype: Any, channels: int = 4096) -> Array:
  """torchvision's classifier[0:6] as convolutions: fc6 7x7 VALID and fc7 1x1, each `channels` wide (VGG16's 4096)
  + ReLU + Dropout.

  Called from inside a compact __call__, so 'fc6' and 'fc7' are created at the caller's top level: the same paths in
  the vgg16 classifier and in the FCN models, so converted weights carry over by path. Dropout is element-wise, as
  torchvision's nn.Dropout and Caffe's Dropout layer in the FCN reference nets.
  """
  x = pool5
  for name, window in (("fc6", 7), ("fc7", 1)):
    x = Conv(channels, (window, window), padding="VALID", kernel_init=fc_init, dtype=dtype, param_dtype=jnp.float32,
             name=name)(x)
    x = nn.relu(x)
    x = nn.Dropout(dropout_rate, deterministic=not train)(x)
  return x


def vgg16(*, num_classes: int = 1000, dtype: Any = jnp.float32, dropout_rate: float = 0.5) -> VGG16:
  return VGG16(num_classes=num_classes, dropout_rate=dropout_rate, dtype=dtype)
