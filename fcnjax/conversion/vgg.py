"""torchvision vgg16 state_dict -> variables of fcnjax's 'vgg16' model (and, by path, of the FCN backbones).

torchvision numbers the layers of `features` (an nn.Sequential of convs, ReLUs and pools) and of `classifier`
(Linear, ReLU, Dropout, Linear, ReLU, Dropout, Linear); fcnjax names them conv1_1 ... conv5_3, fc6, fc7, fc8. The
Linear layers become convolutions: fc6 reads torchvision's flattened pool5, whose order is (C, H, W), so its
(4096, 25088) weight is a (4096, 512, 7, 7) conv weight; fc7 and fc8 are 1x1 convs.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fcnjax.conversion.common import check_keys, conv_kernel
from fcnjax.models.vgg import VGG16_BLOCKS


def vgg16_feature_layers() -> dict[int, tuple[str, int, int]]:
  """torchvision vgg16.features index -> (our name, in channels, out channels) for its 13 convolutions."""
  layers, index, in_ch = {}, 0, 3
  for block, num_convs, channels in VGG16_BLOCKS:
    for i in range(1, num_convs + 1):
      layers[index] = (f"conv{block}_{i}", in_ch, channels)
      in_ch = channels
      index += 2  # Conv2d, ReLU
    index += 1  # MaxPool2d
  return layers


def vgg16_expected_shapes(num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
  shapes = {}
  for index, (_, in_ch, out_ch) in vgg16_feature_layers().items():
    shapes[f"features.{index}.weight"] = (out_ch, in_ch, 3, 3)
    shapes[f"features.{index}.bias"] = (out_ch,)
  for index, (in_features, out_features) in ((0, (512 * 7 * 7, 4096)), (3, (4096, 4096)), (6, (4096, num_classes))):
    shapes[f"classifier.{index}.weight"] = (out_features, in_features)
    shapes[f"classifier.{index}.bias"] = (out_features,)
  return shapes


def conv_params(state_dict: Mapping[str, Any], prefix: str) -> dict[str, np.ndarray]:
  """`prefix`weight/bias of a torch Conv2d -> {'kernel', 'bias'} of a flax nn.Conv."""
  return {"kernel": conv_kernel(np.asarray(state_dict[prefix + "weight"], dtype=np.float32)),
          "bias": np.asarray(state_dict[prefix + "bias"], dtype=np.float32)}


def vgg16_features_params(state_dict: Mapping[str, Any], prefix: str = "features.") -> dict[str, Any]:
  """Params of VGG16Features from a torch nn.Sequential numbered like torchvision's vgg16.features.

  Shared by convert_vgg16 and by anything else laid out the same way (the PyTorch FCN reference in
  tests/torch_reference/fcn.py). Keys are not checked here; callers check them first.
  """
  return {name: conv_params(state_dict, f"{prefix}{index}.")
          for index, (name, _, _) in vgg16_feature_layers().items()}


def linear_as_conv(weight: np.ndarray, bias: np.ndarray, window: int, in_channels: int) -> dict[str, np.ndarray]:
  """A Linear over a flattened (C, window, window) map -> a window x window VALID conv with the same outputs."""
  weight = np.asarray(weight, dtype=np.float32).reshape(-1, in_channels, window, window)
  return {"kernel": conv_kernel(weight), "bias": np.asarray(bias, dtype=np.float32)}


def convert_vgg16(state_dict: Mapping[str, Any], *, num_classes: int = 1000,
                  source: str = "vgg16 state_dict") -> dict[str, Any]:
  """torchvision.models.vgg16 state_dict -> {'params': ...} for fcnjax.models.vgg.vgg16(num_classes=num_classes).

  Raises ConversionError naming every missing, unexpected or mis-shaped key (e.g. given a resnet50 checkpoint).
  """
  check_keys(state_dict, vgg16_expected_shapes(num_classes), source=source)
  params = {"features": vgg16_features_params(state_dict)}
  for name, index, window, in_channels in (("fc6", 0, 7, 512), ("fc7", 3, 1, 4096), ("fc8", 6, 1, 4096)):
    params[name] = linear_as_conv(state_dict[f"classifier.{index}.weight"], state_dict[f"classifier.{index}.bias"],
                                  window, in_channels)
  return {"params": params}
