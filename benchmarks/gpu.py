"""The GPU measurements in one command: the parity tests on the device, then compare_torch for every model in
float32 (TF32 off and on) and in bfloat16 against PyTorch AMP, at 224x224 batch 2 and at 520x520 with the largest
batch that fits, each with its MFU (model FLOPs per second / the GPU's peak for that precision).

  python -m benchmarks.gpu --out runs/gpu                  # on a machine with a GPU (JAX and PyTorch with CUDA)
  python -m benchmarks.gpu --models fcn_resnet50 --precisions bfloat16 --out runs/gpu
  python -m benchmarks.gpu --smoke --out /tmp/gpu          # the same steps on a CPU, shrunk (a few minutes)

Each step runs in a process of its own, with JAX's preallocation of GPU memory off so that PyTorch shares the device:
1. parity: `pytest -m "not slow"` over the model parity tests, JAX on the device at float32 'highest' precision
   (TF32's 10-bit mantissa cannot meet the tests' 1e-4 relative); --smoke only collects them.
2. the batch for each size: 2 at 224; at a larger size the largest batch whose fcnjax train step XLA plans within
   85% of the device's memory (fcnjax.memory.largest_batch, a compile per probe, nothing run) -- PyTorch runs the
   same batch, or fails in its row where it needs more.
3. compare_torch for each precision and size: train step and inference, fcnjax against PyTorch eager and
   torch.compile, with MFU in the '% peak' column; the JSON of each lands in --out.
4. one table over all of them (and --out/summary.md).

--smoke (what the tests run on CPU): U-Net only, at 32x32 for the batch-2 size and 48x48 for the largest-batch one
(within the bytes that batch 2 needs there), one round, no warm-up, no torch.compile and no ONNX Runtime, and the
parity tests collected.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import compare_torch, harness  # noqa: E402 pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> compare_torch flags. float32 at 'highest' is true float32 in both frameworks; 'tf32' lets both use TF32
# tensor cores; bfloat16 is fcnjax's bfloat16 compute (float32 parameters) against torch.autocast(bfloat16).
PRECISIONS = {"float32": ("--precision", "highest"), "tf32": ("--precision", "tf32"),
              "bfloat16": ("--dtype", "bfloat16")}
SIZES = (224, 520)
SMALL_BATCH = 2       # the batch of the first size
MEMORY_FRACTION = 0.85
PARITY_TESTS = ("tests/test_layers.py", "tests/test_vgg_fcn.py", "tests/test_unet.py", "tests/test_resnet.py",
                "tests/test_torchvision_zoo.py", "tests/test_mobilenet_zoo.py", "tests/test_smp_models.py")
# --smoke: U-Net at two sizes; at the larger one the budget is what XLA plans for batch 2, so the search must find 2.
SMOKE = dict(models=["unet"], sizes=[32, 48], batch=2)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="all", help=f"comma-separated subset of {compare_torch.ALL_MODELS}, or 'all'")
  p.add_argument("--precisions", default=",".join(PRECISIONS), help=f"comma-separated subset of {list(PRECISIONS)}")
  p.add_argument("--sizes", default="",
                 help=f"square sizes: the first at batch 2, the others at the largest batch that fits (default "
                      f"{','.join(map(str, SIZES))}; with --smoke {','.join(map(str, SMOKE['sizes']))})")
  p.add_argument("--rounds", type=int, default=3, help="compare_torch's interleaved rounds")
  p.add_argument("--batch", type=int, default=0, help="the batch at the larger sizes instead of the largest")
  p.add_argument("--no_parity", action="store_true", help="skip the parity tests")
  p.add_argument("--smoke", action="store_true", help="the shrunk CPU form (see above)")
  p.add_argument("--out", default="runs/gpu", help="folder for the JSON of each run and summary.md")
  args = p.parse_args(argv)
  args.models = list(compare_torch.ALL_MODELS) if args.models == "all" else [m for m in args.models.split(",") if m]
  args.precisions = [x for x in args.precisions.split(",") if x]
  args.sizes = [int(x) for x in args.sizes.split(",") if x] or list(SMOKE["sizes"] if args.smoke else SIZES)
  for model in args.models:
    if model not in compare_torch.ALL_MODELS:
      p.error(f"--models: unknown model {model!r}; expected some of {compare_torch.ALL_MODELS}")
  for precision in args.precisions:
    if precision not in PRECISIONS:
      p.error(f"--precisions: unknown {precision!r}; expected some of {list(PRECISIONS)}")
  if args.smoke:
    args.models, args.rounds = SMOKE["models"], 1
  return args


def child_env(smoke: bool) -> dict:
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  if not smoke:
    env.setdefault("JAX_PLATFORMS", "cuda")  # a GPU run must not fall back to the CPU unnoticed
  return env


def run(command: list[str], env: dict, log) -> None:
  log("$ " + " ".join(command))
  done = subprocess.run(command, cwd=ROOT, env=env, check=False)
  if done.returncode:
    raise SystemExit(f"benchmarks.gpu: {' '.join(command[:4])} ... exited {done.returncode}")


def parity(args, env: dict, log) -> None:
  command = [sys.executable, "-m", "pytest", "-q", "-m", "not slow", *PARITY_TESTS]
  run(command + (["--collect-only"] if args.smoke else []), dict(env, JAX_DEFAULT_MATMUL_PRECISION="highest"), log)


def device_memory_bytes(smoke: bool) -> int | None:
  """The budget for the largest-batch search: MEMORY_FRACTION of the device's memory (None with --smoke)."""
  if smoke:
    return None
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.local_devices()[0].memory_stats() or {}
  if "bytes_limit" not in stats:
    raise SystemExit(f"benchmarks.gpu: {jax.devices()[0]} reports no memory limit; pass --batch")
  return int(MEMORY_FRACTION * stats["bytes_limit"])


