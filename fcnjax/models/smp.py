"""segmentation_models_pytorch 0.6.0's `Unet` and `DeepLabV3Plus` on its ResNet encoders, NHWC.

smp's ResNet encoders are torchvision's ResNets without avgpool and fc, so the encoder here is fcnjax.models.resnet's
trunk under 'backbone' (ImageNet resnetNN weights converted by conversions/convert_torchvision.py load into it by
path), returning the stem's ReLU output (stride 2) and layer1..layer4 (strides 4..32): smp's features 1..5.

Unet (smp.Unet(encoder, decoder_channels=(256, 128, 64, 32, 16), decoder_attention_type=None)): five decoder blocks,
each resizing its input to the next skip's size ('nearest' by default, F.interpolate(size=) rounding, so any input
size works as in smp), concatenating [input, skip] (no skip in the last block, which resizes to the input's size) and
applying two Conv2dReLU (3x3 conv without bias, BatchNorm, ReLU); then the segmentation head, a 3x3 conv with bias.

DeepLabV3Plus (smp.DeepLabV3Plus(encoder, encoder_output_stride=16)): layer4 dilated as smp's make_dilated does
(every block of the stage, see resnet.stage_plan's stage_dilation), ASPP with depthwise-separable atrous branches
(12, 24, 36), image pooling, 1x1 projection and Dropout(0.5), a separable 3x3 conv, BN, ReLU; x4 bilinear
(align_corners=True) to layer1's size, concatenated with layer1 projected to 48 channels, a separable 3x3 conv, BN,
ReLU; the head is a 1x1 conv with bias and a x4 bilinear (align_corners=True) resize. Inputs need H and W divisible
by the output stride, which smp checks too.

Names follow smp's state_dict (fcnjax.conversion.smp maps them): 'decoder/blocks_0/conv1/{conv,bn}' is smp's
decoder.blocks.0.conv1.{0,1}; DeepLabV3Plus's 'decoder/aspp/{conv_1x1,atrous_0..2,pooling,project}' are
decoder.aspp.0.convs.0..4 and .project, 'decoder/aspp_conv' is decoder.aspp.1-2, 'decoder/block1', 'decoder/block2'
and 'segmentation_head' keep their names. Decoder convolutions start as smp's initialize_decoder draws them
(Kaiming-uniform, fan_in, ReLU gain), the head as initialize_head (Xavier-uniform, zero bias).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fcnjax.models.resnet import ARCHITECTURES, batch_norm, resnet_trunk
from fcnjax.ops import Conv, resize

Array = jax.Array

ENCODERS = {f"resnet{depth}": depth for depth in ARCHITECTURES}
UNET_DECODER_CHANNELS = (256, 128, 64, 32, 16)
INTERPOLATION_MODES = ("nearest", "nearest-exact", "bilinear")
# smp's DeepLabV3Plus output strides: the dilation rate of each stage (layer1..layer4), as its make_dilated sets them.
STAGE_DILATION = {16: (1, 1, 1, 2), 8: (1, 1, 2, 4)}

# torch's kaiming_uniform_(mode='fan_in', nonlinearity='relu'): bound sqrt(6 / fan_in).
decoder_init = nn.initializers.variance_scaling(2.0, "fan_in", "uniform")
head_init = nn.initializers.xavier_uniform()


def _conv(features: int, kernel: int, dtype: Any, name: str, *, dilation: int = 1, groups: int = 1,
          use_bias: bool = False, kernel_init=decoder_init) -> nn.Module:
  """nn.Conv2d(kernel, padding=dilation * (kernel // 2), dilation, groups, bias): the size-keeping convs of smp."""
  pad = dilation * (kernel // 2)
  return Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), kernel_dilation=dilation,
              feature_group_count=groups, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
              kernel_init=kernel_init, name=name)


class Conv2dReLU(nn.Module):
  """smp's Conv2dReLU with use_norm='batchnorm' (and the ASPP's conv/BN/ReLU Sequentials): conv without bias, BN,
  ReLU."""
  features: int
  kernel: int = 3
  dilation: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    x = _conv(self.features, self.kernel, self.dtype, "conv", dilation=self.dilation)(x)
    return nn.relu(batch_norm(train, self.dtype, "bn")(x))


class SeparableConv2dReLU(nn.Module):
  """smp's SeparableConv2d (depthwise 3x3, pointwise 1x1, neither with bias) followed by BN and ReLU."""
  features: int
  dilation: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    channels = x.shape[-1]
    x = _conv(channels, 3, self.dtype, "depthwise", dilation=self.dilation, groups=channels)(x)
    x = _conv(self.features, 1, self.dtype, "pointwise")(x)
    return nn.relu(batch_norm(train, self.dtype, "bn")(x))


def _check_input(model: str, x: Array, in_channels: int) -> None:
  if x.ndim != 4 or x.shape[-1] != in_channels:
    raise ValueError(f"{model}: expected NHWC images with in_channels={in_channels} channels, got shape {x.shape}")


def _encoder_depth(model: str, encoder: str) -> int:
  if encoder not in ENCODERS:
    raise ValueError(f"{model}: encoder={encoder!r}; expected one of {sorted(ENCODERS)}")
  return ENCODERS[encoder]


class UnetDecoderBlock(nn.Module):
  """Resize to `size`, concatenate the skip (when there is one), two Conv2dReLU."""
  features: int
  interpolation: str = "nearest"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, size: tuple[int, int], skip: Array | None, train: bool = False) -> Array:
    # F.interpolate(size=) without align_corners: False for 'bilinear', unused by the nearest modes.
    x = resize(x, size, self.interpolation)
    if skip is not None:
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
    x = Conv2dReLU(self.features, dtype=self.dtype, name="conv1")(x, train)
    return Conv2dReLU(self.features, dtype=self.dtype, name="conv2")(x, train)


