"""torchvision's MobileNetV3-Large in Flax, NHWC, with the `dilated` last stage of torchvision's segmentation models.

Follows torchvision/models/mobilenetv3.py: `features` is a stem (3x3, stride 2, hardswish), fifteen inverted
residual blocks (1x1 expand, kxk depthwise, optional squeeze-excitation, 1x1 project; a residual when the stride is 1
and the width is kept) and a 1x1 conv to 960 channels with hardswish. Every BatchNorm has torchvision's eps 0.001 and
momentum 0.01.

Module names follow torchvision's state_dict: `features.N` is `backbone/features_N`, and the index of a layer inside
a Sequential joins its parent's name with '_' (torch `features.3.block.1.0` is `backbone/features_3/block_1_0`,
`features.4.block.2.fc1` is `backbone/features_4/block_2/fc1`, the stem's `features.0.1` is `backbone/features_0_1`),
so fcnjax.conversion.mobilenet_v3 is a table lookup. The trunk lives under 'backbone' both in the
'mobilenet_v3_large' classifier and in the segmentation models, so ImageNet weights initialise their trunks by path.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcnjax.ops import BatchNorm, Conv

Array = jax.Array


class BlockConfig(NamedTuple):
  """One row of torchvision's inverted_residual_setting for mobilenet_v3_large (width_mult 1)."""
  input_channels: int
  kernel: int
  expanded_channels: int
  out_channels: int
  use_se: bool
  activation: str  # "RE" (ReLU) or "HS" (hardswish)
  stride: int


# features.1 .. features.15, Table 1 of the MobileNetV3 paper as torchvision lists it.
LARGE_BLOCKS = (
    BlockConfig(16, 3, 16, 16, False, "RE", 1),
    BlockConfig(16, 3, 64, 24, False, "RE", 2),  # C1
    BlockConfig(24, 3, 72, 24, False, "RE", 1),
    BlockConfig(24, 5, 72, 40, True, "RE", 2),  # C2
    BlockConfig(40, 5, 120, 40, True, "RE", 1),
    BlockConfig(40, 5, 120, 40, True, "RE", 1),
    BlockConfig(40, 3, 240, 80, False, "HS", 2),  # C3
    BlockConfig(80, 3, 200, 80, False, "HS", 1),
    BlockConfig(80, 3, 184, 80, False, "HS", 1),
    BlockConfig(80, 3, 184, 80, False, "HS", 1),
    BlockConfig(80, 3, 480, 112, True, "HS", 1),
    BlockConfig(112, 3, 672, 112, True, "HS", 1),
    BlockConfig(112, 5, 672, 160, True, "HS", 2),  # C4
    BlockConfig(160, 5, 960, 160, True, "HS", 1),
    BlockConfig(160, 5, 960, 160, True, "HS", 1),
)
# With dilated=True the C4 stage (its last three blocks) dilates by 2 instead of striding: output stride 16.
DILATED_BLOCKS = 3
STEM_CHANNELS = 16
LAST_CONV_CHANNELS = 6 * LARGE_BLOCKS[-1].out_channels  # 960
LAST_CHANNEL = 1280  # the classifier's hidden width
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # torchvision's norm_layer for MobileNetV3


def make_divisible(value: float, divisor: int = 8) -> int:
  """torchvision's _make_divisible: round to the nearest multiple of `divisor` (at least `divisor`), one multiple
  up when rounding loses more than 10%."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


def squeeze_channels(expanded_channels: int) -> int:
  return make_divisible(expanded_channels // 4, 8)


def stage_indices() -> list[int]:
  """torchvision's stage_indices over `features`: the stem, every strided block (C1..C4), the last conv (C5)."""
  strided = [i for i, block in enumerate(LARGE_BLOCKS, start=1) if block.stride > 1]
  return [0] + strided + [len(LARGE_BLOCKS) + 1]


# The taps torchvision's lraspp/deeplabv3 builders take from `features`: C2 (features 4: output stride 8,
# 40 channels) and C5 (features 16: output stride 16 when dilated, 960 channels).
LOW_INDEX = stage_indices()[-4]
HIGH_INDEX = stage_indices()[-1]
LOW_FEATURE, HIGH_FEATURE = f"features_{LOW_INDEX}", f"features_{HIGH_INDEX}"
LOW_CHANNELS = LARGE_BLOCKS[LOW_INDEX - 1].out_channels
HIGH_CHANNELS = LAST_CONV_CHANNELS


@jax.custom_jvp
def hardswish(x: Array) -> Array:
  """torch.nn.Hardswish: x * relu6(x + 3) / 6, evaluated in torch's order."""
  return x * jnp.clip(x + 3, 0, 6) / 6


@jax.custom_jvp
def hardsigmoid(x: Array) -> Array:
  """torch.nn.Hardsigmoid: relu6(x + 3) / 6."""
  return jnp.clip(x + 3, 0, 6) / 6


# torch's backward rules, whose slopes at the kinks -3 and 3 are those of the outer pieces: hardswish's is
# x / 3 + 1/2 strictly inside (-3, 3), 0 below and 1 above; hardsigmoid's 1/6 strictly inside, 0 elsewhere.
# Autodiff of the clip would give half-slopes at the kinks (jax splits a tie of max/min between both sides).
@hardswish.defjvp
def _hardswish_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  inside = (x > -3) & (x < 3)
  slope = jnp.where(inside, x / 3 + 0.5, jnp.where(x >= 3, 1, 0)).astype(x.dtype)
  return hardswish(x), slope * dx


