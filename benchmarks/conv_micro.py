"""Single convolutions of fcnjax's models, forward and each gradient apart, XLA against PyTorch on the same shapes.

  python -m benchmarks.conv_micro                    # U-Net and FCN-ResNet50 layers at batch 2, 224x224 input
  python -m benchmarks.conv_micro --only transpose   # just the transposed convolutions

Why: a train step is a forward convolution, an input-gradient and a weight-gradient convolution per layer, and on
XLA:CPU the three do not cost the same. Timing them one by one says which one to work on.

conv cases time, per layer: fwd (y = conv(x, w)), d_input (the vjp's x-cotangent alone) and d_weight (the
w-cotangent alone), for XLA with NHWC/HWIO dimension numbers (fcnjax's) and with NCHW/OIHW ones, for d_weight also
as k*k matmuls of shifted input windows ("shifted dots"), and for PyTorch (aten.convolution_backward with one output
mask at a time) in NCHW and channels_last; 1x1 layers also as an einsum ("xla einsum", the dot_1x1 candidate).
transpose cases time ConvTranspose layers, forward and forward+backward (both cotangents), as fcnjax.layers'
dilated-input convolution, as benchmarks/candidates.conv_transpose_gemm (one matmul + overlap-add), and in PyTorch.
Contenders of one op take turns in rounds; times are medians in ms.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import numpy as np

if __package__ in (None, ""):  # run as a file (python benchmarks/conv_micro.py): make `benchmarks` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402 pylint: disable=g-import-not-at-top

# (label, n, h, w, c_in, c_out, k, stride, dilation) -- 3x3 / 1x1 convolutions at batch 2 and a 224x224 input.
CONV_CASES = (
    ("unet inc/conv2", 2, 224, 224, 64, 64, 3, 1, 1),
    ("unet down2/conv2", 2, 56, 56, 256, 256, 3, 1, 1),
    ("unet down4/conv2", 2, 14, 14, 1024, 1024, 3, 1, 1),
    ("resnet layer1 conv1 (1x1)", 2, 56, 56, 256, 64, 1, 1, 1),
    ("resnet layer4 conv2 (dil 4)", 2, 28, 28, 512, 512, 3, 1, 4),
)
# (label, n, h, w, c_in, c_out, k, stride) -- torch ConvTranspose2d(c_in, c_out, k, stride), no padding.
TRANSPOSE_CASES = (
    ("unet up1 (k2 s2)", 2, 14, 14, 1024, 512, 2, 2),
    ("unet up4 (k2 s2)", 2, 112, 112, 128, 64, 2, 2),
    ("fcn8s upscore8 (k16 s8)", 2, 38, 38, 21, 21, 16, 8),
)


def _jax_conv_fns(k: int, dilation: int, layout: str):
  import jax  # pylint: disable=g-import-not-at-top
  pad = dilation * (k - 1) // 2
  dims = ("NHWC", "HWIO", "NHWC") if layout == "NHWC" else ("NCHW", "OIHW", "NCHW")

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((pad, pad), (pad, pad)), rhs_dilation=(dilation, dilation),
                                        dimension_numbers=dims)

  def d_input(x, w, g):
    return jax.vjp(conv, x, w)[1](g)[0]

  def d_weight(x, w, g):
    return jax.vjp(conv, x, w)[1](g)[1]

  return {"fwd": jax.jit(conv), "d_input": jax.jit(d_input), "d_weight": jax.jit(d_weight)}


def _einsum_1x1_fns():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  def conv(x, w):
    return jnp.einsum("nhwc,cd->nhwd", x, w[0, 0])

  return {"fwd": jax.jit(conv), "d_input": jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g)[0]),
          "d_weight": jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g)[1])}


def shifted_dots_d_weight(k: int, dilation: int):
  """NHWC weight gradient as k*k matmuls of shifted input windows with the output gradient, channels innermost
  in both operands (XLA's own form puts the batch, 2 here, innermost)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  pad = dilation * (k - 1) // 2

  def d_weight(x, w, g):
    del w
    _, h, width, _ = g.shape
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    taps = [[jnp.einsum("nhwc,nhwd->cd", xp[:, i * dilation:i * dilation + h, j * dilation:j * dilation + width], g)
             for j in range(k)] for i in range(k)]
    return jnp.stack([jnp.stack(row) for row in taps])

  return jax.jit(d_weight)


def _runner_jax(fn, *operands):
  import jax  # pylint: disable=g-import-not-at-top
  compiled = fn.lower(*operands).compile()
  flops = (compiled.cost_analysis() or {}).get("flops")
  jax.block_until_ready(compiled(*operands))

  def run(n):
    start = time.perf_counter()
    out = None
    for _ in range(n):
      out = compiled(*operands)
    jax.block_until_ready(out)
    return time.perf_counter() - start

  return run, flops


def _runner_torch(fn):
  fn()

  def run(n):
    start = time.perf_counter()
    for _ in range(n):
      fn()
    return time.perf_counter() - start

  return run


def conv_case(case, args, log) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  label, n, h, w, c_in, c_out, k, stride, dilation = case
  del stride
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n, h, w, c_in), np.float32)
  kernel = rng.standard_normal((k, k, c_in, c_out), np.float32) * 0.05
  g = rng.standard_normal((n, h, w, c_out), np.float32)
  operands = {"NHWC": tuple(jax.device_put(a) for a in (x, kernel, g)),
              "NCHW": tuple(jax.device_put(a) for a in (x.transpose(0, 3, 1, 2), kernel.transpose(3, 2, 0, 1),
                                                         g.transpose(0, 3, 1, 2)))}
  pad = dilation * (k - 1) // 2
  rows = []
  for op in ("fwd", "d_input", "d_weight"):
    contenders, flops = {}, None
    for layout in ("NHWC", "NCHW"):
      fn = _jax_conv_fns(k, dilation, layout)[op]
      ops = operands[layout][:2] if op == "fwd" else operands[layout]
      contenders[f"xla {layout}"], f = _runner_jax(fn, *ops)
      flops = flops or f
    if k == 1:  # benchmarks/candidates.rewritten_conv dot_1x1: the same layer as an einsum
      contenders["xla einsum"], _ = _runner_jax(_einsum_1x1_fns()[op], *operands["NHWC"][:2 if op == "fwd" else 3])
    check = None
    if op == "d_weight" and k > 1:
      shifted = shifted_dots_d_weight(k, dilation)
      contenders["xla shifted dots"], _ = _runner_jax(shifted, *operands["NHWC"])
      ref = np.asarray(_jax_conv_fns(k, dilation, "NHWC")["d_weight"](*operands["NHWC"]))
      check = float(np.max(np.abs(np.asarray(shifted(*operands["NHWC"])) - ref)) / np.max(np.abs(ref)))
    for fmt in ("NCHW", "channels_last"):
      memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
      tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=memory_format)
      tw = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()).contiguous(memory_format=memory_format)
      tg = torch.from_numpy(g.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=memory_format)
      if op == "fwd":
        fn = functools.partial(torch.nn.functional.conv2d, tx, tw, None, 1, pad, dilation)
      else:
        mask = [op == "d_input", op == "d_weight", False]
        fn = functools.partial(torch.ops.aten.convolution_backward, tg, tx, tw, None, [1, 1], [pad, pad],
                               [dilation, dilation], False, [0, 0], 1, mask)
      contenders[f"torch {fmt}"] = _runner_torch(torch.no_grad()(fn))
    log(f"{label} {op}")
    rates = harness.interleave(contenders, rounds=args.rounds, steps=args.steps, items_per_step=1, log=lambda s: None)
    row = {"case": label, "op": op, "GFLOP": flops / 1e9 if flops else None}
    for name, r in rates.items():
      row[name] = 1e3 / harness.Spread.of(r).median
    row["shifted dots rel diff"] = check
    rows.append(row)
  return rows


