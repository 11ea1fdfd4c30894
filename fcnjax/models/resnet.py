"""torchvision's ResNet-18/34/50/101 (v1.5) in Flax, NHWC, with `replace_stride_with_dilation` for dense prediction.

One trunk, `ResNetTrunk`, takes the block type (BasicBlock or Bottleneck) and the number of blocks per stage;
`resnet_trunk(depth)` and the classifier builders pick torchvision's four depths from `ARCHITECTURES`.

Module names follow torchvision's state_dict with '.' between a layer and its block index written as '_'
(torch `layer3.2.conv2` is `backbone/layer3_2/conv2` here, `layer1.0.downsample.1` is `layer1_0/downsample_1`), so
fcnjax.conversion.resnet is a table lookup. The trunk lives under 'backbone' both in the 'resnetNN' classifiers and in
the segmentation models built on them, so ImageNet weights initialise a segmentation model's trunk by matching paths.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcnjax.ops import Conv
from fcnjax.ops import BatchNorm, max_pool

Array = jax.Array

# (name, planes) of the four stages; a block's output width is planes * block.expansion.
STAGES = (("layer1", 64), ("layer2", 128), ("layer3", 256), ("layer4", 512))
NO_DILATION = (False, False, False)


def batch_norm(train: bool, dtype: Any, name: str) -> BatchNorm:
  # torchvision's BatchNorm2d defaults: momentum 0.1, eps 1e-5 (fcnjax.ops.BatchNorm keeps torch's statistics).
  return BatchNorm(use_running_average=not train, momentum=0.1, epsilon=1e-5, dtype=dtype, name=name)


def conv(features: int, kernel: int, dtype: Any, name: str, stride: int = 1, dilation: int = 1,
         padding: int = 0, use_bias: bool = False) -> nn.Conv:
  """nn.Conv2d(kernel, stride, padding, dilation) with explicit symmetric padding as in PyTorch."""
  return Conv(features, (kernel, kernel), strides=stride, padding=((padding, padding), (padding, padding)),
              kernel_dilation=dilation, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


class BasicBlock(nn.Module):
  """torchvision's BasicBlock (ResNet-18/34): 3x3 (carries the stride) -> 3x3, plus shortcut.

  torchvision refuses to dilate it; segmentation_models_pytorch's encoders dilate it after construction, both 3x3
  convolutions padded by the rate (`dilation` here, reached only through ResNetTrunk.stage_dilation).
  """
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32
  expansion = 1  # a class constant, not a field

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    d = self.dilation
    y = conv(self.planes, 3, self.dtype, "conv1", stride=self.stride, dilation=d, padding=d)(x)
    y = nn.relu(batch_norm(train, self.dtype, "bn1")(y))
    y = conv(self.planes, 3, self.dtype, "conv2", dilation=d, padding=d)(y)
    y = batch_norm(train, self.dtype, "bn2")(y)
    return nn.relu(y + shortcut(x, self.planes, self.stride, self.downsample, train, self.dtype))


class Bottleneck(nn.Module):
  """torchvision's Bottleneck: 1x1 -> 3x3 (carries the stride and dilation, ResNet v1.5) -> 1x1, plus shortcut."""
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32
  expansion = 4  # a class constant, not a field

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    width = self.planes
    y = conv(width, 1, self.dtype, "conv1")(x)
    y = nn.relu(batch_norm(train, self.dtype, "bn1")(y))
    # torchvision's conv3x3 pads by the dilation, which keeps the size at stride 1.
    y = conv(width, 3, self.dtype, "conv2", stride=self.stride, dilation=self.dilation, padding=self.dilation)(y)
    y = nn.relu(batch_norm(train, self.dtype, "bn2")(y))
    y = conv(self.planes * self.expansion, 1, self.dtype, "conv3")(y)
    y = batch_norm(train, self.dtype, "bn3")(y)
    return nn.relu(y + shortcut(x, self.planes * self.expansion, self.stride, self.downsample, train, self.dtype))


def shortcut(x: Array, features: int, stride: int, downsample: bool, train: bool, dtype: Any) -> Array:
  """The identity, or torchvision's `downsample` Sequential (1x1 conv with the block's stride, BatchNorm). Called
  inside a block's compact __call__, so the layers are named within the block."""
  if not downsample:
    return x
  x = conv(features, 1, dtype, "downsample_0", stride=stride)(x)
  return batch_norm(train, dtype, "downsample_1")(x)


# depth -> (block, blocks per stage), as torchvision's resnet18 .. resnet101.
ARCHITECTURES = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