@hardsigmoid.defjvp
def _hardsigmoid_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  slope = jnp.where((x > -3) & (x < 3), 1 / 6, 0).astype(x.dtype)
  return hardsigmoid(x), slope * dx


ACTIVATIONS = {"RE": nn.relu, "HS": hardswish}


def conv(features: int, kernel: int, dtype: Any, name: str, stride: int = 1, dilation: int = 1,
         groups: int = 1, use_bias: bool = False) -> nn.Module:
  """nn.Conv2d with torchvision's Conv2dNormActivation padding, (kernel - 1) // 2 * dilation on every side."""
  pad = (kernel - 1) // 2 * dilation
  return Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)), kernel_dilation=dilation,
              feature_group_count=groups, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def global_average(x: Array) -> Array:
  """AdaptiveAvgPool2d(1) on NHWC, summed in float32 whatever the compute dtype."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)


def batch_norm(train: bool, dtype: Any, name: str) -> BatchNorm:
  return BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPS, dtype=dtype, name=name)


class SqueezeExcitation(nn.Module):
  """torchvision.ops.SqueezeExcitation with ReLU and hardsigmoid: x * hardsigmoid(fc2(relu(fc1(mean(x)))))."""
  squeeze_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = global_average(x)
    scale = nn.relu(conv(self.squeeze_channels, 1, self.dtype, "fc1", use_bias=True)(scale))
    scale = conv(x.shape[-1], 1, self.dtype, "fc2", use_bias=True)(scale)
    return hardsigmoid(scale) * x


class InvertedResidual(nn.Module):
  """torchvision's InvertedResidual; its `block` Sequential's layers are named block_<index>_<0 conv | 1 bn>."""
  config: BlockConfig
  dilation: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    cfg = self.config
    activation = ACTIVATIONS[cfg.activation]
    index = 0

    def conv_bn(y, features, kernel, act, **conv_args):
      nonlocal index
      y = conv(features, kernel, self.dtype, f"block_{index}_0", **conv_args)(y)
      y = batch_norm(train, self.dtype, f"block_{index}_1")(y)
      index += 1
      return act(y) if act else y

    y = x
    if cfg.expanded_channels != cfg.input_channels:
      y = conv_bn(y, cfg.expanded_channels, 1, activation)
    # A dilated block trades its stride for the dilation, as torchvision's depthwise layer does.
    stride = 1 if self.dilation > 1 else cfg.stride
    y = conv_bn(y, cfg.expanded_channels, cfg.kernel, activation, stride=stride, dilation=self.dilation,
                groups=cfg.expanded_channels)
    if cfg.use_se:
      y = SqueezeExcitation(squeeze_channels(cfg.expanded_channels), self.dtype, name=f"block_{index}")(y)
      index += 1
    y = conv_bn(y, cfg.out_channels, 1, None)
    if cfg.stride == 1 and cfg.input_channels == cfg.out_channels:
      y = y + x
    return y


class MobileNetV3LargeTrunk(nn.Module):
  """torchvision's mobilenet_v3_large `features`; returns every layer's output by its module name ('features_0' ..
  'features_16'), so heads take what they need (LR-ASPP and DeepLabV3: LOW_FEATURE and HIGH_FEATURE)."""
  dilated: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
    x = x.astype(self.dtype)
    x = conv(STEM_CHANNELS, 3, self.dtype, "features_0_0", stride=2)(x)
    x = hardswish(batch_norm(train, self.dtype, "features_0_1")(x))
    features = {"features_0": x}
    first_dilated = len(LARGE_BLOCKS) - DILATED_BLOCKS
    for n, cfg in enumerate(LARGE_BLOCKS, start=1):
      dilation = 2 if self.dilated and n > first_dilated else 1
      x = InvertedResidual(cfg, dilation, self.dtype, name=f"features_{n}")(x, train)
      features[f"features_{n}"] = x
    last = len(LARGE_BLOCKS) + 1
    x = conv(LAST_CONV_CHANNELS, 1, self.dtype, f"features_{last}_0")(x)
    features[f"features_{last}"] = hardswish(batch_norm(train, self.dtype, f"features_{last}_1")(x))
    return features


class MobileNetV3Large(nn.Module):
  """ImageNet classifier: trunk, global average pool, Linear 960 -> 1280, hardswish, Dropout, Linear.
  Returns {'out': logits (N, num_classes)}; `classifier_0` and `classifier_3` are torchvision's classifier.0/.3."""
  num_classes: int = 1000
  dilated: bool = False
  dropout: float = 0.2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
    features = MobileNetV3LargeTrunk(self.dilated, self.dtype, name="backbone")(x, train)
    pooled = global_average(features[HIGH_FEATURE])[:, 0, 0]
    y = nn.Dense(LAST_CHANNEL, dtype=self.dtype, param_dtype=jnp.float32, name="classifier_0")(pooled)
    y = nn.Dropout(self.dropout, deterministic=not train)(hardswish(y))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name="classifier_3")(y)
    return {"out": logits}


def mobilenet_v3_large(*, num_classes: int = 1000, dilated: bool = False, dropout: float = 0.2,
                       dtype: Any = jnp.float32) -> MobileNetV3Large:
  return MobileNetV3Large(num_classes=num_classes, dilated=dilated, dropout=dropout, dtype=dtype)
