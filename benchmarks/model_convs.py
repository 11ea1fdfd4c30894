"""A model's convolutions, layer by layer, fcnjax's forms against PyTorch's: the convolution part of a train step's
profile.

    python -m benchmarks.model_convs                                  # fcn_resnet50, batch 2, 224x224
    python -m benchmarks.model_convs --model deeplabv3_resnet101 --repeats 9 --out runs/bench/convs.json

The model's forward pass is traced once (jax.eval_shape) with fcnjax.ops.conv's custom VJP recording each
convolution it receives (after drop_padding_taps): its input and kernel shapes, strides, padding and dilation.
Layers of the same geometry are grouped, and each group's three parts (forward, input gradient, weight gradient) are
timed alone -- fcnjax's as the train step runs them (the form `conv.cpu_forms` picks, jitted), PyTorch's as its
autograd does (harness.torch_conv_parts) -- median ms of --repeats, times the group's count. A train step runs every
part of every layer once, except the input gradient of the first layer (its input is the image), which is left out
here too. The rest of a step (BatchNorm, ReLU, the loss, the optimiser) is the step's time less this sum.
Depthwise layers are not in fcnjax.ops.conv's custom VJP; benchmarks/depthwise_layers.py times those.
"""
from __future__ import annotations

import argparse
import collections

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import compare_torch, harness
from fcnjax.ops import conv

PARTS = ("forward", "input_grad", "weight_grad")


def model_convolutions(name: str, batch: int, size: int) -> tuple[list[tuple[tuple, int]], tuple]:
  """[((x shape, kernel shape, strides, pads, dilation), count)] of the model's convolutions in a train-mode forward
  pass, in order of first use, and the first convolution (the one that reads the image)."""
  model = compare_torch.fcnjax_model(name, compare_torch.NUM_CLASSES, "float32")
  x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)
  seen = []
  conv_vjp = conv._conv  # pylint: disable=protected-access

  def recording_conv(x, kernel, strides, pads, dilation, precision):
    seen.append((tuple(x.shape), tuple(kernel.shape), tuple(strides), tuple(pads), tuple(dilation)))
    return conv_vjp(x, kernel, strides, pads, dilation, precision)

  conv._conv = recording_conv  # pylint: disable=protected-access
  try:
    jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                                            rngs={"dropout": jax.random.PRNGKey(0)}), variables, x)
  finally:
    conv._conv = conv_vjp  # pylint: disable=protected-access
  counts = collections.Counter(seen)
  first = seen[0]
  return [(layer, counts[layer]) for layer in dict.fromkeys(seen)], first


def ours_forward(strides, pads, dilation):
  """fcnjax.ops.conv's custom VJP for one layer geometry: the forms a train step runs."""
  return lambda x, kernel: conv._conv(x, kernel, strides, pads, dilation, None)  # pylint: disable=protected-access


def fcnjax_parts(x, kernel, dy, strides, pads, dilation) -> dict:
  fn = ours_forward(strides, pads, dilation)

  return {"forward": (jax.jit(fn), (x, kernel)),
          "input_grad": (jax.jit(lambda dy, k: jax.vjp(lambda x: fn(x, k), x)[1](dy)[0]), (dy, kernel)),
          "weight_grad": (jax.jit(lambda x, dy: jax.vjp(lambda k: fn(x, k), kernel)[1](dy)[0]), (x, dy))}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="fcn_resnet50", choices=compare_torch.ALL_MODELS)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--threads", type=int, default=0,
                      help="CPU threads for both (0: every core this process may use)")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  threads = harness.pin_threads(args.threads)
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  layers, first = model_convolutions(args.model, args.batch, args.size)
  rng = np.random.default_rng(0)
  rows, totals = [], {f"{side}_{part}": 0.0 for side in ("fcnjax", "torch") for part in PARTS}
  print(f"{args.model}, batch {args.batch}, {args.size}x{args.size}, float32, {threads} threads; ms per layer as "
        "fcnjax (its form) / torch, and the count of such layers")
  print("| input | kernel | stride / dilation | count | forward | input grad | weight grad |")
  print("|---|---|---|---|---|---|---|")
  for (x_shape, kernel_shape, strides, pads, dilation), count in layers:
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal(kernel_shape) / np.sqrt(np.prod(kernel_shape[:3])), jnp.float32)
    y_shape = jax.eval_shape(ours_forward(strides, pads, dilation), x, kernel).shape
    dy = jnp.asarray(rng.standard_normal(y_shape), jnp.float32)
    forms = conv.cpu_forms(x_shape, kernel_shape, strides, pads, dilation, jnp.float32)
    ours = fcnjax_parts(x, kernel, dy, strides, pads, dilation)
    theirs = harness.torch_conv_parts(x, kernel, dy, strides, pads, dilation)
    row = {"input": x_shape, "kernel": kernel_shape, "strides": strides, "pads": pads, "dilation": dilation,
           "count": count}
    cells = []
    for part in PARTS:
      if part == "input_grad" and (x_shape, kernel_shape, strides, pads, dilation) == first and count == 1:
        cells.append("-")  # the image's gradient: not computed in a train step
        continue
      fn, inputs = ours[part]
      row[part] = {"form": forms[part], "fcnjax_ms": harness.median_ms(fn, *inputs, repeats=args.repeats),
                   "torch_ms": harness.median_ms(theirs[part], repeats=args.repeats)}
      totals[f"fcnjax_{part}"] += count * row[part]["fcnjax_ms"]
      totals[f"torch_{part}"] += count * row[part]["torch_ms"]
      cells.append(f"{row[part]['fcnjax_ms']:.1f} ({forms[part]}) / {row[part]['torch_ms']:.1f}")
    rows.append(row)
    print(f"| {'x'.join(map(str, x_shape[1:]))} | {'x'.join(map(str, kernel_shape))} | "
          f"{'x'.join(map(str, strides))} / {'x'.join(map(str, dilation))} | {count} | {' | '.join(cells)} |",
          flush=True)
  sums = " | ".join(f"{totals['fcnjax_' + p]:.0f} / {totals['torch_' + p]:.0f}" for p in PARTS)
  print(f"| all convolutions, ms per step | | | {sum(c for _, c in layers)} | {sums} |")
  if args.out:
    harness.write_json(args.out, {"model": args.model, "batch": args.batch, "size": args.size, "threads": threads,
                                  "device": jax.devices()[0].device_kind, "rows": rows, "totals_ms": totals})


if __name__ == "__main__":
  main()
