"""torchvision resnet18/34/50/101 and fcn_resnet50/101 state_dicts -> Flax variables for fcnjax's models of the same
names.

All put the trunk under 'backbone', so converted ImageNet resnetNN weights initialise a segmentation model's trunk of
the same depth by path (its 'fc' is simply not used there). Dilation changes no weight shape: torchvision's plain and
dilated ResNets have the same state_dict.
"""
from __future__ import annotations

import collections
import functools
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from fcnjax.conversion.common import ConversionError, check_keys, conv_kernel, is_num_batches_tracked
from fcnjax.models.resnet import ARCHITECTURES, STAGES, BasicBlock

# A layer of the table: (torch prefix, flax path, kind, shape). kind is 'conv' (shape = torch weight shape),
# 'conv_bias' (conv with bias), 'bn' (shape = (channels,)) or 'linear' (shape = torch weight shape).
Layer = tuple[str, tuple[str, ...], str, tuple[int, ...]]


def resnet_trunk_layers(depth: int, torch_prefix: str = "", flax_prefix: tuple[str, ...] = ()) -> Iterator[Layer]:
  """Every conv and BatchNorm of torchvision's ResNet-`depth` trunk, with its path in fcnjax.models.resnet."""
  def at(torch_name: str, *flax_path: str):
    return torch_prefix + torch_name, flax_prefix + flax_path

  block, stage_sizes = ARCHITECTURES[depth]
  expansion = block.expansion
  yield *at("conv1", "conv1"), "conv", (64, 3, 7, 7)
  yield *at("bn1", "bn1"), "bn", (64,)
  inplanes = 64
  for (stage, planes), blocks in zip(STAGES, stage_sizes):
    for i in range(blocks):
      t, f = f"{stage}.{i}.", f"{stage}_{i}"
      if block is BasicBlock:
        yield *at(t + "conv1", f, "conv1"), "conv", (planes, inplanes, 3, 3)
        yield *at(t + "bn1", f, "bn1"), "bn", (planes,)
        yield *at(t + "conv2", f, "conv2"), "conv", (planes, planes, 3, 3)
        yield *at(t + "bn2", f, "bn2"), "bn", (planes,)
      else:
        yield *at(t + "conv1", f, "conv1"), "conv", (planes, inplanes, 1, 1)
        yield *at(t + "bn1", f, "bn1"), "bn", (planes,)
        yield *at(t + "conv2", f, "conv2"), "conv", (planes, planes, 3, 3)
        yield *at(t + "bn2", f, "bn2"), "bn", (planes,)
        yield *at(t + "conv3", f, "conv3"), "conv", (planes * expansion, planes, 1, 1)
        yield *at(t + "bn3", f, "bn3"), "bn", (planes * expansion,)
      # A projection shortcut where the first block strides or changes width: every stage but BasicBlock's layer1.
      if i == 0 and (stage != "layer1" or inplanes != planes * expansion):
        yield *at(t + "downsample.0", f, "downsample_0"), "conv", (planes * expansion, inplanes, 1, 1)
        yield *at(t + "downsample.1", f, "downsample_1"), "bn", (planes * expansion,)
      inplanes = planes * expansion


def trunk_channels(depth: int) -> dict[str, int]:
  """Output channels of each stage of a ResNet-`depth` trunk ({'layer1': 256, ..} for depth 50)."""
  expansion = ARCHITECTURES[depth][0].expansion
  return {stage: planes * expansion for stage, planes in STAGES}


def fcn_head_layers(torch_prefix: str, flax_name: str, in_channels: int, num_classes: int) -> Iterator[Layer]:
  """torchvision's FCNHead Sequential (0 conv, 1 bn, 2 relu, 3 dropout, 4 conv) -> fcnjax FCNHead names."""
  inter = in_channels // 4
  yield f"{torch_prefix}.0", (flax_name, "conv"), "conv", (inter, in_channels, 3, 3)
  yield f"{torch_prefix}.1", (flax_name, "bn"), "bn", (inter,)
  yield f"{torch_prefix}.4", (flax_name, "score"), "conv_bias", (num_classes, inter, 1, 1)


def expected_shapes(layers: list[Layer]) -> dict[str, tuple[int, ...]]:
  shapes = {}
  for prefix, _, kind, shape in layers:
    if kind == "bn":
      for suffix in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{prefix}.{suffix}"] = shape
    else:
      shapes[f"{prefix}.weight"] = shape
      if kind in ("conv_bias", "linear"):
        shapes[f"{prefix}.bias"] = (shape[0],)
  return shapes


def convert_layers(state_dict: Mapping[str, Any], layers: list[Layer]) -> dict[str, dict]:
  """Reads each layer's tensors into {'params': ..., 'batch_stats': ...} at its flax path (keys already checked)."""
  params: dict = {}
  batch_stats: dict = {}

  def put(tree: dict, path: tuple[str, ...], leaves: dict[str, np.ndarray]):
    for name in path:
      tree = tree.setdefault(name, {})
    tree.update(leaves)

  for prefix, path, kind, _ in layers:
    get = lambda suffix: _numpy(state_dict[f"{prefix}.{suffix}"])  # noqa: E731
    if kind == "bn":
      put(params, path, {"scale": get("weight"), "bias": get("bias")})
      # Running statistics live in flax's 'batch_stats' collection; num_batches_tracked has no counterpart.
      put(batch_stats, path, {"mean": get("running_mean"), "var": get("running_var")})
    elif kind == "linear":
      put(params, path, {"kernel": np.ascontiguousarray(get("weight").T), "bias": get("bias")})
    else:
      leaves = {"kernel": conv_kernel(get("weight"))}
      if kind == "conv_bias":
        leaves["bias"] = get("bias")
      put(params, path, leaves)
  return {"params": params, "batch_stats": batch_stats}


