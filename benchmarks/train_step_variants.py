"""Cheap ideas for fcnjax's CPU train step, each timed against the unchanged step in interleaved rounds.

  python -m benchmarks.train_step_variants --model unet                       # batch 2, 224x224
  python -m benchmarks.train_step_variants --model fcn_resnet50 --variants baseline,dot_1x1,remat_dots
  python -m benchmarks.train_step_variants --model unet --size 64 --rounds 2  # a quick check of the script

Variants (all but bf16 compute the same function; the script checks it on the first step):
  baseline     steps.train_step as fcnjax ships it (float32, donated state)
  bf16         compute dtype bfloat16 (params, optimiser and loss stay float32)
  convT_gemm   ConvTranspose layers whose kernel equals their stride (U-Net's up-convolutions) as one matmul and a
               reshape (benchmarks/candidates.py) instead of a convolution over the stride-dilated input, whose
               weight gradient XLA:CPU emits as plain loops
  convT_gemm_all  every ConvTranspose as a matmul and an overlap-add (FCN's k = 2s upsampling layers too)
  dot_1x1      every 1x1 convolution as an einsum (a matmul), whose weight gradient is then a matmul over N*H*W
               instead of a convolution over (C, H, W, N)-transposed activations
  im2col_large stride-1 VALID convolutions with kernels of 5x5 and more (FCN's fc6) as patches @ kernel
  explicit_pad padding wider than the kernel (FCN's conv1_1, pad 100) by jnp.pad before a VALID convolution
  a+b          several rewrites at once, e.g. convT_gemm+dot_1x1 (see benchmarks/candidates.py)
  remat_dots   the forward pass under jax.checkpoint(policy=dots_saveable): convolution outputs are saved, BatchNorm
               and ReLU are recomputed in the backward pass (less memory traffic, a little more arithmetic)
  remat_none   jax.checkpoint saving nothing (everything recomputed; the memory floor, for reference)

Each variant is compiled once and all take turns (A B C, C B A, ...). Reported: img/s median (min-max), the per-round
ratio to the baseline, compile time, XLA's planned memory, and how far the variant's first-step loss and gradient
norm are from the baseline's (the same initial state and batch).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time

import numpy as np

if __package__ in (None, ""):  # run as a file (python benchmarks/train_step_variants.py): make `benchmarks` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402 pylint: disable=g-import-not-at-top

# A variant is 'baseline', 'bf16', 'remat_dots', 'remat_none', or '+'-joined rewrites: 'convT_gemm(_all)' and those in
# candidates.CONV_REWRITES ('dot_1x1', 'im2col_large', 'explicit_pad').
VARIANTS = ("baseline", "bf16", "remat_dots", "remat_none", "convT_gemm", "convT_gemm_all", "dot_1x1", "im2col_large",
            "explicit_pad")
DEFAULT_VARIANTS = {
    "unet": "baseline,convT_gemm,convT_gemm+dot_1x1,bf16",
    "fcn8s": "baseline,convT_gemm_all,im2col_large,dot_1x1+im2col_large+explicit_pad",
    "fcn_resnet50": "baseline,dot_1x1,bf16",
}


def build(variant: str, args, variables):
  """(runner, first-step metrics) for one variant, compiled from the same initial variables."""
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import candidates  # pylint: disable=g-import-not-at-top
  from benchmarks.compare_torch import FcnjaxTrain, fcnjax_model, make_batch  # pylint: disable=g-import-not-at-top
  images, masks = make_batch(args)
  model = fcnjax_model(args.model, args.num_classes, "bfloat16" if variant == "bf16" else "float32")
  apply_fn = None
  parts = variant.split("+")
  patches = contextlib.ExitStack()
  if "convT_gemm" in parts or "convT_gemm_all" in parts:
    patches.enter_context(candidates.gemm_conv_transpose(disjoint_only="convT_gemm_all" not in parts))
  rewrites = [r for r in parts if r in candidates.CONV_REWRITES]
  if rewrites:
    patches.enter_context(candidates.rewritten_convs(rewrites))
  if variant == "remat_dots":
    apply_fn = candidates.remat_apply(model, jax.checkpoint_policies.dots_saveable)
  elif variant == "remat_none":
    apply_fn = candidates.remat_apply(model, jax.checkpoint_policies.nothing_saveable)
  with patches:  # patches only matter while the step is traced, i.e. inside the constructor
    runner = FcnjaxTrain(model, jax.tree.map(np.copy, variables), images, masks, apply_fn=apply_fn)
  first = {k: float(runner.metrics[k]) for k in ("loss", "grad_norm")}
  return runner, first


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="unet", choices=("fcn8s", "unet", "fcn_resnet50"))
  p.add_argument("--variants", default="", help=f"comma-separated subset of {VARIANTS} (default: per model)")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--num_classes", type=int, default=21)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=1, help="timed steps per variant per round")
  p.add_argument("--threads", type=int, default=0)
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  variants = [v for v in (args.variants or DEFAULT_VARIANTS[args.model]).split(",") if v]
  for v in variants:
    if any(part not in VARIANTS for part in v.split("+")):
      p.error(f"--variants: unknown variant {v!r}; expected some of {VARIANTS} or rewrites joined by '+'")
  if variants[0] != "baseline":
    variants.insert(0, "baseline")
  threads = harness.pin_threads(args.threads)
  import jax  # pylint: disable=g-import-not-at-top
  from fcnjax import steps  # pylint: disable=g-import-not-at-top
  from benchmarks import candidates  # pylint: disable=g-import-not-at-top
  from benchmarks.compare_torch import fcnjax_model  # pylint: disable=g-import-not-at-top
  args.dtype = "float32"
  if any("convT_gemm" in v for v in variants):
    worst = candidates.check_conv_transpose()
    print(f"convT_gemm vs layers.conv_transpose on small cases: max relative diff {worst:.1e}")
  if any(r in v for v in variants for r in candidates.CONV_REWRITES):
    print(f"conv rewrites vs lax on small cases: max relative diff {candidates.check_conv_rewrites():.1e}")
  model = fcnjax_model(args.model, args.num_classes, "float32")
  variables = jax.tree.map(np.asarray, steps.init_variables(model, jax.random.PRNGKey(0), (args.size, args.size, 3)))
  start = time.perf_counter()
  runners, first = {}, {}
  for v in variants:
    print(f"{v}: compiling", flush=True)
    runners[v], first[v] = build(v, args, variables)
  rates = harness.interleave(runners, rounds=args.rounds, steps=args.steps, items_per_step=args.batch,
                             log=lambda s: print(s, flush=True))
  rows, results = [], []
  for v in variants:
    spread = harness.Spread.of(rates[v])
    speedup = harness.ratio(rates[v], rates["baseline"])
    info = runners[v].info
    loss_diff = abs(first[v]["loss"] - first["baseline"]["loss"])
    norm_diff = abs(first[v]["grad_norm"] - first["baseline"]["grad_norm"]) / max(first["baseline"]["grad_norm"], 1e-12)
    results.append({"variant": v, "img_per_s": dataclasses.asdict(spread), "vs_baseline": dataclasses.asdict(speedup),
                    "compile_s": info.compile_s, "memory_bytes": info.memory_bytes, "flops": info.flops,
                    "first_step": first[v], "loss_abs_diff": loss_diff, "grad_norm_rel_diff": norm_diff})
    rows.append({"variant": v, "img/s median (min-max)": spread.short(), "vs baseline": speedup.short("{:.3f}"),
                 "compile s": f"{info.compile_s:.1f}", "planned MiB": harness.fmt_mb(info.memory_bytes),
                 "GFLOP/step": f"{info.flops / 1e9:.1f}" if info.flops else "",
                 "first-step loss diff": f"{loss_diff:.1e}", "grad-norm rel diff": f"{norm_diff:.1e}"})
  print(f"\n{args.model}: batch {args.batch}, {args.size}x{args.size}, {threads} threads, {args.rounds} rounds x "
        f"{args.steps} steps, {time.perf_counter() - start:.0f} s in all")
  print(harness.markdown_table(rows, ["variant", "img/s median (min-max)", "vs baseline", "compile s", "planned MiB",
                                      "GFLOP/step", "first-step loss diff", "grad-norm rel diff"]))
  if args.out:
    harness.write_json(args.out, {"args": vars(args), "results": results})


if __name__ == "__main__":
  main()
