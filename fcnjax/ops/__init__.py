"""PyTorch-exact building blocks on NHWC arrays, and the CPU convolution forms behind `Conv` (README.md here).

Models use only what this package exports; which form computes a convolution on which backend is decided inside
`conv` and `native`, never by a model.
"""
from fcnjax.ops.batch_norm import BatchNorm
from fcnjax.ops.conv import Conv
from fcnjax.ops.conv_transpose import ConvTranspose, bilinear_upsample_init, conv_transpose
from fcnjax.ops.crop import center_crop, conv_output_size, crop, pad_or_crop_to
from fcnjax.ops.pooling import max_pool
from fcnjax.ops.portable import portable_forms
from fcnjax.ops.resize import interpolation_matrix, resize, resize_bilinear_to_sizes

__all__ = ["BatchNorm", "Conv", "ConvTranspose", "bilinear_upsample_init", "center_crop", "conv_output_size",
           "conv_transpose", "crop", "interpolation_matrix", "max_pool", "pad_or_crop_to",
           "portable_forms", "resize", "resize_bilinear_to_sizes"]
