"""Cheap ideas for fcnjax's CPU train step, each timed against the unchanged step in interleaved rounds.

  python -m benchmarks.train_step_variants --model unet                       # batch 2, 224x224
  python -m benchmarks.train_step_variants --model fcn_resnet50 --variants baseline,bf16,remat_dots
  python -m benchmarks.train_step_variants --model unet --size 64 --rounds 2  # a quick check of the script

Variants (all but bf16 compute the same function; the script checks it on the first step):
  baseline     steps.train_step as fcnjax ships it (float32, donated state)
  bf16         compute dtype bfloat16 (params, optimiser and loss stay float32)
  convT_gemm   every ConvTranspose as one matmul and an overlap-add (benchmarks/candidates.py) instead of a
               convolution over the stride-dilated input, whose weight gradient XLA:CPU emits as plain loops
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
import time

import numpy as np

from benchmarks import harness

VARIANTS = ("baseline", "bf16", "convT_gemm", "remat_dots", "remat_none")
DEFAULT_VARIANTS = {"unet": "baseline,convT_gemm,bf16,remat_dots", "fcn8s": "baseline,convT_gemm,bf16",
                    "fcn_resnet50": "baseline,bf16,remat_dots"}


def build(variant: str, args, variables):
  """(runner, first-step metrics) for one variant, compiled from the same initial variables."""
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import candidates  # pylint: disable=g-import-not-at-top
  from benchmarks.compare_torch import FcnjaxTrain, fcnjax_model, make_batch  # pylint: disable=g-import-not-at-top
  images, masks = make_batch(args)
  model = fcnjax_model(args.model, args.num_classes, "bfloat16" if variant == "bf16" else "float32")
  apply_fn, patch = None, contextlib.nullcontext()
  if variant == "convT_gemm":
    patch = candidates.gemm_conv_transpose()
  elif variant == "remat_dots":
    apply_fn = candidates.remat_apply(model, jax.checkpoint_policies.dots_saveable)
  elif variant == "remat_none":
    apply_fn = candidates.remat_apply(model, jax.checkpoint_policies.nothing_saveable)
  with patch:  # the patch only matters while the step is traced, i.e. inside the constructor
    runner = FcnjaxTrain(args.model, model, jax.tree.map(np.copy, variables), images, masks, apply_fn=apply_fn)
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
    if v not in VARIANTS:
      p.error(f"--variants: unknown variant {v!r}; expected some of {VARIANTS}")
  if variants[0] != "baseline":
    variants.insert(0, "baseline")
  threads = harness.pin_threads(args.threads)
  import jax  # pylint: disable=g-import-not-at-top
  from fcnjax import steps  # pylint: disable=g-import-not-at-top
  from benchmarks import candidates  # pylint: disable=g-import-not-at-top
  from benchmarks.compare_torch import fcnjax_model  # pylint: disable=g-import-not-at-top
  args.dtype = "float32"
  if "convT_gemm" in variants:
    print(f"convT_gemm vs layers.conv_transpose on small cases: max relative diff {candidates.check_conv_transpose():.1e}")
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
