"""torchvision's fcn_resnet50 / fcn_resnet101: a dilated ResNet (output stride 8) with FCNHead on layer4 and,
optionally, on layer3.

Follows torchvision/models/segmentation/fcn.py and _utils.py: each head's logits are resized to the input size with
bilinear interpolation, align_corners=False.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcnjax.ops import resize
from fcnjax.models.resnet import batch_norm, conv, resnet_trunk

Array = jax.Array

# layer2 keeps its stride; layer3 and layer4 dilate by 2 and 4, so features stay at 1/8 of the input.
FCN_DILATION = (False, True, True)


class FCNHead(nn.Module):
  """torchvision's FCNHead(in_channels, num_classes): 3x3 conv to in/4, BN, ReLU, Dropout(0.1), 1x1 conv with bias.

  Submodule names map to torchvision's Sequential indices: conv = 0, bn = 1, score = 4.
  """
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    inter_channels = x.shape[-1] // 4
    x = conv(inter_channels, 3, self.dtype, "conv", padding=1)(x)
    x = nn.relu(batch_norm(train, self.dtype, "bn")(x))
    x = nn.Dropout(0.1, deterministic=not train)(x)
    return conv(self.num_classes, 1, self.dtype, "score", use_bias=True)(x)


def resized(logits: Array, size) -> Array:
  """torchvision's _SimpleSegmentationModel: every head's logits go back to the input size."""
  return resize(logits, size, "bilinear", align_corners=False)


class FCNResNet(nn.Module):
  """FCN on a ResNet-`depth` trunk (50 or 101; torchvision builds FCN on no other)."""
  depth: int = 50
  num_classes: int = 21
  aux_loss: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
    size = x.shape[1:3]
    features = resnet_trunk(self.depth, FCN_DILATION, self.dtype, name="backbone")(x, train)
    out = FCNHead(self.num_classes, self.dtype, name="classifier")(features["layer4"], train)
    result = {"out": resized(out, size)}
    if self.aux_loss:
      aux = FCNHead(self.num_classes, self.dtype, name="aux_classifier")(features["layer3"], train)
      result["aux"] = resized(aux, size)
    return result


def _fcn_resnet(depth: int, *, num_classes: int = 21, aux_loss: bool = True, dtype: Any = jnp.float32) -> FCNResNet:
  return FCNResNet(depth=depth, num_classes=num_classes, aux_loss=aux_loss, dtype=dtype)


fcn_resnet50 = functools.partial(_fcn_resnet, 50)
fcn_resnet101 = functools.partial(_fcn_resnet, 101)
