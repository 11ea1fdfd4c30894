"""Pretrained Flax variables: save/load them with orbax, and copy them into a freshly initialised model by path.

A pretrained file is an orbax PyTree checkpoint DIRECTORY holding a plain tree of numpy arrays such as
{'params': ..., 'batch_stats': ...}; conversions/convert_torchvision.py writes them and `config.model.pretrained`
points at one. Paths are written 'collection/module/.../leaf', e.g. 'params/features/conv1_1/kernel'.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

SCOPES = ("all", "backbone")


def save_variables(path: str, variables: Mapping[str, Any], *, overwrite: bool = False) -> str:
  """Writes `variables` (any tree of arrays) as numpy arrays to the directory `path`; returns its absolute path.

  Arrays are fetched to the host first, so the file holds no device or sharding information and loads anywhere.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
  tree = jax.tree_util.tree_map(np.asarray, jax.device_get(flax.core.unfreeze(variables)))
  ocp.PyTreeCheckpointer().save(path, tree, force=overwrite)
  return path


def load_variables(path: str) -> dict[str, Any]:
  """Reads a directory written by save_variables as a nested dict of numpy arrays."""
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such pretrained-variables directory (save_variables or "
                            f"conversions/convert_torchvision.py writes one)")
  try:
    return ocp.PyTreeCheckpointer().restore(path)
  except Exception as e:  # orbax raises several types for a directory that is not a checkpoint; name the path.
    raise ValueError(f"{path}: not a pretrained-variables checkpoint ({type(e).__name__}: {e})") from e


def report_summary(report: Mapping[str, list[str]]) -> str:
  """A few lines for the log: how many arrays merge_pretrained loaded, and which paths it did not."""
  lines = [f"loaded {len(report['loaded'])} pretrained arrays"]
  for title, key in (("unused pretrained", "unused"), ("skipped (shape differs)", "skipped"),
                     ("left at init", "left_at_init")):
    if report[key]:
      lines.append(f"{title} ({len(report[key])}): " + ", ".join(_truncate(report[key])))
  return "\n".join(lines)


def merge_pretrained(init_variables: Mapping[str, Any], pretrained_variables: Mapping[str, Any],
                     scope: str = "all") -> tuple[Any, dict[str, list[str]]]:
  """Copies every pretrained leaf whose path exists in `init_variables` with the same shape.

  Returns the merged variables (the structure of `init_variables`; a copied leaf takes the target leaf's dtype and,
  for a jax.Array, its sharding) and a report, a dict of sorted 'collection/module/.../leaf' path lists:
    'loaded': copied from the pretrained variables;
    'unused': pretrained leaves the target lacks;
    'skipped': pretrained leaves of modules whose shapes differ (scope='backbone' only), with both shapes;
    'left_at_init': target leaves not loaded (new heads, skipped layers).
  report_summary(report) formats it for a log. Pretrained leaves the target lacks are always left out and
  reported as unused: loading ImageNet VGG16 into FCN-8s drops fc8, ImageNet ResNet-50 into fcn_resnet50 drops fc.

  scope='all': a pretrained leaf whose path exists in the target with another shape is an error (ValueError naming
    every such path); use it to resume or fine-tune the same model with the same classes, or to load a classifier
    backbone into a segmentation model.
  scope='backbone': modules whose shapes differ, i.e. the class-dependent layers (fcn_resnet50's classifier/conv4
    and aux_classifier/conv4 when COCO's 21 classes become 3, FCN's score_* and upscore* layers), are skipped whole
    and stay at init; everything else that fits is loaded. The skipped paths are logged and reported.

  Either way it is an error if nothing at all is loaded: the checkpoint is of another model.
  """
  if scope not in SCOPES:
    raise ValueError(f"merge_pretrained: scope={scope!r}; expected one of {SCOPES}")
  target = _flatten(init_variables)
  pretrained = _flatten(pretrained_variables)
  mismatched = {p: (np.shape(v), np.shape(target[p])) for p, v in pretrained.items()
                if p in target and np.shape(v) != np.shape(target[p])}
  if mismatched and scope == "all":
    raise ValueError(
        f"pretrained variables do not fit the model at {len(mismatched)} path(s):\n"
        + "\n".join(f"  {p}: pretrained {a}, model {b}" for p, (a, b) in sorted(mismatched.items()))
        + "\nIf only the number of classes differs, use scope='backbone' (model.pretrained_scope) to leave those "
          "layers at init.")
  skipped_modules = {_module(p) for p in mismatched}
  loaded, unused, skipped = [], [], []
  for p, value in pretrained.items():
    if p not in target:
      unused.append(p)
    elif _module(p) in skipped_modules:
      skipped.append(p + (f": pretrained {mismatched[p][0]}, model {mismatched[p][1]}" if p in mismatched else ""))
    else:
      loaded.append(p)
  if not loaded:
    raise ValueError(
        "no pretrained variable fits the model: is this a checkpoint of another model?\n"
        f"  pretrained paths ({len(pretrained)}): {', '.join(_truncate(sorted(pretrained), 8))}\n"
        f"  model paths ({len(target)}): {', '.join(_truncate(sorted(target), 8))}")
  if skipped:
    logging.warning("merge_pretrained(scope='backbone'): left %d mismatched pretrained arrays out: %s",
                    len(skipped), ", ".join(_truncate(skipped)))
  loaded_set = set(loaded)

  def take(path, leaf):
    key = _path_str(path)
    if key not in loaded_set:
      return leaf
    value = np.asarray(pretrained[key], dtype=leaf.dtype)
    return jax.device_put(value, leaf.sharding) if isinstance(leaf, jax.Array) else value

  merged = jax.tree_util.tree_map_with_path(take, init_variables)
  report = {"loaded": sorted(loaded), "unused": sorted(unused), "skipped": sorted(skipped),
            "left_at_init": sorted(p for p in target if p not in loaded_set)}
  return merged, report


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _flatten(tree) -> dict[str, Any]:
  return {_path_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _module(path: str) -> str:
  """'params/classifier/conv4/kernel' -> 'classifier/conv4': the module, shared by its params and batch_stats."""
  return path.split("/", 1)[-1].rsplit("/", 1)[0]


def _truncate(items: list[str], limit: int = 20) -> list[str]:
  return items if len(items) <= limit else items[:limit] + [f"... and {len(items) - limit} more"]