class UnetDecoder(nn.Module):
  """smp's UnetDecoder on five encoder features (no center block: that is for VGG encoders only)."""
  decoder_channels: Sequence[int] = UNET_DECODER_CHANNELS
  interpolation: str = "nearest"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[Array], input_size: tuple[int, int], train: bool = False) -> Array:
    """`features`: the encoder's outputs from the finest (stride 2) to the coarsest (stride 32)."""
    x, skips = features[-1], list(features[-2::-1])
    sizes = [skip.shape[1:3] for skip in skips] + [input_size]
    for i, width in enumerate(self.decoder_channels):
      skip = skips[i] if i < len(skips) else None
      x = UnetDecoderBlock(width, self.interpolation, self.dtype, name=f"blocks_{i}")(x, sizes[i], skip, train)
    return x


class SmpUnet(nn.Module):
  """smp.Unet(encoder, encoder_depth=5, decoder_channels, decoder_interpolation, in_channels, classes)."""
  num_classes: int = 1
  encoder: str = "resnet34"
  in_channels: int = 3
  decoder_channels: Sequence[int] = UNET_DECODER_CHANNELS
  decoder_interpolation: str = "nearest"
  dtype: Any = jnp.float32

  def __post_init__(self):
    _encoder_depth("smp_unet", self.encoder)
    if len(self.decoder_channels) != 5:
      raise ValueError(f"smp_unet: decoder_channels needs 5 widths (encoder depth 5), got {self.decoder_channels}")
    if self.decoder_interpolation not in INTERPOLATION_MODES:
      raise ValueError(f"smp_unet: decoder_interpolation={self.decoder_interpolation!r}; expected one of "
                       f"{INTERPOLATION_MODES}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
    _check_input("smp_unet", x, self.in_channels)
    trunk = resnet_trunk(_encoder_depth("smp_unet", self.encoder), dtype=self.dtype, name="backbone")
    features = trunk(x, train)
    features = [features[name] for name in ("stem", "layer1", "layer2", "layer3", "layer4")]
    y = UnetDecoder(tuple(self.decoder_channels), self.decoder_interpolation, self.dtype, name="decoder")(
        features, x.shape[1:3], train)
    logits = _conv(self.num_classes, 3, self.dtype, "segmentation_head", use_bias=True, kernel_init=head_init)(y)
    return {"out": logits}


class ASPPPooling(nn.Module):
  """Global average pool, 1x1 conv, BN, ReLU, bilinear back to the input's size (a constant map)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    if train and x.shape[0] == 1:
      # BatchNorm over one value per channel: torch raises, and the batch variance would be 0.
      raise ValueError("smp_deeplabv3plus: the ASPP pooling branch needs a training batch of at least 2 images "
                       "(BatchNorm over one pooled value per channel), as in smp")
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
    y = Conv2dReLU(self.features, 1, dtype=self.dtype, name="conv")(pooled, train)
    return jnp.broadcast_to(y, (*x.shape[:3], self.features))


class ASPP(nn.Module):
  """smp's ASPP: a 1x1 branch, one atrous branch per rate (separable or plain 3x3), image pooling; concatenated in
  that order, projected by a 1x1 Conv2dReLU, then Dropout."""
  features: int = 256
  atrous_rates: Sequence[int] = (12, 24, 36)
  separable: bool = True
  dropout: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    branches = [Conv2dReLU(self.features, 1, dtype=self.dtype, name="conv_1x1")(x, train)]
    for i, rate in enumerate(self.atrous_rates):
      branch = (SeparableConv2dReLU(self.features, rate, self.dtype, name=f"atrous_{i}") if self.separable
                else Conv2dReLU(self.features, 3, rate, self.dtype, name=f"atrous_{i}"))
      branches.append(branch(x, train))
    branches.append(ASPPPooling(self.features, self.dtype, name="pooling")(x, train))
    y = Conv2dReLU(self.features, 1, dtype=self.dtype, name="project")(jnp.concatenate(branches, axis=-1), train)
    return nn.Dropout(self.dropout, deterministic=not train)(y)


class DeepLabV3PlusDecoder(nn.Module):
  """ASPP on the coarsest features, upsampled to layer1's size and fused with layer1 projected to 48 channels."""
  features: int = 256
  atrous_rates: Sequence[int] = (12, 24, 36)
  separable: bool = True
  dropout: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, deep: Array, high_res: Array, train: bool = False) -> Array:
    aspp = ASPP(self.features, tuple(self.atrous_rates), self.separable, self.dropout, self.dtype, name="aspp")
    y = aspp(deep, train)
    y = SeparableConv2dReLU(self.features, dtype=self.dtype, name="aspp_conv")(y, train)
    # nn.Upsample(scale_factor=4 or 2, align_corners=True): the layer1 size, from an input divisible by the stride.
    y = resize(y, high_res.shape[1:3], "bilinear", align_corners=True)
    # 48 channels for the high-resolution branch, as the DeepLabV3+ paper proposes.
    high_res = Conv2dReLU(48, 1, dtype=self.dtype, name="block1")(high_res, train)
    return SeparableConv2dReLU(self.features, dtype=self.dtype, name="block2")(
        jnp.concatenate([y, high_res.astype(y.dtype)], axis=-1), train)


