"""torchvision deeplabv3_resnet50 / deeplabv3_resnet101 state_dicts -> Flax variables for fcnjax's models of the
same names (fcnjax.models.deeplabv3).

`deeplab_head_layers` maps any DeepLabHead (whatever its input channels), so other backbones reuse it.
"""
from __future__ import annotations

import functools
from typing import Any, Iterator, Mapping, Sequence

from fcnjax.conversion.resnet import Layer, convert_segmentation_resnet
from fcnjax.models.deeplabv3 import ATROUS_RATES

ASPP_CHANNELS = 256


def deeplab_head_layers(torch_prefix: str, flax_name: str, in_channels: int, num_classes: int,
                        atrous_rates: Sequence[int] = ATROUS_RATES) -> Iterator[Layer]:
  """torchvision's DeepLabHead Sequential (0 ASPP, 1 conv, 2 bn, 3 relu, 4 conv) -> fcnjax DeepLabHead names.

  Inside the ASPP, convs.0 is the 1x1 branch, convs.1.. the atrous ones, and the last the pooling branch, whose
  Sequential starts with the (weightless) AdaptiveAvgPool2d, so its conv and bn are .1 and .2.
  """
  aspp, out = f"{torch_prefix}.0", ASPP_CHANNELS
  yield f"{aspp}.convs.0.0", (flax_name, "aspp", "conv_1x1", "conv"), "conv", (out, in_channels, 1, 1)
  yield f"{aspp}.convs.0.1", (flax_name, "aspp", "conv_1x1", "bn"), "bn", (out,)
  for i, _ in enumerate(atrous_rates):
    yield f"{aspp}.convs.{i + 1}.0", (flax_name, "aspp", f"atrous_{i}", "conv"), "conv", (out, in_channels, 3, 3)
    yield f"{aspp}.convs.{i + 1}.1", (flax_name, "aspp", f"atrous_{i}", "bn"), "bn", (out,)
  pooling = f"{aspp}.convs.{len(atrous_rates) + 1}"
  yield f"{pooling}.1", (flax_name, "aspp", "pooling", "conv"), "conv", (out, in_channels, 1, 1)
  yield f"{pooling}.2", (flax_name, "aspp", "pooling", "bn"), "bn", (out,)
  branches = len(atrous_rates) + 2
  yield f"{aspp}.project.0", (flax_name, "aspp", "project", "conv"), "conv", (out, branches * out, 1, 1)
  yield f"{aspp}.project.1", (flax_name, "aspp", "project", "bn"), "bn", (out,)
  yield f"{torch_prefix}.1", (flax_name, "conv"), "conv", (out, out, 3, 3)
  yield f"{torch_prefix}.2", (flax_name, "bn"), "bn", (out,)
  yield f"{torch_prefix}.4", (flax_name, "score"), "conv_bias", (num_classes, out, 1, 1)


def convert_deeplabv3_resnet(state_dict: Mapping[str, Any], *, depth: int, aux_loss: bool | None = None,
                             source: str = "state_dict") -> dict[str, dict]:
  """torchvision deeplabv3_resnet{depth} state_dict -> variables for fcnjax's 'deeplabv3_resnet{depth}'
  (num_classes from the heads).

  aux_loss=None converts the auxiliary FCNHead when the state_dict has one (aux_classifier.* keys); build the model
  with aux_loss matching `'aux_classifier' in variables['params']`. aux_loss=False drops it on purpose;
  aux_loss=True insists on it.
  """
  return convert_segmentation_resnet(state_dict, f"deeplabv3_resnet{depth}", depth, deeplab_head_layers, aux_loss,
                                     source)


convert_deeplabv3_resnet50 = functools.partial(convert_deeplabv3_resnet, depth=50)
convert_deeplabv3_resnet101 = functools.partial(convert_deeplabv3_resnet, depth=101)
