"""torchvision's lraspp_mobilenet_v3_large: Lite R-ASPP (Searching for MobileNetV3, Howard et al., 2019) on a
dilated MobileNetV3-Large (output stride 16).

Follows torchvision/models/segmentation/lraspp.py. The head takes the trunk's C2 output ('low', features 4, stride 8,
40 channels) and C5 output ('high', features 16, stride 16, 960 channels): `cbr` (1x1 conv, BatchNorm, ReLU) of the
high map, gated by `scale` (global average, 1x1 conv, sigmoid), resized bilinearly to the low map's size, then
`low_classifier(low) + high_classifier(gated)`; the sum is resized to the input's size (bilinear,
align_corners=False). Head names are torchvision's: `classifier/cbr_0`, `cbr_1`, `scale_1`, `low_classifier`,
`high_classifier`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcnjax.models.mobilenet_v3 import HIGH_FEATURE, LOW_FEATURE, MobileNetV3LargeTrunk, conv, global_average
from fcnjax.ops import BatchNorm, resize

Array = jax.Array


class LRASPPHead(nn.Module):
  num_classes: int
  inter_channels: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, low: Array, high: Array, train: bool = False) -> Array:
    x = conv(self.inter_channels, 1, self.dtype, "cbr_0")(high)
    # The head's BatchNorm is a plain nn.BatchNorm2d (momentum 0.1, eps 1e-5), unlike the trunk's.
    x = nn.relu(BatchNorm(use_running_average=not train, dtype=self.dtype, name="cbr_1")(x))
    scale = global_average(high)
    scale = nn.sigmoid(conv(self.inter_channels, 1, self.dtype, "scale_1")(scale))
    x = resize(x * scale, low.shape[1:3], "bilinear", align_corners=False)
    return (conv(self.num_classes, 1, self.dtype, "low_classifier", use_bias=True)(low)
            + conv(self.num_classes, 1, self.dtype, "high_classifier", use_bias=True)(x))


class LRASPPMobileNetV3Large(nn.Module):
  num_classes: int = 21
  inter_channels: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
    features = MobileNetV3LargeTrunk(dilated=True, dtype=self.dtype, name="backbone")(x, train)
    out = LRASPPHead(self.num_classes, self.inter_channels, self.dtype, name="classifier")(
        features[LOW_FEATURE], features[HIGH_FEATURE], train)
    return {"out": resize(out, x.shape[1:3], "bilinear", align_corners=False)}


def lraspp_mobilenet_v3_large(*, num_classes: int = 21, dtype: Any = jnp.float32) -> LRASPPMobileNetV3Large:
  return LRASPPMobileNetV3Large(num_classes=num_classes, dtype=dtype)