class SmpDeepLabV3Plus(nn.Module):
  """smp.DeepLabV3Plus(encoder, encoder_output_stride, decoder_channels, decoder_atrous_rates,
  decoder_aspp_separable, decoder_aspp_dropout, in_channels, classes, upsampling=4)."""
  num_classes: int = 1
  encoder: str = "resnet34"
  in_channels: int = 3
  encoder_output_stride: int = 16
  decoder_channels: int = 256
  decoder_atrous_rates: Sequence[int] = (12, 24, 36)
  decoder_aspp_separable: bool = True
  decoder_aspp_dropout: float = 0.5
  dtype: Any = jnp.float32

  def __post_init__(self):
    _encoder_depth("smp_deeplabv3plus", self.encoder)
    if self.encoder_output_stride not in STAGE_DILATION:
      raise ValueError(f"smp_deeplabv3plus: encoder_output_stride={self.encoder_output_stride}; expected 8 or 16, "
                       "as smp")
    if len(self.decoder_atrous_rates) != 3:
      raise ValueError(f"smp_deeplabv3plus: decoder_atrous_rates needs 3 rates, got {self.decoder_atrous_rates}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
    _check_input("smp_deeplabv3plus", x, self.in_channels)
    stride = self.encoder_output_stride
    if x.shape[1] % stride or x.shape[2] % stride:
      raise ValueError(f"smp_deeplabv3plus: input height and width must be divisible by the output stride {stride}, "
                       f"got {x.shape[1]}x{x.shape[2]} (pad the images, as smp asks)")
    depth = _encoder_depth("smp_deeplabv3plus", self.encoder)
    trunk = resnet_trunk(depth, dtype=self.dtype, name="backbone", stage_dilation=STAGE_DILATION[stride])
    features = trunk(x, train)
    y = DeepLabV3PlusDecoder(self.decoder_channels, tuple(self.decoder_atrous_rates), self.decoder_aspp_separable,
                             self.decoder_aspp_dropout, self.dtype, name="decoder")(
        features["layer4"], features["layer1"], train)
    logits = _conv(self.num_classes, 1, self.dtype, "segmentation_head", use_bias=True, kernel_init=head_init)(y)
    # The head's nn.Upsample(scale_factor=4, align_corners=True): from stride 4 back to the input's size.
    return {"out": resize(logits, x.shape[1:3], "bilinear", align_corners=True)}


# The zoo's builders (fcnjax.models.MODELS); options are the fields, `encoder` one of ENCODERS.
smp_unet = SmpUnet
smp_deeplabv3plus = SmpDeepLabV3Plus
