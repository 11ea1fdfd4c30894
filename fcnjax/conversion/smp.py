"""segmentation_models_pytorch state_dicts -> Flax variables for fcnjax.models.smp, and torchvision's ImageNet ResNets
as the encoder of those models.

convert_smp_unet / convert_smp_deeplabv3plus read `torch.save(smp.Unet("resnet34", classes=K).state_dict())` (or
DeepLabV3Plus's): the encoder (resnet18/34/50/101) is told apart by its blocks per stage, in_channels read from
encoder.conv1 and the class count from segmentation_head.0; every key and shape is then checked by name
(common.check_keys) before anything is converted. convert_smp_encoder reads a torchvision resnetNN state_dict and
gives the 'backbone' variables of either model, with the first convolution adapted to `in_channels` exactly as smp
adapts ImageNet weights (encoders._utils.patch_first_conv).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from fcnjax.conversion.common import ConversionError, check_keys, is_num_batches_tracked
from fcnjax.conversion.resnet import (Layer, class_count, convert_layers, expected_shapes, resnet_trunk_layers,
                                      trunk_channels)
from fcnjax.models.resnet import ARCHITECTURES, STAGES, Bottleneck
from fcnjax.models.smp import ENCODERS, UNET_DECODER_CHANNELS

STEM_CHANNELS = 64
HIGH_RES_CHANNELS = 48  # DeepLabV3Plus's layer1 projection


def encoder_depth(state_dict: Mapping[str, Any], prefix: str, source: str) -> int:
  """The ResNet depth whose blocks per stage and block type (conv3 or not) the `prefix`layerN.I.* keys show."""
  sizes = []
  for stage, _ in STAGES:
    head = f"{prefix}{stage}."
    blocks = {key[len(head):].split(".", 1)[0] for key in state_dict if key.startswith(head)}
    sizes.append(max((int(b) + 1 for b in blocks if b.isdigit()), default=0))
  bottleneck = any(key.startswith(prefix + "layer") and ".conv3." in key for key in state_dict)
  for depth, (block, stage_sizes) in ARCHITECTURES.items():
    if tuple(stage_sizes) == tuple(sizes) and (block is Bottleneck) == bottleneck:
      return depth
  raise ConversionError(f"{source}: the {prefix}layer1-4 keys ({tuple(sizes)} blocks per stage, "
                        f"{'Bottleneck' if bottleneck else 'BasicBlock'}) are none of the encoders {sorted(ENCODERS)}")


def _depth(state_dict: Mapping[str, Any], prefix: str, encoder: str | None, source: str) -> int:
  if encoder is None:
    return encoder_depth(state_dict, prefix, source)
  if encoder not in ENCODERS:
    raise ConversionError(f"{source}: encoder={encoder!r}; expected one of {sorted(ENCODERS)}")
  return ENCODERS[encoder]


def _in_channels(state_dict: Mapping[str, Any], key: str) -> int:
  shape = np.shape(state_dict.get(key, np.zeros((STEM_CHANNELS, 3, 7, 7))))
  return int(shape[1]) if len(shape) == 4 else 3


def encoder_layers(depth: int, in_channels: int, torch_prefix: str) -> list[Layer]:
  """The trunk's layers under 'backbone', its first convolution taking `in_channels`."""
  layers = list(resnet_trunk_layers(depth, torch_prefix, ("backbone",)))
  prefix, path, kind, _ = layers[0]
  layers[0] = (prefix, path, kind, (STEM_CHANNELS, in_channels, 7, 7))
  return layers


def _conv_bn(torch_prefix: str, path: tuple[str, ...], features: int, in_channels: int, kernel: int) -> list[Layer]:
  """Conv2dReLU: conv (Sequential index 0) and BatchNorm (index 1)."""
  return [(f"{torch_prefix}.0", path + ("conv",), "conv", (features, in_channels, kernel, kernel)),
          (f"{torch_prefix}.1", path + ("bn",), "bn", (features,))]


def _separable(conv_prefix: str, bn_prefix: str, path: tuple[str, ...], features: int,
               in_channels: int) -> list[Layer]:
  """SeparableConv2d (depthwise index 0, pointwise index 1, no biases) and the BatchNorm after it."""
  return [(f"{conv_prefix}.0", path + ("depthwise",), "conv", (in_channels, 1, 3, 3)),
          (f"{conv_prefix}.1", path + ("pointwise",), "conv", (features, in_channels, 1, 1)),
          (bn_prefix, path + ("bn",), "bn", (features,))]


def unet_decoder_layers(depth: int, decoder_channels: Sequence[int]) -> list[Layer]:
  channels = trunk_channels(depth)
  inputs = [channels["layer4"], *decoder_channels[:-1]]
  skips = [channels["layer3"], channels["layer2"], channels["layer1"], STEM_CHANNELS, 0]
  layers = []
  for i, (width, in_channels, skip) in enumerate(zip(decoder_channels, inputs, skips)):
    t, f = f"decoder.blocks.{i}", ("decoder", f"blocks_{i}")
    layers += _conv_bn(f"{t}.conv1", f + ("conv1",), width, in_channels + skip, 3)
    layers += _conv_bn(f"{t}.conv2", f + ("conv2",), width, width, 3)
  return layers


