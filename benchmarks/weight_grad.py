"""XLA's own convolution weight gradient against fcnjax.conv's strip-wise one, per layer shape, on this device.

    python -m benchmarks.weight_grad [--batch 2] [--out runs/bench/weight_grad.json]

Each case times d(loss)/d(kernel) alone (jitted, median of --repeats after a warm-up) both ways, and the forward
convolution for scale, and checks that the two gradients agree. Shapes: the 3x3 convolutions of the U-Net at
224x224 (64..1024 channels, and a decoder's 128 -> 64), its first layer, and ResNet-50's 3x3/2 and 7x7/2.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fcnjax import conv

# (size, in, out, kernel, stride)
CASES = [(224, 3, 64, 3, 1), (224, 64, 64, 3, 1), (224, 128, 64, 3, 1), (112, 128, 128, 3, 1), (56, 256, 256, 3, 1),
         (28, 512, 512, 3, 1), (14, 1024, 1024, 3, 1), (112, 128, 128, 3, 2), (224, 3, 64, 7, 2)]


def _median_ms(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  rows = []
  print(f"{jax.devices()[0].device_kind}, batch {args.batch}, float32")
  print("| size | in -> out | kernel/stride | forward ms | XLA d_kernel ms | strips d_kernel ms | speed-up "
        "| rel. diff |")
  print("|---|---|---|---|---|---|---|---|")
  for size, cin, cout, k, stride in CASES:
    pad = ((k // 2, k // 2),) * 2
    x = jnp.asarray(rng.standard_normal((args.batch, size, size, cin)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, cin, cout)), jnp.float32)

    def forward(x, kernel):
      return lax.conv_general_dilated(x, kernel, (stride, stride), pad, dimension_numbers=conv.NHWC)

    dy = jnp.asarray(rng.standard_normal(jax.eval_shape(forward, x, kernel).shape), jnp.float32)
    xla = jax.jit(lambda x, dy: jax.vjp(lambda k: forward(x, k), kernel)[1](dy)[0])
    strips = jax.jit(lambda x, dy: conv.weight_grad_by_strips(x, dy, kernel.shape, (stride, stride), pad, (1, 1)))
    reference, ours = np.asarray(xla(x, dy)), np.asarray(strips(x, dy))
    row = dict(size=size, cin=cin, cout=cout, kernel=k, stride=stride,
               forward_ms=_median_ms(jax.jit(forward), x, kernel, repeats=args.repeats),
               xla_ms=_median_ms(xla, x, dy, repeats=args.repeats),
               strips_ms=_median_ms(strips, x, dy, repeats=args.repeats),
               relative_diff=float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference))))
    rows.append(row)
    print(f"| {size} | {cin} -> {cout} | {k}/{stride} | {row['forward_ms']:.1f} | {row['xla_ms']:.1f} | "
          f"{row['strips_ms']:.1f} | {row['xla_ms'] / row['strips_ms']:.2f}x | {row['relative_diff']:.1e} |",
          flush=True)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "batch": args.batch, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
