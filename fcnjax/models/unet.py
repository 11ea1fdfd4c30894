"""U-Net (Ronneberger et al., 2015) with BatchNorm, NHWC, for any input size.

Layout and names follow milesial/Pytorch-UNet, the common PyTorch U-Net: `inc` (a DoubleConv at full resolution),
`down1..downD` (2x2 max-pool then DoubleConv, widths base_width * 2**i), `up1..upD` (up-sample, align with the skip,
concatenate [skip, up], DoubleConv) and `outc` (1x1 conv to num_classes). With the defaults the widths are the
paper's 64, 128, 256, 512, 1024. tests/torch_reference/unet.py is the same network in PyTorch, for parity tests.

Choices that differ from the paper or from milesial, and why:
- 3x3 convs pad by 1 (the paper's are unpadded, which shrinks the output and needs overlap-tile inference), convs
  feeding a BatchNorm have no bias (the BatchNorm's shift replaces it), as in milesial.
- Pooling uses ceil_mode=True, so every input size works, down to 1x1: an odd map keeps its last row/column as a
  window of one pixel, and the up-sampled map (then one pixel larger than the skip) is cropped back with
  pad_or_crop_to, which keeps its top-left pixels, exactly those the skip's pixels pooled into. milesial floors
  instead (drops the last row at each pooling and zero-pads it back after up-sampling; 1x1 inputs fail there). At
  sizes divisible by 2**depth both are the same network.
- upsampling='transpose' (default) is the paper's 2x2 "up-convolution": ConvTranspose(k=2, s=2) halving the channels.
- upsampling='bilinear' is a 1x1 conv halving the channels followed by a x2 bilinear resize (align_corners=False).
  A k=2, s=2 transposed conv is four 1x1 convs, one per output phase; this variant shares one 1x1 conv across the
  phases and interpolates smoothly instead (no checkerboard). The 1x1 conv runs BEFORE the resize because the two
  commute (both linear, the interpolation weights sum to 1) and the low-resolution side is 4x cheaper. Widths are the
  same in both modes, so they differ only in how they up-sample. milesial's bilinear variant uses align_corners=True
  and halves the bottleneck instead; align_corners=False keeps the pixel-centre geometry of the pooling (output pixel
  j samples input (j + 0.5) / 2 - 0.5, as the transposed conv's phases do) and is PyTorch's default.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcnjax.ops import Conv
from fcnjax.ops import BatchNorm, ConvTranspose, max_pool, pad_or_crop_to, resize

Array = jax.Array

UPSAMPLING_MODES = ("transpose", "bilinear")


class DoubleConv(nn.Module):
  """(3x3 conv, padding 1, no bias -> BatchNorm -> ReLU) x 2."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    for i in (1, 2):
      x = Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype,
               param_dtype=jnp.float32, name=f"conv{i}")(x)
      # PyTorch's BatchNorm2d defaults and statistics (fcnjax.ops.BatchNorm).
      x = BatchNorm(use_running_average=not train, momentum=0.1, epsilon=1e-5, dtype=self.dtype, name=f"bn{i}")(x)
      x = nn.relu(x)
    return x


class Up(nn.Module):
  """Up-sample x2 to `features` channels, align with the skip, concatenate [skip, up], DoubleConv."""
  features: int
  upsampling: str = "transpose"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, skip: Array, train: bool = False) -> Array:
    if self.upsampling == "transpose":
      x = ConvTranspose(self.features, kernel_size=2, strides=2, dtype=self.dtype, name="up")(x)
    else:  # "bilinear" (UNet checks the mode)
      x = Conv(self.features, (1, 1), dtype=self.dtype, param_dtype=jnp.float32, name="up")(x)
      x = resize(x, (2 * x.shape[1], 2 * x.shape[2]), "bilinear", align_corners=False)
    x = pad_or_crop_to(x, skip.shape[1:3])
    x = jnp.concatenate([skip, x.astype(skip.dtype)], axis=-1)
    return DoubleConv(self.features, dtype=self.dtype, name="conv")(x, train)


class UNet(nn.Module):
  num_classes: int = 2
  base_width: int = 64
  depth: int = 4
  upsampling: str = "transpose"
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.num_classes < 1 or self.base_width < 1 or self.depth < 0:
      raise ValueError(f"unet: need num_classes >= 1, base_width >= 1 and depth >= 0, got "
                       f"num_classes={self.num_classes}, base_width={self.base_width}, depth={self.depth}")
    if self.upsampling not in UPSAMPLING_MODES:
      raise ValueError(f"unet: upsampling={self.upsampling!r}; expected one of {UPSAMPLING_MODES}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
    x = x.astype(self.dtype)
    widths = [self.base_width * 2**i for i in range(self.depth + 1)]
    x = DoubleConv(widths[0], dtype=self.dtype, name="inc")(x, train)
    skips = [x]
    for i in range(1, self.depth + 1):
      x = max_pool(x, 2, 2, ceil_mode=True)
      x = DoubleConv(widths[i], dtype=self.dtype, name=f"down{i}")(x, train)
      skips.append(x)
    skips.pop()  # the bottleneck is not a skip
    for i in range(1, self.depth + 1):
      x = Up(widths[self.depth - i], self.upsampling, dtype=self.dtype, name=f"up{i}")(x, skips.pop(), train)
    # num_classes=1 gives one logit per pixel for a sigmoid (binary segmentation).
    logits = Conv(self.num_classes, (1, 1), dtype=self.dtype, param_dtype=jnp.float32, name="outc")(x)
    return {"out": logits}


unet = UNet  # the zoo's builder (fcnjax.models.MODELS)
