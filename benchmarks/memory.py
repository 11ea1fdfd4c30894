"""Memory of one training step per model and batch size, and the largest batch that fits a memory budget.

  python benchmarks/memory.py                                  # unet, fcn8s, fcn_resnet50 at batch 1, 2, 4, 8
  python benchmarks/memory.py --models=fcn8s --batch_sizes=8,16 --image_size=512 --dtype=bfloat16
  python benchmarks/memory.py --models=fcn_resnet50 --budget_gb=16    # largest batch whose step fits in 16 GB
  python -m benchmarks.memory --out memory.json                        # the table, and its rows as JSON

Each model is set up as its experiment config sets it up (experiments/pet_unet.py, pet_fcn8s.py,
voc_fcn_resnet50.py: the optimiser's state, the auxiliary head and the loss count too), at the experiment's crop
size unless --image_size says otherwise; --set model.base_width=8 overrides any config key.

Device memory is XLA's own account of the compiled train step (Compiled.memory_analysis(), per device):
arguments (params, optimiser state, batch) + outputs + temporaries (activations kept for the backward pass,
workspace) - aliased bytes (the donated state is updated in place). It is known without running anything, so
the budget search (--budget_gb) compiles candidate batch sizes and never runs out of memory; the figures are those
of the backend the script runs on, so run it on the kind of device you will train on. Where the device reports its
memory (GPU, TPU: Device.memory_stats()), the step is also run and the measured peak is printed next to the
estimate (with --isolate, each row runs in its own process, so that peak is that row's alone).
Host RSS is the process's peak resident memory while the row was built, compiled (and run).
"""
from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import json
import pathlib
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import harness  # noqa: E402  pylint: disable=g-import-not-at-top
from fcnjax import models, optim, parallel, steps  # noqa: E402  pylint: disable=g-import-not-at-top

EXPERIMENTS = {"unet": "pet_unet.py", "fcn8s": "pet_fcn8s.py", "fcn_resnet50": "voc_fcn_resnet50.py",
               "fcn16s": "pet_fcn16s.py", "fcn32s": "pet_fcn32s.py"}
GB = 1024 ** 3
MB = 1024 ** 2


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="unet,fcn8s,fcn_resnet50", help=f"comma-separated, of {sorted(EXPERIMENTS)}")
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


def experiment_config(model_name: str, image_size: int, dtype: str, overrides: list[str]):
  if model_name not in EXPERIMENTS:
    raise SystemExit(f"unknown model {model_name!r}; this benchmark knows {', '.join(sorted(EXPERIMENTS))}")
  path = REPO_ROOT / "experiments" / EXPERIMENTS[model_name]
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.pretrained = ""
  if dtype:
    config.model.dtype = dtype
  for item in overrides:
    key, _, text = item.partition("=")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  size = image_size or config.data.crop_size or config.data.image_size
  return config, int(size)


class TrainStep:
  """The jitted train step of one model config, sharded as fcnjax.train shards it, compiled for abstract inputs."""

  def __init__(self, config, image_size: int):
    self.config, self.image_size = config, image_size
    self.model = models.build_model(config.model)
    self.tx = optim.make_optimizer(config.optim, 1000)
    self.mesh = parallel.make_mesh()
    self.replicated, self.sharded = parallel.replicated(self.mesh), parallel.batch_sharded(self.mesh)
    self.abstract_state = jax.eval_shape(self._make_state, jax.random.PRNGKey(0))
    self.step = jax.jit(
        functools.partial(steps.train_step, loss_config=config.loss,
                          learning_rate_fn=optim.learning_rate_schedule(config.optim, 1000)),
        in_shardings=(self.replicated, self.sharded), out_shardings=(self.replicated, self.replicated),
        donate_argnums=0)

  def _make_state(self, rng):
    variables = steps.init_variables(self.model, rng, (self.image_size, self.image_size, 3))
    return steps.create_train_state(self.model, self.tx, variables, rng)

  def abstract_batch(self, batch_size: int) -> dict:
    hw = (self.image_size, self.image_size)
    return {"image": jax.ShapeDtypeStruct((batch_size, *hw, 3), jnp.float32, sharding=self.sharded),
            "mask": jax.ShapeDtypeStruct((batch_size, *hw), jnp.int32, sharding=self.sharded)}

  def compile(self, batch_size: int):
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated),
                         self.abstract_state)
    return self.step.lower(state, self.abstract_batch(batch_size)).compile()

  def run_once(self, batch_size: int) -> None:
    """Runs one real step (for memory_stats): real arrays, zeros for the batch."""
    state = jax.jit(self._make_state, out_shardings=self.replicated)(jax.random.PRNGKey(0))
    batch = {k: jax.device_put(jnp.zeros(v.shape, v.dtype), self.sharded)
             for k, v in self.abstract_batch(batch_size).items()}
    state, metrics = self.step(state, batch)
    jax.block_until_ready((state, metrics))


