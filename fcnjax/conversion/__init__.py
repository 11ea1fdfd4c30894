"""torchvision state_dict -> Flax variables. `conversions/convert_torchvision.py` is the command-line front end."""
from __future__ import annotations

import importlib

from fcnjax.conversion.common import ConversionError, load_state_dict  # noqa: F401

# torchvision architecture -> (converter "module:function", fcnjax model it produces variables for)
CONVERTERS = {
    "vgg16": ("fcnjax.conversion.vgg:convert_vgg16", "vgg16"),
    "resnet50": ("fcnjax.conversion.resnet:convert_resnet50", "resnet50"),
    "resnet18": ("fcnjax.conversion.resnet:convert_resnet18", "resnet18"),
    "resnet34": ("fcnjax.conversion.resnet:convert_resnet34", "resnet34"),
    "resnet101": ("fcnjax.conversion.resnet:convert_resnet101", "resnet101"),
    "fcn_resnet50": ("fcnjax.conversion.resnet:convert_fcn_resnet50", "fcn_resnet50"),
    "fcn_resnet101": ("fcnjax.conversion.resnet:convert_fcn_resnet101", "fcn_resnet101"),
    "deeplabv3_resnet50": ("fcnjax.conversion.deeplabv3:convert_deeplabv3_resnet50", "deeplabv3_resnet50"),
    "deeplabv3_resnet101": ("fcnjax.conversion.deeplabv3:convert_deeplabv3_resnet101", "deeplabv3_resnet101"),
    "smp_unet": ("fcnjax.conversion.smp:convert_smp_unet", "smp_unet"),
    "smp_deeplabv3plus": ("fcnjax.conversion.smp:convert_smp_deeplabv3plus", "smp_deeplabv3plus"),
    # A torchvision resnet18/34/50/101 file as the encoder ('backbone') of either smp model.
    "smp_encoder": ("fcnjax.conversion.smp:convert_smp_encoder", "smp_unet or smp_deeplabv3plus"),
    "mobilenet_v3_large": ("fcnjax.conversion.mobilenet_v3:convert_mobilenet_v3_large", "mobilenet_v3_large"),
    "lraspp_mobilenet_v3_large": ("fcnjax.conversion.mobilenet_v3:convert_lraspp_mobilenet_v3_large",
                                  "lraspp_mobilenet_v3_large"),
    "deeplabv3_mobilenet_v3_large": ("fcnjax.conversion.mobilenet_v3:convert_deeplabv3_mobilenet_v3_large",
                                     "deeplabv3_mobilenet_v3_large"),
}


def get_converter(arch: str):
  if arch not in CONVERTERS:
    raise ValueError(f"unknown architecture {arch!r}; the converter knows {', '.join(sorted(CONVERTERS))}")
  module_name, attr = CONVERTERS[arch][0].split(":")
  return getattr(importlib.import_module(module_name), attr)