def largest_batch(model: str, dtype: str, size: int, budget_bytes: int | None, log) -> int:
  """The largest batch whose fcnjax train step (SGD momentum, as compare_torch's) XLA plans within budget_bytes
  (None: the bytes of batch SMOKE["batch"])."""
  from fcnjax import config as config_lib, memory  # pylint: disable=g-import-not-at-top
  model_config = compare_torch.fcnjax_model_config(model, compare_torch.NUM_CLASSES, dtype)
  config = config_lib.base_config({k: v for k, v in model_config.items() if k != "dtype"})
  config.model.dtype = dtype
  config.optim.momentum = 0.9
  step = memory.TrainStep(config, size)
  known = {}
  if budget_bytes is None:
    budget_bytes = known[SMOKE["batch"]] = memory.compiled_bytes(step.compile(SMOKE["batch"]))["total"]
  return memory.largest_batch(step, budget_bytes, log=log, known=known)["largest_batch"]


def plan(args, log) -> list[dict]:
  """The compare_torch runs: one per model, precision and size, with its batch."""
  budget = device_memory_bytes(args.smoke) if len(args.sizes) > 1 and not args.batch else 0
  runs, batches = [], {}
  for model in args.models:
    for precision in args.precisions:
      dtype = "bfloat16" if precision == "bfloat16" else "float32"
      for i, size in enumerate(args.sizes):
        if i and not args.batch and (model, dtype, size) not in batches:  # float32 and tf32 plan the same bytes
          batches[model, dtype, size] = largest_batch(model, dtype, size, budget, log)
        batch = SMALL_BATCH if i == 0 else args.batch or batches[model, dtype, size]
        if batch < 1:
          log(f"{model} {precision} {size}x{size}: not even batch 1 fits in {(budget or 0) / 2 ** 30:.1f} GiB; "
              "skipped")
          continue
        runs.append({"model": model, "precision": precision, "size": size, "batch": batch,
                     "out": os.path.join(args.out, f"{model}_{precision}_{size}.json")})
  return runs


def compare(args, entry: dict, env: dict, log) -> None:
  command = [sys.executable, "-m", "benchmarks.compare_torch", "--models", entry["model"],
             *PRECISIONS[entry["precision"]], "--size", str(entry["size"]), "--batch", str(entry["batch"]),
             "--rounds", str(args.rounds), "--no_memory", "--out", entry["out"]]
  if args.smoke:
    command += ["--warmup", "0", "--no_torch_compile", "--no_onnxruntime"]
  run(command, env, log)


def summary(entries: list[dict]) -> str:
  rows = []
  for entry in entries:
    with open(entry["out"]) as f:
      results = json.load(f)["results"]
    for r in results:
      if r["framework"] != "fcnjax":
        continue
      others = {row["framework"]: row for row in results if row["mode"] == r["mode"] and row is not r}
      ratios = {k[len("ratio_vs_"):]: harness.Spread(**v) for k, v in r.items() if k.startswith("ratio_vs_")}

      def mfu(row):
        return "" if not row or row.get("fraction_of_peak") is None else f"{100 * row['fraction_of_peak']:.0f}%"
      rows.append({
          "model": entry["model"], "precision": entry["precision"], "size": entry["size"], "batch": entry["batch"],
          "mode": r["mode"], "fcnjax img/s": harness.Spread(**r["img_per_s"]).short(),
          "vs torch": ratios["torch"].short() if "torch" in ratios else "",
          "vs torch.compile": ratios["torch.compile"].short() if "torch.compile" in ratios else
          (others.get("torch.compile", {}).get("error", "")[:40]),
          "MFU fcnjax / torch": f"{mfu(r)} / {mfu(others.get('torch'))}",
      })
  columns = ["model", "precision", "size", "batch", "mode", "fcnjax img/s", "vs torch", "vs torch.compile",
             "MFU fcnjax / torch"]
  return harness.markdown_table(rows, columns)


def main(argv=None) -> None:
  args = parse_args(argv)
  log = lambda message: print(message, flush=True)
  env = child_env(args.smoke)
  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # this process plans batches; the children measure
  if not args.smoke:
    import jax  # pylint: disable=g-import-not-at-top
    if jax.default_backend() != "gpu":
      raise SystemExit(f"benchmarks.gpu: JAX runs on {jax.default_backend()}, not a GPU; --smoke runs the CPU form")
  start = time.perf_counter()
  os.makedirs(args.out, exist_ok=True)
  if not args.no_parity:
    parity(args, env, log)
  entries = plan(args, log)
  for entry in entries:
    compare(args, entry, env, log)
  table = summary(entries)
  with open(os.path.join(args.out, "summary.md"), "w") as f:
    f.write(table + "\n")
  log(f"\n{len(entries)} runs in {time.perf_counter() - start:.0f} s; fcnjax / other: median (min-max) of per-round "
      f"ratios; MFU: model FLOPs per second / the device's peak for the precision\n{table}")


if __name__ == "__main__":
  main()
