"""fcnjax.models.unet in plain PyTorch (NCHW), module for module and name for name.

`flax_variables(model)` turns this model's weights into the Flax variables of fcnjax's UNet, so a parity test can
compare the two networks on the same weights. See fcnjax/models/unet.py for the design choices (ceil-mode pooling,
bilinear mode = 1x1 conv then x2 bilinear resize with align_corners=False).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fcnjax.conversion.common import conv_transpose_kernel


class DoubleConv(nn.Module):
  def __init__(self, in_channels: int, out_channels: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(out_channels)
    self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_channels)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    return F.relu(self.bn2(self.conv2(x)))


def pad_or_crop_to(x: torch.Tensor, size) -> torch.Tensor:
  """fcnjax.ops.pad_or_crop_to on NCHW: centre-crop or zero-pad, the odd pixel at the bottom/right."""
  h, w = size
  dh, dw = h - x.shape[2], w - x.shape[3]
  top, left = max(-dh, 0) // 2, max(-dw, 0) // 2
  x = x[:, :, top:top + min(h, x.shape[2]), left:left + min(w, x.shape[3])]
  dh, dw = max(dh, 0), max(dw, 0)
  return F.pad(x, [dw // 2, dw - dw // 2, dh // 2, dh - dh // 2])


class Up(nn.Module):
  def __init__(self, in_channels: int, out_channels: int, upsampling: str = "transpose"):
    super().__init__()
    self.upsampling = upsampling
    if upsampling == "transpose":
      self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
    else:
      self.up = nn.Conv2d(in_channels, out_channels, 1)
    self.conv = DoubleConv(2 * out_channels, out_channels)

  def forward(self, x, skip):
    x = self.up(x)
    if self.upsampling == "bilinear":
      x = F.interpolate(x, size=(2 * x.shape[2], 2 * x.shape[3]), mode="bilinear", align_corners=False)
    x = pad_or_crop_to(x, skip.shape[2:])
    return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
  def __init__(self, num_classes: int = 2, base_width: int = 64, depth: int = 4, upsampling: str = "transpose",
               in_channels: int = 3):
    super().__init__()
    self.depth = depth
    widths = [base_width * 2**i for i in range(depth + 1)]
    self.inc = DoubleConv(in_channels, widths[0])
    for i in range(1, depth + 1):
      setattr(self, f"down{i}", DoubleConv(widths[i - 1], widths[i]))
    for i in range(1, depth + 1):
      setattr(self, f"up{i}", Up(widths[depth - i + 1], widths[depth - i], upsampling))
    self.outc = nn.Conv2d(widths[0], num_classes, 1)

  def forward(self, x):
    x = self.inc(x)
    skips = [x]
    for i in range(1, self.depth + 1):
      x = getattr(self, f"down{i}")(F.max_pool2d(x, 2, 2, ceil_mode=True))
      skips.append(x)
    skips.pop()
    for i in range(1, self.depth + 1):
      x = getattr(self, f"up{i}")(x, skips.pop())
    return self.outc(x)


def flax_variables(model: nn.Module) -> dict:
  """{'params', 'batch_stats'} for the Flax twin of `model`, whose module paths are the torch names split at '.'."""
  params, batch_stats = {}, {}

  def put(tree, name, leaf, value):
    node = tree
    for part in name.split("."):
      node = node.setdefault(part, {})
    if isinstance(value, torch.Tensor):
      value = value.detach().cpu().numpy()
    node[leaf] = np.array(value, dtype=np.float32)

  for name, module in model.named_modules():
    if isinstance(module, nn.ConvTranspose2d):
      put(params, name, "kernel", conv_transpose_kernel(module.weight.detach().numpy()))
    elif isinstance(module, nn.Conv2d):
      put(params, name, "kernel", module.weight.permute(2, 3, 1, 0))
    elif isinstance(module, nn.BatchNorm2d):
      put(params, name, "scale", module.weight)
      put(params, name, "bias", module.bias)
      put(batch_stats, name, "mean", module.running_mean)
      put(batch_stats, name, "var", module.running_var)
      continue
    else:
      continue
    if module.bias is not None:
      put(params, name, "bias", module.bias)
  return {"params": params, "batch_stats": batch_stats}
