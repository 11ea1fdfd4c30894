"""FCN-8s ('paper' variant) in plain PyTorch: the parity reference for fcnjax.models.fcn in tests and benchmarks.

Written after the reference nets (shelhamer's Caffe voc-fcn8s, wkentaro/pytorch-fcn's FCN8s): conv1_1 padded by
100, ceil-mode pools, fc6 7x7 / fc7 1x1 convs with ReLU and Dropout, zero-initialised score layers, bias-free
bilinear transposed convolutions, crops at 5, 9 and 31 (derived in fcnjax/models/fcn.py). `features` is numbered as
torchvision's vgg16.features, so fcnjax.conversion.vgg.vgg16_features_params reads it unchanged.

Only tests and benchmarks import this module: torch is an optional dependency of fcnjax.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from fcnjax.conversion.vgg import conv_params, vgg16_features_params
from fcnjax.conversion.common import conv_transpose_kernel

# torchvision's cfgs["D"]: channels of each 3x3 conv, "M" for a 2x2 max-pool.
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def upsampling_weight(channels: int, kernel_size: int) -> torch.Tensor:
  """ConvTranspose2d weight (in, out, k, k) that upsamples each channel bilinearly (FCN's surgery.interp)."""
  factor = (kernel_size + 1) // 2
  center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
  filt_1d = 1 - np.abs(np.arange(kernel_size) - center) / factor
  weight = np.zeros((channels, channels, kernel_size, kernel_size), dtype=np.float32)
  weight[np.arange(channels), np.arange(channels)] = np.outer(filt_1d, filt_1d)
  return torch.from_numpy(weight)


def vgg16_features(first_conv_padding: int = 100, ceil_mode: bool = True) -> nn.Sequential:
  layers, in_ch = [], 3
  for item in VGG16_CFG:
    if item == "M":
      layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=ceil_mode))
    else:
      layers += [nn.Conv2d(in_ch, item, 3, padding=first_conv_padding if in_ch == 3 else 1), nn.ReLU(inplace=True)]
      in_ch = item
  return nn.Sequential(*layers)


class FCN8s(nn.Module):
  # Indices in `features` after which pool3 and pool4 are taken (the 3rd and 4th MaxPool2d).
  POOL3, POOL4 = 16, 23

  def __init__(self, num_classes: int = 21):
    super().__init__()
    self.features = vgg16_features()
    self.fc6 = nn.Conv2d(512, 4096, 7)
    self.fc7 = nn.Conv2d(4096, 4096, 1)
    self.drop = nn.Dropout(0.5)
    self.score_fr = nn.Conv2d(4096, num_classes, 1)
    self.score_pool4 = nn.Conv2d(512, num_classes, 1)
    self.score_pool3 = nn.Conv2d(256, num_classes, 1)
    self.upscore2 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, bias=False)
    self.upscore_pool4 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, bias=False)
    self.upscore8 = nn.ConvTranspose2d(num_classes, num_classes, 16, stride=8, bias=False)
    with torch.no_grad():
      for score in (self.score_fr, self.score_pool4, self.score_pool3):
        score.weight.zero_()
        score.bias.zero_()
      for up in (self.upscore2, self.upscore_pool4, self.upscore8):
        up.weight.copy_(upsampling_weight(num_classes, up.kernel_size[0]))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = x
    for index, layer in enumerate(self.features):
      h = layer(h)
      if index == self.POOL3:
        pool3 = h
      elif index == self.POOL4:
        pool4 = h
    h = self.drop(torch.relu(self.fc6(h)))
    h = self.drop(torch.relu(self.fc7(h)))
    h = self.upscore2(self.score_fr(h))
    h = h + _crop(self.score_pool4(pool4), 5, h.shape[2:])
    h = self.upscore_pool4(h)
    h = h + _crop(self.score_pool3(pool3), 9, h.shape[2:])
    return _crop(self.upscore8(h), 31, x.shape[2:])


def _crop(x: torch.Tensor, offset: int, size) -> torch.Tensor:
  return x[:, :, offset:offset + size[0], offset:offset + size[1]]


def to_flax_variables(model: FCN8s) -> dict[str, Any]:
  """The reference's weights as variables of fcnjax.models.fcn.fcn8s(variant='paper') (same layer names)."""
  state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
  params = {"features": vgg16_features_params(state)}
  for name in ("fc6", "fc7", "score_fr", "score_pool4", "score_pool3"):
    params[name] = conv_params(state, f"{name}.")
  for name in ("upscore2", "upscore_pool4", "upscore8"):
    params[name] = {"kernel": conv_transpose_kernel(state[f"{name}.weight"])}
  return {"params": params}