def _numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor straight from model.state_dict()
    value = value.detach().cpu().numpy()
  return np.asarray(value, dtype=np.float32)


def class_count(state_dict: Mapping[str, Any], keys: Sequence[str], default: int) -> int:
  """The number of classes most of the head tensors `keys` agree on (their leading dimension; the first key's on a
  tie), so that one damaged tensor is named by check_keys as mis-shaped instead of the ones that fit; `default`
  when none is there."""
  counts = [int(np.shape(state_dict[k])[0]) for k in keys if k in state_dict and np.ndim(state_dict[k])]
  return collections.Counter(counts).most_common(1)[0][0] if counts else default


def convert_resnet(state_dict: Mapping[str, Any], *, depth: int, source: str = "state_dict") -> dict[str, dict]:
  """torchvision resnet{depth} state_dict -> variables for fcnjax's 'resnet{depth}' (num_classes read from fc)."""
  num_classes = class_count(state_dict, ("fc.weight", "fc.bias"), 1000)
  layers = list(resnet_trunk_layers(depth, "", ("backbone",)))
  layers.append(("fc", ("fc",), "linear", (num_classes, trunk_channels(depth)["layer4"])))
  check_keys(state_dict, expected_shapes(layers), source=f"{source} (torchvision resnet{depth})",
             ignore=is_num_batches_tracked)
  return convert_layers(state_dict, layers)


def keep_aux_head(state_dict: Mapping[str, Any], aux_loss: bool | None, arch: str,
                  source: str) -> tuple[Mapping[str, Any], bool]:
  """The state_dict to convert and whether it has an auxiliary head. aux_loss=None converts the auxiliary head when
  the state_dict has one (aux_classifier.* keys); aux_loss=False drops it on purpose; aux_loss=True insists on it."""
  has_aux = any(k.startswith("aux_classifier.") for k in state_dict)
  if aux_loss is None:
    aux_loss = has_aux
  if aux_loss and not has_aux:
    raise ConversionError(f"{source} (torchvision {arch}) has no aux_classifier.* keys, so it cannot "
                          f"initialise the auxiliary head: convert with aux_loss=False and build {arch} with "
                          "aux_loss=False")
  if not aux_loss:
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("aux_classifier.")}
  return state_dict, aux_loss


def head_class_count(state_dict: Mapping[str, Any], score_prefixes: Sequence[str]) -> int:
  """The class count most of the heads' last layers (e.g. 'classifier.4', 'aux_classifier.4') agree on; 21, as
  torchvision's segmentation models, when none is there."""
  return class_count(state_dict, [f"{p}.{leaf}" for p in score_prefixes for leaf in ("weight", "bias")], 21)


def convert_fcn_resnet(state_dict: Mapping[str, Any], *, depth: int, aux_loss: bool | None = None,
                       source: str = "state_dict") -> dict[str, dict]:
  """torchvision fcn_resnet{depth} state_dict -> variables for fcnjax's 'fcn_resnet{depth}' (num_classes from the
  heads).

  aux_loss=None converts the auxiliary head when the state_dict has one (aux_classifier.* keys); build the model with
  aux_loss matching `'aux_classifier' in variables['params']`. aux_loss=False drops the auxiliary head on purpose;
  aux_loss=True insists on it.
  """
  return convert_segmentation_resnet(state_dict, f"fcn_resnet{depth}", depth, fcn_head_layers, aux_loss, source)


def convert_segmentation_resnet(state_dict: Mapping[str, Any], arch: str, depth: int, head_layers,
                                aux_loss: bool | None, source: str) -> dict[str, dict]:
  """A torchvision segmentation model on a dilated ResNet trunk: `head_layers` maps its 'classifier', the FCNHead
  its optional 'aux_classifier' (on layer3); num_classes from the heads."""
  state_dict, aux_loss = keep_aux_head(state_dict, aux_loss, arch, source)
  num_classes = head_class_count(state_dict, ("classifier.4", "aux_classifier.4"))
  channels = trunk_channels(depth)
  layers = list(resnet_trunk_layers(depth, "backbone.", ("backbone",)))
  layers += head_layers("classifier", "classifier", channels["layer4"], num_classes)
  if aux_loss:
    layers += fcn_head_layers("aux_classifier", "aux_classifier", channels["layer3"], num_classes)
  check_keys(state_dict, expected_shapes(layers), source=f"{source} (torchvision {arch}, aux_loss={aux_loss})",
             ignore=is_num_batches_tracked)
  return convert_layers(state_dict, layers)


convert_resnet18 = functools.partial(convert_resnet, depth=18)
convert_resnet34 = functools.partial(convert_resnet, depth=34)
convert_resnet50 = functools.partial(convert_resnet, depth=50)
convert_resnet101 = functools.partial(convert_resnet, depth=101)
convert_fcn_resnet50 = functools.partial(convert_fcn_resnet, depth=50)
convert_fcn_resnet101 = functools.partial(convert_fcn_resnet, depth=101)
