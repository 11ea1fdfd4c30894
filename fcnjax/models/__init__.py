"""Model zoo: a name maps to a builder, found by import (big_vision style), not by a class hierarchy.

Every model is a flax.linen Module called as `model.apply(variables, images, train=...)` on NHWC float images
normalised with ImageNet statistics, and returns a dict with 'out' (logits at the input's size, NHWC) and, for models
with an auxiliary head, 'aux' -- what the loss needs and nothing else, like torchvision's segmentation models.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

# name -> "module:builder". Builders take keyword arguments only (num_classes, dtype, and model options).
MODELS = {
    "vgg16": "fcnjax.models.vgg:vgg16",
    "fcn32s": "fcnjax.models.fcn:fcn32s",
    "fcn16s": "fcnjax.models.fcn:fcn16s",
    "fcn8s": "fcnjax.models.fcn:fcn8s",
    "unet": "fcnjax.models.unet:unet",
    "resnet50": "fcnjax.models.resnet:resnet50",
    "resnet18": "fcnjax.models.resnet:resnet18",
    "resnet34": "fcnjax.models.resnet:resnet34",
    "resnet101": "fcnjax.models.resnet:resnet101",
    "fcn_resnet50": "fcnjax.models.fcn_resnet:fcn_resnet50",
    "fcn_resnet101": "fcnjax.models.fcn_resnet:fcn_resnet101",
    "deeplabv3_resnet50": "fcnjax.models.deeplabv3:deeplabv3_resnet50",
    "deeplabv3_resnet101": "fcnjax.models.deeplabv3:deeplabv3_resnet101",
    "smp_unet": "fcnjax.models.smp:smp_unet",
    "smp_deeplabv3plus": "fcnjax.models.smp:smp_deeplabv3plus",
    "mobilenet_v3_large": "fcnjax.models.mobilenet_v3:mobilenet_v3_large",
    "lraspp_mobilenet_v3_large": "fcnjax.models.lraspp:lraspp_mobilenet_v3_large",
    "deeplabv3_mobilenet_v3_large": "fcnjax.models.deeplabv3:deeplabv3_mobilenet_v3_large",
}

# Config keys that describe how to initialise a model rather than the model itself.
NON_ARCHITECTURE_KEYS = ("name", "pretrained", "pretrained_scope")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def get_builder(name: str):
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
  module_name, attr = MODELS[name].split(":")
  return getattr(importlib.import_module(module_name), attr)


def build_model(model_config: Mapping[str, Any]) -> nn.Module:
  """Builds the model named by `model_config['name']` with the remaining architecture keys as arguments."""
  config = dict(model_config)
  name = config["name"]
  kwargs = {k: v for k, v in config.items() if k not in NON_ARCHITECTURE_KEYS}
  if isinstance(kwargs.get("dtype"), str):
    if kwargs["dtype"] not in DTYPES:
      raise ValueError(f"model.dtype={kwargs['dtype']!r}; expected one of {sorted(DTYPES)}")
    kwargs["dtype"] = DTYPES[kwargs["dtype"]]
  builder = get_builder(name)
  try:
    return builder(**kwargs)
  except TypeError as e:
    known = set(getattr(builder, "__dataclass_fields__", ())) or set(
        inspect.signature(builder).parameters)
    unknown = sorted(set(kwargs) - known) if known else []
    raise TypeError(f"model {name!r} does not take the option(s) {unknown or sorted(kwargs)}: {e}") from e