def transpose_case(case, args, log) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import candidates  # pylint: disable=g-import-not-at-top
  from fcnjax import layers  # pylint: disable=g-import-not-at-top
  label, n, h, w, c_in, c_out, k, stride = case
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n, h, w, c_in), np.float32)
  weight = rng.standard_normal((c_in, c_out, k, k), np.float32) * 0.05  # torch layout
  kernel = layers.torch_conv_transpose_weight_to_flax(weight)
  out_h, out_w = (h - 1) * stride + k, (w - 1) * stride + k
  g = rng.standard_normal((n, out_h, out_w, c_out), np.float32)
  xs, ks, gs = (jax.device_put(a) for a in (x, kernel, g))
  rows, check = [], None
  for op in ("fwd", "fwd+bwd"):
    contenders, flops = {}, None
    implementations = (("xla dilated conv", layers.conv_transpose), ("xla gemm+col2im", candidates.conv_transpose_gemm))
    for name, impl in implementations:
      forward = functools.partial(impl, stride=stride)
      if op == "fwd":
        fn, operands = jax.jit(forward), (xs, ks)
      else:
        fn = jax.jit(lambda x, k, g, forward=forward: jax.vjp(forward, x, k)[1](g))
        operands = (xs, ks, gs)
      contenders[name], f = _runner_jax(fn, *operands)
      flops = flops or f  # the dilated convolution's count: useful multiply-adds only
    layer = torch.nn.ConvTranspose2d(c_in, c_out, k, stride, bias=False)
    with torch.no_grad():
      layer.weight.copy_(torch.from_numpy(weight))
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    tg = torch.from_numpy(g.transpose(0, 3, 1, 2).copy())
    if op == "fwd":
      fn = torch.no_grad()(functools.partial(layer, tx))
    else:
      tx.requires_grad_(True)

      def fn(layer=layer, tx=tx, tg=tg):
        layer.weight.grad = tx.grad = None
        layer(tx).backward(tg)
    contenders["torch"] = _runner_torch(fn)
    if op == "fwd":
      ref = np.asarray(layers.conv_transpose(xs, ks, stride=stride))
      ours = np.asarray(candidates.conv_transpose_gemm(xs, ks, stride=stride))
      check = float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
    log(f"{label} {op}")
    rates = harness.interleave(contenders, rounds=args.rounds, steps=args.steps, items_per_step=1, log=lambda s: None)
    row = {"case": label, "op": op, "GFLOP": flops / 1e9 if flops else None}
    for name, r in rates.items():
      row[name] = 1e3 / harness.Spread.of(r).median
    row["gemm rel diff"] = check if op == "fwd" else None
    rows.append(row)
  return rows


