"""Memory of one training step per model and batch size, and the largest batch that fits a memory budget.

  python -m benchmarks.memory                                  # unet, fcn8s, fcn_resnet50 at batch 1, 2, 4, 8
  python -m benchmarks.memory --models=fcn8s --batch_sizes=8,16 --image_size=512 --dtype=bfloat16
  python -m benchmarks.memory --models=fcn_resnet50 --budget_gb=16    # largest batch whose step fits in 16 GB
  python -m benchmarks.memory --out memory.json                        # the table, and its rows as JSON

Each model is set up by its experiment config (MODEL_CONFIGS: experiments/pet_unet.py, pet_fcn8s.py,
voc_fcn_resnet50.py, ...), at the experiment's crop size unless --image_size says otherwise; --set
model.base_width=8 overrides any config key. With --isolate, each row runs in its own process, so that the device
and host peaks are that row's alone. The figures are those of fcnjax.memory (below).
"""
from __future__ import annotations

import argparse
import ast
import json
import pathlib
import subprocess
import sys

import jax

from fcnjax import memory, parallel

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"
MODEL_CONFIGS = {"unet": "pet_unet.py", "fcn8s": "pet_fcn8s.py", "fcn_resnet50": "voc_fcn_resnet50.py",
                 "fcn16s": "pet_fcn16s.py", "fcn32s": "pet_fcn32s.py"}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=f"{__doc__}\nfcnjax.memory: {memory.__doc__}",
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="unet,fcn8s,fcn_resnet50",
                      help=f"comma-separated, of {sorted(MODEL_CONFIGS)}")
  parser.add_argument("--batch_sizes", default="1,2,4,8", help="global batch sizes (over all local devices)")
  parser.add_argument("--image_size", type=int, default=0, help="square training crop; 0 = the experiment's")
  parser.add_argument("--dtype", default="", help="model compute dtype (float32, bfloat16); '' = the experiment's")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. model.base_width=8 (Python literal values)")
  parser.add_argument("--budget_gb", type=float, default=0.0,
                      help="also search, per model, the largest batch whose compiled step fits this many GB per device")
  parser.add_argument("--isolate", action="store_true", help="measure each row in a fresh process")
  parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
  parser.add_argument("--out", default="", help="also write the rows and budget searches to this JSON file")
  return parser.parse_args(argv)


def parse_overrides(items: list[str]) -> dict:
  """['model.base_width=8', 'model.dtype=bfloat16'] -> {'model.base_width': 8, 'model.dtype': 'bfloat16'}."""
  overrides = {}
  for item in items:
    key, _, text = item.partition("=")
    try:
      overrides[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      overrides[key] = text
  return overrides


def config_path(model_name: str) -> pathlib.Path:
  if model_name not in MODEL_CONFIGS:
    raise SystemExit(f"unknown model {model_name!r}; this benchmark knows {', '.join(sorted(MODEL_CONFIGS))}")
  return EXPERIMENTS / MODEL_CONFIGS[model_name]


def _isolated_row(args, model_name: str, batch_size: int) -> dict:
  argv = [sys.executable, __file__, f"--models={model_name}", f"--batch_sizes={batch_size}", "--json",
          f"--image_size={args.image_size}", f"--dtype={args.dtype}", *[f"--set={s}" for s in args.set]]
  result = subprocess.run(argv, capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f"{model_name} batch {batch_size} failed:\n{result.stderr[-2000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def describe_search(search: dict) -> str:
  unit = jax.device_count()
  if search["largest_batch"]:
    return (f"{search['model']}: largest batch within {search['budget_bytes'] / memory.GB:g} GB per device: "
            f"{search['largest_batch']} ({search['bytes_at_largest'] / memory.MB:.1f} MB; "
            f"{search['largest_batch'] + unit} would need {search['bytes_above'] / memory.MB:.1f} MB)")
  return (f"{search['model']}: even batch {unit} needs {search['bytes_above'] / memory.MB:.1f} MB, over the "
          f"{search['budget_bytes'] / memory.GB:g} GB budget: try --dtype=bfloat16 or a smaller --image_size")


def main(argv=None) -> int:
  args = parse_args(argv)
  batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
  for b in batch_sizes:
    parallel.check_batch_size(b, "--batch_sizes entry")
  overrides = parse_overrides(args.set)
  emit = (lambda obj: print(json.dumps(obj), flush=True)) if args.json else None
  log = None if args.json else (lambda text: print(text, file=sys.stderr, flush=True))
  rows, searches = [], []
  for model_name in [m for m in args.models.split(",") if m]:
    try:
      config, image_size = memory.experiment_config(config_path(model_name), args.image_size, args.dtype, overrides)
    except KeyError as error:
      raise SystemExit(f"--set: {error.args[0]}") from None
    step = memory.TrainStep(config, image_size)
    for batch_size in batch_sizes:
      row = _isolated_row(args, model_name, batch_size) if args.isolate else memory.measure(step, batch_size)
      rows.append(row)
      if emit:
        emit({"kind": "row", **row})
      elif log:
        log(f"{model_name} batch {batch_size}: {row['total_bytes'] / memory.MB:.1f} MB estimated")
    if args.budget_gb:
      known = {r["batch_size"]: r["total_bytes"] for r in rows if r["model"] == config.model.name}
      search = memory.largest_batch(step, args.budget_gb * memory.GB, log, known)
      searches.append(search)
      if emit:
        emit({"kind": "budget", **search})
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "devices": jax.device_count(), "rows": rows,
                 "budget_searches": searches}, f, indent=2)
  if not args.json:
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}); per-device bytes\n")
    print(memory.format_table(rows))
    for search in searches:
      print(f"\n{describe_search(search)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