def compiled_bytes(compiled) -> dict[str, int]:
  """Per-device bytes of a compiled step; 'total' = arguments + outputs - aliased + temporaries."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    raise RuntimeError("this backend gives no memory analysis of compiled programs")
  parts = {"argument": analysis.argument_size_in_bytes, "output": analysis.output_size_in_bytes,
           "alias": analysis.alias_size_in_bytes, "temp": analysis.temp_size_in_bytes}
  parts["total"] = parts["argument"] + parts["output"] - parts["alias"] + parts["temp"]
  return parts


def peak_rss_bytes() -> int:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def device_peak_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def measure(step: TrainStep, batch_size: int) -> dict:
  reset = harness.reset_peak_rss()
  start = time.perf_counter()
  row = {"model": step.config.model.name, "dtype": step.config.model.dtype, "image_size": step.image_size,
         "batch_size": batch_size, "devices": jax.device_count()}
  row.update({f"{k}_bytes": v for k, v in compiled_bytes(step.compile(batch_size)).items()})
  row["compile_s"] = time.perf_counter() - start
  if device_peak_bytes() is not None:
    step.run_once(batch_size)
    row["device_peak_bytes"] = device_peak_bytes()
  row["host_peak_rss_bytes"] = peak_rss_bytes()
  row["host_peak_is_per_row"] = reset
  return row


def largest_batch(step: TrainStep, budget_bytes: float, log=None, known: dict[int, int] | None = None) -> dict:
  """The largest multiple of the device count whose compiled step needs at most budget_bytes per device.

  Memory grows about linearly in the batch size, so two compiles give a guess; compiles around the guess then
  bracket the answer and bisection settles it (each probe is a compile, nothing is run).
  """
  unit = jax.device_count()
  cache = dict(known or {})  # batch size -> total bytes, from the table's rows

  def need(batch_size: int) -> int:
    if batch_size not in cache:
      cache[batch_size] = compiled_bytes(step.compile(batch_size))["total"]
      if log:
        log(f"  {step.config.model.name} batch {batch_size}: {cache[batch_size] / MB:.1f} MB")
    return cache[batch_size]

  if need(unit) > budget_bytes:
    return {"model": step.config.model.name, "budget_bytes": budget_bytes, "largest_batch": 0,
            "bytes_at_largest": None, "bytes_above": need(unit), "compiles": len(cache)}
  per_unit = max(need(2 * unit) - need(unit), 1)
  guess = unit * max(1, int(1 + (budget_bytes - need(unit)) // per_unit))
  if need(guess) <= budget_bytes:
    low, high = guess, guess + unit
    while need(high) <= budget_bytes:  # the guess was short: step out, doubling
      low, high = high, high + 2 * (high - low)
      high -= high % unit
  else:
    low, high = unit, guess
  while high - low > unit:
    middle = (low + high) // 2
    middle -= middle % unit
    if need(middle) <= budget_bytes:
      low = middle
    else:
      high = middle
  return {"model": step.config.model.name, "budget_bytes": budget_bytes, "largest_batch": low,
          "bytes_at_largest": need(low), "bytes_above": need(low + unit), "compiles": len(cache)}


def _isolated_row(args, model_name: str, batch_size: int) -> dict:
  argv = [sys.executable, __file__, f"--models={model_name}", f"--batch_sizes={batch_size}", "--json",
          f"--image_size={args.image_size}", f"--dtype={args.dtype}", *[f"--set={s}" for s in args.set]]
  result = subprocess.run(argv, capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f"{model_name} batch {batch_size} failed:\n{result.stderr[-2000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
  header = ("model", "dtype", "size", "batch", "params+opt+batch MB", "temp MB", "output MB", "est. total MB",
            "device peak MB", "host peak RSS MB")
  lines = [" | ".join(header), " | ".join("-" * len(h) for h in header)]
  for r in rows:
    peak = r.get("device_peak_bytes")
    lines.append(" | ".join([
        r["model"], r["dtype"], str(r["image_size"]), str(r["batch_size"]), f"{r['argument_bytes'] / MB:.1f}",
        f"{r['temp_bytes'] / MB:.1f}", f"{r['output_bytes'] / MB:.1f}", f"{r['total_bytes'] / MB:.1f}",
        "n/a" if peak is None else f"{peak / MB:.1f}",
        f"{r['host_peak_rss_bytes'] / MB:.0f}" + ("" if r["host_peak_is_per_row"] else " (process)")]))
  return "\n".join(lines)


def main(argv=None) -> int:
  args = parse_args(argv)
  batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
  for b in batch_sizes:
    parallel.check_batch_size(b, "--batch_sizes entry")
  emit = (lambda obj: print(json.dumps(obj), flush=True)) if args.json else None
  log = None if args.json else (lambda text: print(text, file=sys.stderr, flush=True))
  rows, searches = [], []
  for model_name in [m for m in args.models.split(",") if m]:
    config, image_size = experiment_config(model_name, args.image_size, args.dtype, args.set)
    step = TrainStep(config, image_size)
    for batch_size in batch_sizes:
      row = _isolated_row(args, model_name, batch_size) if args.isolate else measure(step, batch_size)
      rows.append(row)
      if emit:
        emit({"kind": "row", **row})
      elif log:
        log(f"{model_name} batch {batch_size}: {row['total_bytes'] / MB:.1f} MB estimated")
    if args.budget_gb:
      known = {r["batch_size"]: r["total_bytes"] for r in rows if r["model"] == config.model.name}
      search = largest_batch(step, args.budget_gb * GB, log, known)
      searches.append(search)
      if emit:
        emit({"kind": "budget", **search})
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"device": jax.devices()[0].device_kind, "devices": jax.device_count(), "rows": rows,
                 "budget_searches": searches}, f, indent=2)
  if not args.json:
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()}); per-device bytes\n")
    print(format_table(rows))
    for s in searches:
      if s["largest_batch"]:
        print(f"\n{s['model']}: largest batch within {s['budget_bytes'] / GB:g} GB per device: {s['largest_batch']} "
              f"({s['bytes_at_largest'] / MB:.1f} MB; {s['largest_batch'] + jax.device_count()} would need "
              f"{s['bytes_above'] / MB:.1f} MB)")
      else:
        print(f"\n{s['model']}: even batch {jax.device_count()} needs {s['bytes_above'] / MB:.1f} MB, over the "
              f"{s['budget_bytes'] / GB:g} GB budget: try --dtype=bfloat16 or a smaller --image_size")
  return 0


if __name__ == "__main__":
  sys.exit(main())