def stage_plan(replace_stride_with_dilation: Sequence[bool], stage_sizes: Sequence[int] = (3, 4, 6, 3),
               expansion: int = Bottleneck.expansion, stage_dilation: Sequence[int] | None = None):
  """Yields (block name, planes, stride, dilation, downsample) exactly as torchvision's ResNet._make_layer.

  When a stage trades its stride for dilation, its FIRST block still uses the previous dilation (it is the block
  that would have strided); the following blocks use the new one.

  `stage_dilation` (one rate per stage, layer1..layer4) is segmentation_models_pytorch's make_dilated instead: a
  stage with rate r > 1 loses its stride and EVERY block of it, the first included, dilates by r; the shortcut
  projections stay where the undilated net has them.
  """
  if len(replace_stride_with_dilation) != 3:
    raise ValueError(f"replace_stride_with_dilation must have 3 entries (layer2..layer4), "
                     f"got {tuple(replace_stride_with_dilation)}")
  if stage_dilation is not None and (len(stage_dilation) != 4 or any(replace_stride_with_dilation)):
    raise ValueError(f"stage_dilation must have 4 rates (layer1..layer4) and replace_stride_with_dilation none, got "
                     f"{tuple(stage_dilation)} and {tuple(replace_stride_with_dilation)}")
  inplanes, dilation = 64, 1
  dilate_flags = (False,) + tuple(bool(d) for d in replace_stride_with_dilation)
  for index, ((name, planes), blocks, dilate) in enumerate(zip(STAGES, stage_sizes, dilate_flags)):
    stride = 1 if name == "layer1" else 2
    if stage_dilation is not None:
      # smp patches the built net, whose projections were made for the undilated stride.
      downsample = stride != 1 or inplanes != planes * expansion
      rate = int(stage_dilation[index])
      stride = 1 if rate > 1 else stride
      for i in range(blocks):
        yield f"{name}_{i}", planes, stride if i == 0 else 1, rate, downsample and i == 0
      inplanes = planes * expansion
      continue
    previous_dilation = dilation
    if dilate:
      dilation *= stride
      stride = 1
    downsample = stride != 1 or inplanes != planes * expansion
    yield f"{name}_0", planes, stride, previous_dilation, downsample
    for i in range(1, blocks):
      yield f"{name}_{i}", planes, 1, dilation, False
    inplanes = planes * expansion


class ResNetTrunk(nn.Module):
  """Stem + layer1..layer4; returns every stage's output so heads pick what they need (FCN: layer3, layer4), and
  the stem's ReLU output as 'stem' (stride 2, a U-Net skip)."""
  replace_stride_with_dilation: Sequence[bool] = NO_DILATION
  dtype: Any = jnp.float32
  block: Any = Bottleneck  # BasicBlock or Bottleneck
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  stage_dilation: Sequence[int] | None = None  # smp's make_dilated rates, see stage_plan

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
    if self.block is BasicBlock and any(self.replace_stride_with_dilation):
      raise ValueError("BasicBlock (resnet18/resnet34) does not support dilation, as in torchvision: use "
                       "replace_stride_with_dilation=(False, False, False)")
    x = x.astype(self.dtype)
    x = conv(64, 7, self.dtype, "conv1", stride=2, padding=3)(x)
    x = nn.relu(batch_norm(train, self.dtype, "bn1")(x))
    features = {"stem": x}
    # torch pads max-pooling with -inf, not zeros; after a ReLU both give the same, but keep the exact semantics.
    x = max_pool(x, 3, 2, padding=1)
    plan = stage_plan(self.replace_stride_with_dilation, self.stage_sizes, self.block.expansion, self.stage_dilation)
    for name, planes, stride, dilation, downsample in plan:
      x = self.block(planes, stride, dilation, downsample, dtype=self.dtype, name=name)(x, train)
      features[name.rsplit("_", 1)[0]] = x  # the stage's last block writes last
    return features


def resnet_trunk(depth: int, replace_stride_with_dilation: Sequence[bool] = NO_DILATION, dtype: Any = jnp.float32,
                 name: str | None = None, stage_dilation: Sequence[int] | None = None) -> ResNetTrunk:
  """torchvision's resnet{depth} without avgpool and fc; depth is one of ARCHITECTURES (18, 34, 50, 101)."""
  if depth not in ARCHITECTURES:
    raise ValueError(f"ResNet depth {depth}; expected one of {sorted(ARCHITECTURES)}")
  block, stage_sizes = ARCHITECTURES[depth]
  stage_dilation = None if stage_dilation is None else tuple(stage_dilation)
  return ResNetTrunk(tuple(replace_stride_with_dilation), dtype, block, tuple(stage_sizes), stage_dilation, name=name)


class ResNet(nn.Module):
  """ImageNet classifier: trunk, global average pool, fc. Returns {'out': logits (N, num_classes)}."""
  depth: int = 50
  num_classes: int = 1000
  replace_stride_with_dilation: Sequence[bool] = NO_DILATION
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
    trunk = resnet_trunk(self.depth, self.replace_stride_with_dilation, self.dtype, name="backbone")
    pooled = jnp.mean(trunk(x, train)["layer4"], axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="fc")(pooled)
    return {"out": logits}


def _resnet(depth: int, *, num_classes: int = 1000, dtype: Any = jnp.float32,
            replace_stride_with_dilation: Sequence[bool] = NO_DILATION) -> ResNet:
  return ResNet(depth=depth, num_classes=num_classes,
                replace_stride_with_dilation=tuple(replace_stride_with_dilation), dtype=dtype)


resnet18 = functools.partial(_resnet, 18)
resnet34 = functools.partial(_resnet, 34)
resnet50 = functools.partial(_resnet, 50)
resnet101 = functools.partial(_resnet, 101)