def deeplabv3plus_decoder_layers(depth: int, features: int, separable: bool) -> list[Layer]:
  channels = trunk_channels(depth)
  deep, high_res = channels["layer4"], channels["layer1"]
  t, f = "decoder.aspp.0", ("decoder", "aspp")
  layers = _conv_bn(f"{t}.convs.0", f + ("conv_1x1",), features, deep, 1)
  for i in range(3):
    branch = f"{t}.convs.{i + 1}"
    if separable:
      layers += _separable(f"{branch}.0", f"{branch}.1", f + (f"atrous_{i}",), features, deep)
    else:
      layers += _conv_bn(branch, f + (f"atrous_{i}",), features, deep, 3)
  # ASPPPooling's Sequential: 0 is the pooling itself, 1 the conv, 2 the BatchNorm.
  layers += [(f"{t}.convs.4.1", f + ("pooling", "conv", "conv"), "conv", (features, deep, 1, 1)),
             (f"{t}.convs.4.2", f + ("pooling", "conv", "bn"), "bn", (features,))]
  layers += _conv_bn(f"{t}.project", f + ("project",), features, 5 * features, 1)
  layers += _separable("decoder.aspp.1", "decoder.aspp.2", ("decoder", "aspp_conv"), features, features)
  layers += _conv_bn("decoder.block1", ("decoder", "block1"), HIGH_RES_CHANNELS, high_res, 1)
  layers += _separable("decoder.block2.0", "decoder.block2.1", ("decoder", "block2"), features,
                       features + HIGH_RES_CHANNELS)
  return layers


def _convert_model(state_dict: Mapping[str, Any], decoder: list[Layer], depth: int, head_in: int, head_kernel: int,
                   label: str) -> dict[str, dict]:
  num_classes = class_count(state_dict, ("segmentation_head.0.weight", "segmentation_head.0.bias"), 1)
  in_channels = _in_channels(state_dict, "encoder.conv1.weight")
  layers = encoder_layers(depth, in_channels, "encoder.") + decoder
  layers.append(("segmentation_head.0", ("segmentation_head",), "conv_bias",
                 (num_classes, head_in, head_kernel, head_kernel)))
  check_keys(state_dict, expected_shapes(layers), source=label, ignore=is_num_batches_tracked)
  return convert_layers(state_dict, layers)


def convert_smp_unet(state_dict: Mapping[str, Any], *, encoder: str | None = None,
                     decoder_channels: Sequence[int] = UNET_DECODER_CHANNELS,
                     source: str = "state_dict") -> dict[str, dict]:
  """smp.Unet(encoder, decoder_channels, in_channels, classes) state_dict -> variables for 'smp_unet' (encoder read
  from the keys unless given)."""
  depth = _depth(state_dict, "encoder.", encoder, source)
  decoder = unet_decoder_layers(depth, tuple(decoder_channels))
  return _convert_model(state_dict, decoder, depth, decoder_channels[-1], 3,
                        f"{source} (smp Unet, resnet{depth} encoder)")


def convert_smp_deeplabv3plus(state_dict: Mapping[str, Any], *, encoder: str | None = None,
                              decoder_channels: int = 256, aspp_separable: bool | None = None,
                              source: str = "state_dict") -> dict[str, dict]:
  """smp.DeepLabV3Plus(encoder, decoder_channels, decoder_aspp_separable, in_channels, classes) state_dict ->
  variables for 'smp_deeplabv3plus'. The output stride and atrous rates change no weight; aspp_separable=None reads
  it from the keys (depthwise convs at decoder.aspp.0.convs.1.0.0)."""
  depth = _depth(state_dict, "encoder.", encoder, source)
  if aspp_separable is None:
    aspp_separable = "decoder.aspp.0.convs.1.0.0.weight" in state_dict
  decoder = deeplabv3plus_decoder_layers(depth, decoder_channels, aspp_separable)
  return _convert_model(state_dict, decoder, depth, decoder_channels, 1,
                        f"{source} (smp DeepLabV3Plus, resnet{depth} encoder, aspp_separable={aspp_separable})")


def adapt_first_conv(kernel: np.ndarray, in_channels: int) -> np.ndarray:
  """smp's patch_first_conv for pretrained weights, on a flax (kh, kw, 3, out) kernel: one channel takes the sum over
  RGB; N > 1 channels repeat R, G, B cyclically, scaled by 3 / N (so a grey image repeated N times gives the RGB
  response)."""
  kernel = np.asarray(kernel, np.float32)
  rgb = kernel.shape[2]
  if in_channels == rgb:
    return kernel
  if in_channels == 1:
    return kernel.sum(axis=2, keepdims=True)
  return kernel[:, :, [i % rgb for i in range(in_channels)], :] * np.float32(rgb / in_channels)


def convert_smp_encoder(state_dict: Mapping[str, Any], *, in_channels: int = 3, encoder: str | None = None,
                        source: str = "state_dict") -> dict[str, dict]:
  """torchvision resnet18/34/50/101 state_dict (ImageNet weights) -> the 'backbone' variables of 'smp_unet' and
  'smp_deeplabv3plus' for `in_channels` inputs; its fc is left out."""
  if in_channels < 1:
    raise ConversionError(f"{source}: in_channels={in_channels}; expected at least 1")
  depth = _depth(state_dict, "", encoder, source)
  layers = encoder_layers(depth, 3, "")
  check_keys(state_dict, expected_shapes(layers), source=f"{source} (torchvision resnet{depth} as an smp encoder)",
             ignore=lambda key: is_num_batches_tracked(key) or key in ("fc.weight", "fc.bias"))
  variables = convert_layers(state_dict, layers)
  stem = variables["params"]["backbone"]["conv1"]
  stem["kernel"] = adapt_first_conv(stem["kernel"], in_channels)
  return variables
