"""Each part of a convolution on this device, XLA's own against the form fcnjax.ops.conv uses, per layer shape.

    python -m benchmarks.conv_layers [--batch 2] [--repeats 5] [--out runs/bench/conv_layers.json]

For every case: the forward pass, the input gradient and the weight gradient, each jitted and timed alone (median of
--repeats after a warm-up), as lax computes them and as fcnjax.ops.conv does through its own custom VJP, with the
form `conv.cpu_forms` picks: "native" (fcnjax.ops.native's direct C++ kernels), "winograd" (its F(2x2, 3x3)
kernels), "gemm" (patches @ kernel, dy @ kernel^T + col2im), "regions" (one GEMM per tap over the pixels where it
reads the input; in brackets, the time and form the part takes without it), "strips" (the strip-wise weight
gradient), or "=" where fcnjax keeps XLA's. Each of fcnjax's results is checked against XLA's (the last column: the
largest difference relative to XLA's largest value). Shapes: the U-Net's 3x3 layers at 224x224 (64..1024 channels, a
decoder's 128 -> 64), its first layer, ResNet-50's 3x3/2, 7x7/2 and 1x1 layers, fcn_resnet50's classifier conv,
fcn8s's fc6 and fc7, the quickstart U-Net's 16-channel layers at batch 16, and dilated 3x3 layers: fcn_resnet50's
layer4 (rate 4), DeepLabV3's ASPP (rates 12 and 24 at 224x224, 12/24/36 at 520x520), a rate 8 on 1024 channels,
and the mobile DeepLabV3's rate 12 on a 14x14 map. The forms are chosen for CPU: on
other devices both columns run XLA's convolutions. With --out, the rows are written as JSON, keyed by the parts'
names in `cpu_forms` ("forward", "input_grad", "weight_grad").
"""
from __future__ import annotations

import argparse
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import harness
from fcnjax.ops import conv

# (batch or 0 for --batch, size, in, out, kernel, stride, padding, dilation)
CASES = [(0, 224, 3, 64, 3, 1, 1, 1), (0, 224, 64, 64, 3, 1, 1, 1), (0, 224, 128, 64, 3, 1, 1, 1),
         (0, 112, 128, 128, 3, 1, 1, 1), (0, 56, 256, 256, 3, 1, 1, 1), (0, 28, 512, 512, 3, 1, 1, 1),
         (0, 14, 1024, 1024, 3, 1, 1, 1), (0, 112, 128, 128, 3, 2, 1, 1), (0, 224, 3, 64, 7, 2, 3, 1),
         (0, 56, 64, 256, 1, 1, 0, 1), (0, 56, 256, 128, 1, 2, 0, 1), (0, 28, 1024, 2048, 1, 1, 0, 1),
         (0, 28, 2048, 512, 3, 1, 1, 1), (0, 14, 512, 4096, 7, 1, 0, 1), (0, 8, 4096, 4096, 1, 1, 0, 1),
         (16, 64, 16, 16, 3, 1, 1, 1), (16, 64, 32, 16, 3, 1, 1, 1),
         # dilated: fcn_resnet50's layer4, DeepLabV3's ASPP at 224x224 (28x28 maps), a rate 8 (66% of the taps'
         # pixels read the map: near MAX_TAP_REGIONS_LIVE_SHARE), the ASPP at 520x520 (65x65), the mobile ASPP
         (0, 28, 512, 512, 3, 1, 4, 4), (0, 28, 2048, 256, 3, 1, 12, 12), (0, 28, 2048, 256, 3, 1, 24, 24),
         (0, 28, 1024, 256, 3, 1, 8, 8), (0, 65, 2048, 256, 3, 1, 12, 12), (0, 65, 2048, 256, 3, 1, 24, 24),
         (0, 65, 2048, 256, 3, 1, 36, 36), (0, 14, 960, 256, 3, 1, 12, 12)]


def _parts(x, kernel, strides, pads, dilation):
  """{part: (XLA's function, fcnjax.ops.conv's or None where it keeps XLA's, their arguments, fcnjax's form)}."""

  def xla_conv(x, kernel):
    return lax.conv_general_dilated(x, kernel, strides, pads, rhs_dilation=dilation,
                                    dimension_numbers=conv.NHWC_HWIO)

  def fcnjax_conv(x, kernel):
    return conv.conv_general_dilated(x, kernel, strides, pads, rhs_dilation=dilation,
                                     dimension_numbers=conv.NHWC_HWIO)

  dy = jnp.asarray(np.random.default_rng(1).standard_normal(jax.eval_shape(xla_conv, x, kernel).shape), jnp.float32)
  trimmed, trimmed_pads = conv.drop_padding_taps(x.shape[1:3], kernel, strides, pads, dilation)
  forms = conv.cpu_forms(x.shape, trimmed.shape, strides, trimmed_pads, dilation, x.dtype)

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


@contextlib.contextmanager
def tap_regions_off():
  """fcnjax.ops.conv without its "regions" form (its threshold below any share), for functions traced inside."""
  saved = conv.MAX_TAP_REGIONS_LIVE_SHARE
  conv.MAX_TAP_REGIONS_LIVE_SHARE = -1.0
  try:
    yield
  finally:
    conv.MAX_TAP_REGIONS_LIVE_SHARE = saved


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
  print("| batch | size | in -> out | kernel/stride/dilation | forward ms | input grad ms | weight grad ms | "
        "max rel. diff |")
  print("|---|---|---|---|---|---|---|---|")
  for batch, size, cin, cout, k, stride, pad, rate in CASES:
    batch = batch or args.batch
    x = jnp.asarray(rng.standard_normal((batch, size, size, cin)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, cin, cout)), jnp.float32)
    row = dict(batch=batch, size=size, cin=cin, cout=cout, kernel=k, stride=stride, padding=pad, dilation=rate,
               relative_diff=0.0)
    geometry = ((stride, stride), ((pad, pad), (pad, pad)), (rate, rate))
    parts = _parts(x, kernel, *geometry)
    without_regions = {}
    if any(form == "regions" for *_, form in parts.values()):
      with tap_regions_off():
        without_regions = _parts(x, kernel, *geometry)
    cells = []
    for part, (xla, fcnjax, inputs, form) in parts.items():
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
      cell = f"{row[part]['xla_ms']:.1f} / {row[part]['fcnjax_ms']:.1f} {form}"
      if form == "regions":  # what the part takes without the regions form, for the thresholds in ops/conv.py
        _, other, _, other_form = without_regions[part]
        with tap_regions_off():
          other_ms = (row[part]["xla_ms"] if other is None
                      else harness.median_ms(jax.jit(other), *inputs, repeats=args.repeats))
        row[part]["without_regions"] = {"form": other_form, "ms": other_ms}
        cell += f" ({other_ms:.1f} {other_form})"
      cells.append(cell)
    rows.append(row)
    print(f"| {batch} | {size} | {cin} -> {cout} | {k}/{stride}/{rate} | {' | '.join(cells)} | "
          f"{row['relative_diff']:.1e} |",
          flush=True)
  if args.out:
    harness.write_json(args.out, {"device": jax.devices()[0].device_kind, "rows": rows})


if __name__ == "__main__":
  main()
