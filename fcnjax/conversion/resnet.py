"""torchvision resnet50 / fcn_resnet50 state_dicts -> Flax variables for fcnjax's 'resnet50' / 'fcn_resnet50'.

Both put the trunk under 'backbone', so converted ImageNet resnet50 weights initialise fcn_resnet50's trunk by path
(its 'fc' is simply not used there). Dilation changes no weight shape: torchvision's plain and dilated ResNet-50 have
the same state_dict.
"""
from __future__ import annotations

import collections
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from fcnjax.conversion.common import ConversionError, check_keys, conv_kernel, is_num_batches_tracked
from fcnjax.models.resnet import EXPANSION, RESNET50_STAGES

# A layer of the table: (torch prefix, flax path, kind, shape). kind is 'conv' (shape = torch weight shape),
# 'conv_bias' (conv with bias), 'bn' (shape = (channels,)) or 'linear' (shape = torch weight shape).
Layer = tuple[str, tuple[str, ...], str, tuple[int, ...]]


def resnet50_trunk_layers(torch_prefix: str = "", flax_prefix: tuple[str, ...] = ()) -> Iterator[Layer]:
  """Every conv and BatchNorm of torchvision's ResNet-50 trunk, with its path in fcnjax.models.resnet."""
  def at(torch_name: str, *flax_path: str):
    return torch_prefix + torch_name, flax_prefix + flax_path

  yield *at("conv1", "conv1"), "conv", (64, 3, 7, 7)
  yield *at("bn1", "bn1"), "bn", (64,)
  inplanes = 64
  for stage, planes, blocks in RESNET50_STAGES:
    for i in range(blocks):
      t, f = f"{stage}.{i}.", f"{stage}_{i}"
      yield *at(t + "conv1", f, "conv1"), "conv", (planes, inplanes, 1, 1)
      yield *at(t + "bn1", f, "bn1"), "bn", (planes,)
      yield *at(t + "conv2", f, "conv2"), "conv", (planes, planes, 3, 3)
      yield *at(t + "bn2", f, "bn2"), "bn", (planes,)
      yield *at(t + "conv3", f, "conv3"), "conv", (planes * EXPANSION, planes, 1, 1)
      yield *at(t + "bn3", f, "bn3"), "bn", (planes * EXPANSION,)
      if i == 0:  # every ResNet-50 stage changes width in its first block, so each has a projection shortcut
        yield *at(t + "downsample.0", f, "downsample_0"), "conv", (planes * EXPANSION, inplanes, 1, 1)
        yield *at(t + "downsample.1", f, "downsample_1"), "bn", (planes * EXPANSION,)
      inplanes = planes * EXPANSION


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


def convert_resnet50(state_dict: Mapping[str, Any], *, source: str = "state_dict") -> dict[str, dict]:
  """torchvision resnet50 state_dict -> variables for fcnjax's 'resnet50' (num_classes read from fc.weight)."""
  num_classes = class_count(state_dict, ("fc.weight", "fc.bias"), 1000)
  layers = list(resnet50_trunk_layers("", ("backbone",)))
  layers.append(("fc", ("fc",), "linear", (num_classes, 512 * EXPANSION)))
  check_keys(state_dict, expected_shapes(layers), source=f"{source} (torchvision resnet50)",
             ignore=is_num_batches_tracked)
  return convert_layers(state_dict, layers)


def convert_fcn_resnet50(state_dict: Mapping[str, Any], *, aux_loss: bool | None = None,
                         source: str = "state_dict") -> dict[str, dict]:
  """torchvision fcn_resnet50 state_dict -> variables for fcnjax's 'fcn_resnet50' (num_classes from the head).

  aux_loss=None converts the auxiliary head when the state_dict has one (aux_classifier.* keys); build the model with
  aux_loss matching `'aux_classifier' in variables['params']`. aux_loss=False drops the auxiliary head on purpose;
  aux_loss=True insists on it.
  """
  has_aux = any(k.startswith("aux_classifier.") for k in state_dict)
  if aux_loss is None:
    aux_loss = has_aux
  if aux_loss and not has_aux:
    raise ConversionError(f"{source} (torchvision fcn_resnet50) has no aux_classifier.* keys, so it cannot "
                          "initialise the auxiliary head: convert with aux_loss=False and build fcn_resnet50 with "
                          "aux_loss=False")
  if not aux_loss:
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("aux_classifier.")}
  num_classes = class_count(state_dict, [f"{head}.4.{leaf}" for head in ("classifier", "aux_classifier")
                                         for leaf in ("weight", "bias")], 21)
  layers = list(resnet50_trunk_layers("backbone.", ("backbone",)))
  layers += fcn_head_layers("classifier", "classifier", 512 * EXPANSION, num_classes)
  if aux_loss:
    layers += fcn_head_layers("aux_classifier", "aux_classifier", 256 * EXPANSION, num_classes)
  check_keys(state_dict, expected_shapes(layers), source=f"{source} (torchvision fcn_resnet50, aux_loss={aux_loss})",
             ignore=is_num_batches_tracked)
  return convert_layers(state_dict, layers)
