"""The zoo's depthwise convolutions, per layer and part: XLA's grouped convolution, fcnjax.ops.depthwise (the form
fcnjax uses on CPU) and PyTorch's conv2d(groups=channels).

    python -m benchmarks.depthwise_layers [--batch 2] [--repeats 5] [--out runs/bench/depthwise_layers.json]

Layers: every distinct depthwise layer of lraspp_mobilenet_v3_large / deeplabv3_mobilenet_v3_large at 224x224
(MobileNetV3-Large's 3x3 and 5x5 layers, strided, and the last stage's dilation 2 at output stride 16), and
smp DeepLabV3+'s separable convolutions on a resnet34 encoder at 224x224 (the ASPP's rates 12/24/36 on a 14x14 map,
the decoder's 3x3 at 56x56). Each part (forward, input gradient, weight gradient) is jitted alone for XLA and fcnjax
and run alone for PyTorch as its autograd computes it (harness.torch_conv_parts: a gradient without the forward
pass; eager, --threads threads for both); median ms of --repeats after a warm-up. The last column is fcnjax's
largest difference from XLA's, relative to XLA's largest value.
"""
from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import harness
from fcnjax.ops import depthwise, windows

# (size, channels, kernel, stride, dilation); padding keeps the size (torchvision's and smp's).
CASES = [(112, 16, 3, 1, 1), (112, 64, 3, 2, 1), (56, 72, 3, 1, 1), (56, 72, 5, 2, 1), (28, 120, 5, 1, 1),
         (28, 240, 3, 2, 1), (14, 200, 3, 1, 1), (14, 480, 3, 1, 1), (14, 672, 3, 1, 1), (14, 672, 5, 1, 2),
         (14, 960, 5, 1, 2), (14, 512, 3, 1, 12), (14, 512, 3, 1, 24), (14, 512, 3, 1, 36), (56, 304, 3, 1, 1)]


def _jax_parts(conv_fn, x, kernel, dy):
  """{part: (jitted function, its arguments)} for a convolution function of (x, kernel)."""
  forward = jax.jit(conv_fn)
  input_grad = jax.jit(lambda dy, k: jax.vjp(lambda x: conv_fn(x, k), x)[1](dy)[0])
  weight_grad = jax.jit(lambda x, dy: jax.vjp(lambda k: conv_fn(x, k), kernel)[1](dy)[0])
  return {"forward": (forward, (x, kernel)), "input_grad": (input_grad, (dy, kernel)),
          "weight_grad": (weight_grad, (x, dy))}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--threads", type=int, default=0, help="torch threads (0: every core this process may use)")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
  rng = np.random.default_rng(0)
  rows = []
  print(f"{jax.devices()[0].device_kind}, float32, batch {args.batch}; ms as XLA / fcnjax / torch")
  print("| size | channels | kernel/stride/dilation | forward ms | input grad ms | weight grad ms | max rel. diff |")
  print("|---|---|---|---|---|---|---|")
  for size, channels, k, stride, dilation in CASES:
    pad = (k - 1) // 2 * dilation
    strides, pads, dilations = (stride, stride), ((pad, pad), (pad, pad)), (dilation, dilation)
    x = jnp.asarray(rng.standard_normal((args.batch, size, size, channels)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, 1, channels)), jnp.float32)

    def xla_conv(x, kernel):
      return lax.conv_general_dilated(x, kernel, strides, pads, rhs_dilation=dilations,
                                      dimension_numbers=windows.NHWC_HWIO, feature_group_count=channels)

    def taps_conv(x, kernel):
      return depthwise.depthwise_conv(x, kernel, strides, pads, dilations)

    dy = jnp.asarray(rng.standard_normal(jax.eval_shape(xla_conv, x, kernel).shape), jnp.float32)
    xla_parts, taps_parts = _jax_parts(xla_conv, x, kernel, dy), _jax_parts(taps_conv, x, kernel, dy)
    torch_parts = harness.torch_conv_parts(x, kernel, dy, strides, pads, dilations, groups=channels)
    row = dict(size=size, channels=channels, kernel=k, stride=stride, dilation=dilation, relative_diff=0.0)
    cells = []
    for part, (xla_fn, inputs) in xla_parts.items():
      taps_fn = taps_parts[part][0]
      reference, result = np.asarray(xla_fn(*inputs)), np.asarray(taps_fn(*inputs))
      row["relative_diff"] = max(row["relative_diff"],
                                 float(np.max(np.abs(result - reference)) / np.max(np.abs(reference))))
      row[part] = {"xla_ms": harness.median_ms(xla_fn, *inputs, repeats=args.repeats),
                   "fcnjax_ms": harness.median_ms(taps_fn, *inputs, repeats=args.repeats),
                   "torch_ms": harness.median_ms(torch_parts[part], repeats=args.repeats)}
      cells.append("{xla_ms:.2f} / {fcnjax_ms:.2f} / {torch_ms:.2f}".format(**row[part]))
    rows.append(row)
    print(f"| {size} | {channels} | {k}/{stride}/{dilation} | {' | '.join(cells)} | {row['relative_diff']:.1e} |",
          flush=True)
  if args.out:
    harness.write_json(args.out, {"device": jax.devices()[0].device_kind, "batch": args.batch, "rows": rows})


if __name__ == "__main__":
  main()