def _table(rows: list[dict]) -> str:
  columns = list(dict.fromkeys(c for r in rows for c in r))
  columns = [c for c in columns if "diff" not in c] + [c for c in columns if "diff" in c]

  def fmt(column, value):
    if value is None:
      return ""
    if isinstance(value, float):
      return f"{value:.1e}" if "diff" in column else f"{value:.2f}"
    return value

  return harness.markdown_table([{c: fmt(c, v) for c, v in r.items()} for r in rows], columns)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--only", choices=("conv", "transpose"), default=None)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--threads", type=int, default=0)
  p.add_argument("--scale", type=float, default=1.0, help="multiply every spatial size (e.g. 0.25 for a quick check)")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  threads = harness.pin_threads(args.threads)
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  log = functools.partial(print, flush=True)

  def scaled(case, first_spatial=2):
    case = list(case)
    for i in (first_spatial, first_spatial + 1):
      case[i] = max(1, round(case[i] * args.scale))
    return tuple(case)

  start = time.perf_counter()
  result = {}
  if args.only in (None, "conv"):
    result["conv"] = [row for case in CONV_CASES for row in conv_case(scaled(case), args, log)]
  if args.only in (None, "transpose"):
    result["transpose"] = [row for case in TRANSPOSE_CASES for row in transpose_case(scaled(case), args, log)]
  print(f"\n{threads} threads, {args.rounds} rounds x {args.steps} steps, median ms per call, "
        f"{time.perf_counter() - start:.0f} s in all")
  for kind, rows in result.items():
    print(f"\n{kind}\n{_table(rows)}")
  if args.out:
    harness.write_json(args.out, result)


if __name__ == "__main__":
  main()
