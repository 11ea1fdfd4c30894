"""torchvision mobilenet_v3_large / lraspp_mobilenet_v3_large / deeplabv3_mobilenet_v3_large state_dicts -> Flax
variables for fcnjax's models of the same names.

The ImageNet classifier's trunk is `features.*`, the segmentation models' is `backbone.*` (torchvision's
IntermediateLayerGetter over `features`); both become 'backbone/features_N/...', so converted ImageNet weights
initialise the segmentation models' trunks by path. Dilation changes no weight shape. Depthwise weights (C, 1, k, k)
become flax kernels (k, k, 1, C), the layout of a convolution with feature_group_count=C.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

from fcnjax.conversion.common import check_keys, is_num_batches_tracked
from fcnjax.conversion.deeplabv3 import deeplab_head_layers
from fcnjax.conversion.resnet import (Layer, class_count, convert_layers, expected_shapes, fcn_head_layers,
                                      head_class_count, keep_aux_head)
from fcnjax.models.mobilenet_v3 import (HIGH_CHANNELS, LARGE_BLOCKS, LAST_CHANNEL, LAST_CONV_CHANNELS, LOW_CHANNELS,
                                        STEM_CHANNELS, squeeze_channels)


def mobilenet_v3_large_trunk_layers(torch_prefix: str, flax_prefix: tuple[str, ...] = ("backbone",)
                                    ) -> Iterator[Layer]:
  """Every conv and BatchNorm of torchvision's mobilenet_v3_large `features` (torch_prefix 'features.' or
  'backbone.'), with its path in fcnjax.models.mobilenet_v3."""
  def conv_bn(torch_name: str, flax_module: tuple[str, ...], flax_name: str, shape: tuple[int, ...]):
    yield f"{torch_prefix}{torch_name}.0", flax_prefix + flax_module + (f"{flax_name}_0",), "conv", shape
    yield f"{torch_prefix}{torch_name}.1", flax_prefix + flax_module + (f"{flax_name}_1",), "bn", (shape[0],)

  yield from conv_bn("0", (), "features_0", (STEM_CHANNELS, 3, 3, 3))
  for n, cfg in enumerate(LARGE_BLOCKS, start=1):
    module, index = (f"features_{n}",), 0
    if cfg.expanded_channels != cfg.input_channels:
      yield from conv_bn(f"{n}.block.0", module, "block_0", (cfg.expanded_channels, cfg.input_channels, 1, 1))
      index += 1
    yield from conv_bn(f"{n}.block.{index}", module, f"block_{index}",
                       (cfg.expanded_channels, 1, cfg.kernel, cfg.kernel))  # depthwise
    index += 1
    if cfg.use_se:
      squeeze, se = squeeze_channels(cfg.expanded_channels), f"{torch_prefix}{n}.block.{index}"
      yield f"{se}.fc1", flax_prefix + module + (f"block_{index}", "fc1"), "conv_bias", (
          squeeze, cfg.expanded_channels, 1, 1)
      yield f"{se}.fc2", flax_prefix + module + (f"block_{index}", "fc2"), "conv_bias", (
          cfg.expanded_channels, squeeze, 1, 1)
      index += 1
    yield from conv_bn(f"{n}.block.{index}", module, f"block_{index}",
                       (cfg.out_channels, cfg.expanded_channels, 1, 1))
  last = len(LARGE_BLOCKS) + 1
  yield from conv_bn(str(last), (), f"features_{last}", (LAST_CONV_CHANNELS, LARGE_BLOCKS[-1].out_channels, 1, 1))


def lraspp_head_layers(num_classes: int, inter_channels: int = 128) -> Iterator[Layer]:
  """torchvision's LRASPPHead -> fcnjax.models.lraspp.LRASPPHead under 'classifier'."""
  yield "classifier.cbr.0", ("classifier", "cbr_0"), "conv", (inter_channels, HIGH_CHANNELS, 1, 1)
  yield "classifier.cbr.1", ("classifier", "cbr_1"), "bn", (inter_channels,)
  yield "classifier.scale.1", ("classifier", "scale_1"), "conv", (inter_channels, HIGH_CHANNELS, 1, 1)
  yield "classifier.low_classifier", ("classifier", "low_classifier"), "conv_bias", (num_classes, LOW_CHANNELS, 1, 1)
  yield ("classifier.high_classifier", ("classifier", "high_classifier"), "conv_bias",
         (num_classes, inter_channels, 1, 1))


def convert_mobilenet_v3_large(state_dict: Mapping[str, Any], *, source: str = "state_dict") -> dict[str, dict]:
  """torchvision mobilenet_v3_large state_dict -> variables for fcnjax's 'mobilenet_v3_large' (num_classes read from
  classifier.3)."""
  num_classes = class_count(state_dict, ("classifier.3.weight", "classifier.3.bias"), 1000)
  layers = list(mobilenet_v3_large_trunk_layers("features."))
  layers.append(("classifier.0", ("classifier_0",), "linear", (LAST_CHANNEL, LAST_CONV_CHANNELS)))
  layers.append(("classifier.3", ("classifier_3",), "linear", (num_classes, LAST_CHANNEL)))
  check_keys(state_dict, expected_shapes(layers), source=f"{source} (torchvision mobilenet_v3_large)",
             ignore=is_num_batches_tracked)
  return convert_layers(state_dict, layers)


def convert_lraspp_mobilenet_v3_large(state_dict: Mapping[str, Any], *,
                                      source: str = "state_dict") -> dict[str, dict]:
  """torchvision lraspp_mobilenet_v3_large state_dict -> variables for fcnjax's 'lraspp_mobilenet_v3_large'
  (num_classes read from the two classifiers)."""
  num_classes = class_count(state_dict, [f"classifier.{c}.{leaf}" for c in ("low_classifier", "high_classifier")
                                         for leaf in ("weight", "bias")], 21)
  layers = list(mobilenet_v3_large_trunk_layers("backbone."))
  layers += lraspp_head_layers(num_classes)
  check_keys(state_dict, expected_shapes(layers), source=f"{source} (torchvision lraspp_mobilenet_v3_large)",
             ignore=is_num_batches_tracked)
  return convert_layers(state_dict, layers)


def convert_deeplabv3_mobilenet_v3_large(state_dict: Mapping[str, Any], *, aux_loss: bool | None = None,
                                         source: str = "state_dict") -> dict[str, dict]:
  """torchvision deeplabv3_mobilenet_v3_large state_dict -> variables for fcnjax's 'deeplabv3_mobilenet_v3_large'
  (num_classes from the heads).

  aux_loss=None converts the auxiliary FCNHead when the state_dict has one (aux_classifier.* keys, as in
  torchvision's COCO weights); build the model with aux_loss matching `'aux_classifier' in variables['params']`.
  aux_loss=False drops it on purpose; aux_loss=True insists on it.
  """
  arch = "deeplabv3_mobilenet_v3_large"
  state_dict, aux_loss = keep_aux_head(state_dict, aux_loss, arch, source)
  num_classes = head_class_count(state_dict, ("classifier.4", "aux_classifier.4"))
  layers = list(mobilenet_v3_large_trunk_layers("backbone."))
  layers += deeplab_head_layers("classifier", "classifier", HIGH_CHANNELS, num_classes)
  if aux_loss:
    layers += fcn_head_layers("aux_classifier", "aux_classifier", LOW_CHANNELS, num_classes)
  check_keys(state_dict, expected_shapes(layers), source=f"{source} (torchvision {arch}, aux_loss={aux_loss})",
             ignore=is_num_batches_tracked)
  return convert_layers(state_dict, layers)
