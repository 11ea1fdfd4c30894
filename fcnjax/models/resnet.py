"""torchvision's ResNet-50 (v1.5) in Flax, NHWC, with `replace_stride_with_dilation` for dense prediction.

Module names follow torchvision's state_dict with '.' between a layer and its block index written as '_'
(torch `layer3.2.conv2` is `backbone/layer3_2/conv2` here, `layer1.0.downsample.1` is `layer1_0/downsample_1`), so
fcnjax.conversion.resnet is a table lookup. The trunk lives under 'backbone' both in the 'resnet50' classifier and in
'fcn_resnet50', so ImageNet weights initialise the segmentation model's trunk by matching paths.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcnjax.ops import Conv
from fcnjax.ops import BatchNorm, max_pool

Array = jax.Array

# (name, planes, blocks) for ResNet-50; the block's output width is planes * EXPANSION.
RESNET50_STAGES = (("layer1", 64, 3), ("layer2", 128, 4), ("layer3", 256, 6), ("layer4", 512, 3))
EXPANSION = 4


def batch_norm(train: bool, dtype: Any, name: str) -> BatchNorm:
  # torchvision's BatchNorm2d defaults: momentum 0.1, eps 1e-5 (fcnjax.ops.BatchNorm keeps torch's statistics).
  return BatchNorm(use_running_average=not train, momentum=0.1, epsilon=1e-5, dtype=dtype, name=name)


def conv(features: int, kernel: int, dtype: Any, name: str, stride: int = 1, dilation: int = 1,
         padding: int = 0, use_bias: bool = False) -> nn.Conv:
  """nn.Conv2d(kernel, stride, padding, dilation) with explicit symmetric padding as in PyTorch."""
  return Conv(features, (kernel, kernel), strides=stride, padding=((padding, padding), (padding, padding)),
              kernel_dilation=dilation, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


class Bottleneck(nn.Module):
  """torchvision's Bottleneck: 1x1 -> 3x3 (carries the stride and dilation, ResNet v1.5) -> 1x1, plus shortcut."""
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    width = self.planes
    y = conv(width, 1, self.dtype, "conv1")(x)
    y = nn.relu(batch_norm(train, self.dtype, "bn1")(y))
    # torchvision's conv3x3 pads by the dilation, which keeps the size at stride 1.
    y = conv(width, 3, self.dtype, "conv2", stride=self.stride, dilation=self.dilation, padding=self.dilation)(y)
    y = nn.relu(batch_norm(train, self.dtype, "bn2")(y))
    y = conv(self.planes * EXPANSION, 1, self.dtype, "conv3")(y)
    y = batch_norm(train, self.dtype, "bn3")(y)
    identity = x
    if self.downsample:
      identity = conv(self.planes * EXPANSION, 1, self.dtype, "downsample_0", stride=self.stride)(x)
      identity = batch_norm(train, self.dtype, "downsample_1")(identity)
    return nn.relu(y + identity)


def stage_plan(replace_stride_with_dilation: Sequence[bool], stages=RESNET50_STAGES):
  """Yields (block name, planes, stride, dilation, downsample) exactly as torchvision's ResNet._make_layer.

  When a stage trades its stride for dilation, its FIRST block still uses the previous dilation (it is the block
  that would have strided); the following blocks use the new one.
  """
  if len(replace_stride_with_dilation) != 3:
    raise ValueError(f"replace_stride_with_dilation must have 3 entries (layer2..layer4), "
                     f"got {tuple(replace_stride_with_dilation)}")
  inplanes, dilation = 64, 1
  dilate_flags = (False,) + tuple(bool(d) for d in replace_stride_with_dilation)
  for (name, planes, blocks), dilate in zip(stages, dilate_flags):
    stride = 1 if name == "layer1" else 2
    previous_dilation = dilation
    if dilate:
      dilation *= stride
      stride = 1
    downsample = stride != 1 or inplanes != planes * EXPANSION
    yield f"{name}_0", planes, stride, previous_dilation, downsample
    for i in range(1, blocks):
      yield f"{name}_{i}", planes, 1, dilation, False
    inplanes = planes * EXPANSION


class ResNet50Trunk(nn.Module):
  """Stem + layer1..layer4; returns every stage's output so heads pick what they need (FCN: layer3, layer4)."""
  replace_stride_with_dilation: Sequence[bool] = (False, False, False)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
    x = x.astype(self.dtype)
    x = conv(64, 7, self.dtype, "conv1", stride=2, padding=3)(x)
    x = nn.relu(batch_norm(train, self.dtype, "bn1")(x))
    # torch pads max-pooling with -inf, not zeros; after a ReLU both give the same, but keep the exact semantics.
    x = max_pool(x, 3, 2, padding=1)
    features = {}
    for block, planes, stride, dilation, downsample in stage_plan(self.replace_stride_with_dilation):
      x = Bottleneck(planes, stride, dilation, downsample, dtype=self.dtype, name=block)(x, train)
      features[block.rsplit("_", 1)[0]] = x  # the stage's last block writes last
    return features


class ResNet50(nn.Module):
  """ImageNet classifier: trunk, global average pool, fc. Returns {'out': logits (N, num_classes)}."""
  num_classes: int = 1000
  replace_stride_with_dilation: Sequence[bool] = (False, False, False)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
    features = ResNet50Trunk(tuple(self.replace_stride_with_dilation), self.dtype, name="backbone")(x, train)
    pooled = jnp.mean(features["layer4"], axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="fc")(pooled)
    return {"out": logits}


def resnet50(*, num_classes: int = 1000, dtype: Any = jnp.float32,
             replace_stride_with_dilation: Sequence[bool] = (False, False, False)) -> ResNet50:
  return ResNet50(num_classes=num_classes, replace_stride_with_dilation=tuple(replace_stride_with_dilation),
                  dtype=dtype)

