"""Each part of a convolution on this device, XLA's own against the form fcnjax.ops.conv uses, per layer shape.

    python -m benchmarks.conv_layers [--batch 2] [--repeats 5] [--out runs/bench/conv_layers.json]

For every case: the forward pass, the input gradient and the weight gradient, each jitted and timed alone (median of
--repeats after a warm-up), as lax computes them and as fcnjax.ops.conv does through its own custom VJP, with the
form `conv.cpu_forms` picks: "native" (fcnjax.ops.native's direct C++ kernels), "winograd" (its F(2x2, 3x3)
kernels), "gemm" (patches @ kernel, dy @ kernel^T + col2im), "strips" (the strip-wise weight gradient), or "="
where fcnjax keeps XLA's. Each of fcnjax's results is checked against XLA's (the last column: the largest
difference relative to XLA's largest value). Shapes: the U-Net's 3x3 layers at 224x224 (64..1024 channels, a
decoder's 128 -> 64), its first layer, ResNet-50's 3x3/2, 7x7/2 and 1x1 layers, fcn_resnet50's classifier conv,
fcn8s's fc6 and fc7, and the quickstart U-Net's 16-channel layers at batch 16. The forms are chosen for CPU: on
other devices both columns run XLA's convolutions. With --out, the rows are written as JSON, keyed by the parts'
names in `cpu_forms` ("forward", "input_grad", "weight_grad").
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import harness
from fcnjax.ops import conv

# (batch or 0 for --batch, size, in, out, kernel, stride, padding)
CASES = [(0, 224, 3, 64, 3, 1, 1), (0, 224, 64, 64, 3, 1, 1), (0, 224, 128, 64, 3, 1, 1), (0, 112, 128, 128, 3, 1, 1),
         (0, 56, 256, 256, 3, 1, 1), (0, 28, 512, 512, 3, 1, 1), (0, 14, 1024, 1024, 3, 1, 1),
         (0, 112, 128, 128, 3, 2, 1), (0, 224, 3, 64, 7, 2, 3), (0, 56, 64, 256, 1, 1, 0), (0, 56, 256, 128, 1, 2, 0),
         (0, 28, 1024, 2048, 1, 1, 0), (0, 28, 2048, 512, 3, 1, 1), (0, 14, 512, 4096, 7, 1, 0),
         (0, 8, 4096, 4096, 1, 1, 0), (16, 64, 16, 16, 3, 1, 1), (16, 64, 32, 16, 3, 1, 1)]


def _parts(x, kernel, strides, pads):
  """{part: (XLA's function, fcnjax.ops.conv's or None where it keeps XLA's, their arguments, fcnjax's form)}."""
  dilation = (1, 1)

  def xla_conv(x, kernel):
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=conv.NHWC_HWIO)

  def fcnjax_conv(x, kernel):
    return conv.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=conv.NHWC_HWIO)

  dy = jnp.asarray(np.random.default_rng(1).standard_normal(jax.eval_shape(xla_conv, x, kernel).shape), jnp.float32)
  forms = conv.cpu_forms(x.shape, kernel.shape, strides, pads, dilation, x.dtype)

  def input_grad(conv_fn):
    return lambda dy, k: jax.vjp(lambda x: conv_fn(x, k), x)[1](dy)[0]

  def weight_grad(conv_fn):
    return lambda x, dy: jax.vjp(lambda k: conv_fn(x, k), kernel)[1](dy)[0]

  # fcnjax's parts are the custom VJP's own: the vjp with respect to one operand compiles only that gradient.
  parts = {
      "forward": (xla_conv, fcnjax_conv, (x, kernel)),
      "input_grad": (input_grad(xla_conv), input_grad(fcnjax_conv), (dy, kernel)),
      "weight_grad": (weight_grad(xla_conv), weight_grad(fcnjax_conv), (x, dy)),
  }
  return {part: (xla, None if forms[part] == "xla" else fcnjax, inputs, forms[part])
          for part, (xla, fcnjax, inputs) in parts.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  rows = []
  print(f"{jax.devices()[0].device_kind}, float32; ms as XLA / fcnjax.ops.conv and its form (= where fcnjax keeps "
        "XLA's)")
  print("| batch | size | in -> out | kernel/stride | forward ms | input grad ms | weight grad ms | max rel. diff |")
  print("|---|---|---|---|---|---|---|---|")
  for batch, size, cin, cout, k, stride, pad in CASES:
    batch = batch or args.batch
    x = jnp.asarray(rng.standard_normal((batch, size, size, cin)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, cin, cout)), jnp.float32)
    row = dict(batch=batch, size=size, cin=cin, cout=cout, kernel=k, stride=stride, padding=pad, relative_diff=0.0)
    cells = []
    for part, (xla, fcnjax, inputs, form) in _parts(x, kernel, (stride, stride), ((pad, pad), (pad, pad))).items():
      xla = jax.jit(xla)
      row[part] = {"xla_ms": harness.median_ms(xla, *inputs, repeats=args.repeats), "form": form}
      if fcnjax is None:
        cells.append(f"{row[part]['xla_ms']:.1f} / =")
        continue
      fcnjax = jax.jit(fcnjax)
      reference, result = np.asarray(xla(*inputs)), np.asarray(fcnjax(*inputs))
      row["relative_diff"] = max(row["relative_diff"],
                                 float(np.max(np.abs(result - reference)) / np.max(np.abs(reference))))
      row[part]["fcnjax_ms"] = harness.median_ms(fcnjax, *inputs, repeats=args.repeats)
      cells.append(f"{row[part]['xla_ms']:.1f} / {row[part]['fcnjax_ms']:.1f} {form}")
    rows.append(row)
    print(f"| {batch} | {size} | {cin} -> {cout} | {k}/{stride} | {' | '.join(cells)} | {row['relative_diff']:.1e} |",
          flush=True)
  if args.out:
    harness.write_json(args.out, {"device": jax.devices()[0].device_kind, "rows": rows})


if __name__ == "__main__":
  main()
