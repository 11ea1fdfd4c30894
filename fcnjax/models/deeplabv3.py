"""torchvision's DeepLabV3 (torchvision/models/segmentation/deeplabv3.py): DeepLabHead (ASPP, then 3x3 conv, BN, ReLU
and a 1x1 classifier) on a backbone's last features and, optionally, FCNHead on an intermediate one.

The heads take any number of input channels (flax infers them), so `DeepLabHead` and `ASPP` serve every backbone:
`DeepLabV3` takes the backbone as a module that returns a dict of features, and the names of the two it reads.
deeplabv3_resnet50 / deeplabv3_resnet101 put a dilated ResNet (output stride 8) under 'backbone', with the same
paths as the 'resnetNN' classifiers, so ImageNet weights initialise the trunk by path; deeplabv3_mobilenet_v3_large
puts the dilated MobileNetV3-Large (output stride 16) there, with the 'mobilenet_v3_large' classifier's paths.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcnjax.models.fcn_resnet import FCN_DILATION, FCNHead, resized
from fcnjax.models.mobilenet_v3 import HIGH_FEATURE, LOW_FEATURE, MobileNetV3LargeTrunk
from fcnjax.models.resnet import batch_norm, conv, resnet_trunk

Array = jax.Array

ATROUS_RATES = (12, 24, 36)  # torchvision's DeepLabHead default, for output stride 8


class ConvBNReLU(nn.Module):
  """Conv2d without bias, BatchNorm2d, ReLU: each ASPP branch and the projection (torchvision's Sequentials)."""
  features: int
  kernel: int = 1
  dilation: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    # A 3x3 branch pads by its rate, which keeps the size.
    padding = self.dilation * (self.kernel // 2)
    x = conv(self.features, self.kernel, self.dtype, "conv", dilation=self.dilation, padding=padding)(x)
    return nn.relu(batch_norm(train, self.dtype, "bn")(x))


class ASPPPooling(nn.Module):
  """Image pooling branch: global average pool, 1x1 conv, BN, ReLU, then bilinear (align_corners=False) back to the
  input's size, which from a 1x1 map is the same value at every position."""
  features: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if train and x.shape[0] == 1:
      # BatchNorm over one value per channel: torch raises, and the batch variance would be 0.
      raise ValueError("DeepLabV3's ASPP pooling branch needs a training batch of at least 2 images (BatchNorm over "
                       "one pooled value per channel), as in torchvision")
    size = x.shape[1:3]
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
    y = conv(self.features, 1, self.dtype, "conv")(pooled)
    y = nn.relu(batch_norm(train, self.dtype, "bn")(y))
    return resized(y, size)


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling: a 1x1 branch, one 3x3 branch per rate, the image pooling branch, concatenated
  and projected to `features` channels (1x1 conv, BN, ReLU, Dropout 0.5).

  Names: conv_1x1, atrous_0.. (in the order of atrous_rates), pooling, project -- torchvision's convs.0,
  convs.1.., convs.{len(rates) + 1}, project.
  """
  atrous_rates: Sequence[int] = ATROUS_RATES
  features: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    branches = [ConvBNReLU(self.features, 1, dtype=self.dtype, name="conv_1x1")(x, train)]
    for i, rate in enumerate(self.atrous_rates):
      branches.append(ConvBNReLU(self.features, 3, rate, dtype=self.dtype, name=f"atrous_{i}")(x, train))
    branches.append(ASPPPooling(self.features, self.dtype, name="pooling")(x, train))
    # Concatenated in torchvision's order (convs.0 .. convs.N), which the projection's input channels follow.
    y = ConvBNReLU(self.features, 1, dtype=self.dtype, name="project")(jnp.concatenate(branches, axis=-1), train)
    return nn.Dropout(0.5, deterministic=not train)(y)


class DeepLabHead(nn.Module):
  """torchvision's DeepLabHead(in_channels, num_classes): ASPP, 3x3 conv (256), BN, ReLU, 1x1 conv with bias.

  Names: aspp, conv, bn, score -- torchvision's Sequential indices 0, 1, 2, 4 (as FCNHead's conv, bn, score).
  """
  num_classes: int
  atrous_rates: Sequence[int] = ATROUS_RATES
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    x = ASPP(tuple(self.atrous_rates), 256, self.dtype, name="aspp")(x, train)
    x = conv(256, 3, self.dtype, "conv", padding=1)(x)
    x = nn.relu(batch_norm(train, self.dtype, "bn")(x))
    return conv(self.num_classes, 1, self.dtype, "score", use_bias=True)(x)


class DeepLabV3(nn.Module):
  """DeepLabHead on backbone(x)[out_feature] and, with aux_loss, FCNHead on backbone(x)[aux_feature]; both resized
  to the input (bilinear, align_corners=False). `backbone` is any module returning a dict of NHWC features; its
  variables live under 'backbone'."""
  backbone: nn.Module
  num_classes: int = 21
  aux_loss: bool = True
  out_feature: str = "layer4"
  aux_feature: str = "layer3"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
    size = x.shape[1:3]
    features = self.backbone(x, train)
    out = DeepLabHead(self.num_classes, dtype=self.dtype, name="classifier")(features[self.out_feature], train)
    result = {"out": resized(out, size)}
    if self.aux_loss:
      aux = FCNHead(self.num_classes, self.dtype, name="aux_classifier")(features[self.aux_feature], train)
      result["aux"] = resized(aux, size)
    return result


def _deeplabv3_resnet(depth: int, *, num_classes: int = 21, aux_loss: bool = True,
                      dtype: Any = jnp.float32) -> DeepLabV3:
  return DeepLabV3(resnet_trunk(depth, FCN_DILATION, dtype), num_classes=num_classes, aux_loss=aux_loss, dtype=dtype)


deeplabv3_resnet50 = functools.partial(_deeplabv3_resnet, 50)
deeplabv3_resnet101 = functools.partial(_deeplabv3_resnet, 101)


def deeplabv3_mobilenet_v3_large(*, num_classes: int = 21, aux_loss: bool = True,
                                 dtype: Any = jnp.float32) -> DeepLabV3:
  """torchvision's deeplabv3_mobilenet_v3_large: DeepLabHead on the dilated MobileNetV3-Large's C5 (features 16,
  960 channels, output stride 16; the atrous rates stay 12, 24, 36 as in torchvision) and, with aux_loss, FCNHead
  on C2 (features 4, 40 channels)."""
  return DeepLabV3(MobileNetV3LargeTrunk(dilated=True, dtype=dtype), num_classes=num_classes, aux_loss=aux_loss,
                   out_feature=HIGH_FEATURE, aux_feature=LOW_FEATURE, dtype=dtype)
