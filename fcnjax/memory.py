"""Memory of one training step of a config, and the largest batch whose step fits a memory budget.

  config, size = memory.experiment_config("experiments/pet_unet.py", image_size=256, overrides={"model.depth": 3})
  step = memory.TrainStep(config, size)
  row = memory.measure(step, batch_size=8)              # per-device bytes, compile time, host and device peaks
  search = memory.largest_batch(step, 16 * memory.GB)   # the largest batch whose step needs at most 16 GB

The model is set up as the config sets it up (the optimiser's state, the auxiliary head and the loss count too) and
sharded as fcnjax.training shards it, at the config's crop size unless image_size says otherwise.

Device memory is XLA's own account of the compiled train step (Compiled.memory_analysis(), per device):
arguments (params, optimiser state, batch) + outputs + temporaries (activations kept for the backward pass,
workspace) - aliased bytes (the donated state is updated in place). It is known without running anything, so
largest_batch compiles candidate batch sizes and never runs out of memory; the figures are those of the backend
this process runs on, so measure on the kind of device you will train on. Where the device reports its memory
(GPU, TPU: Device.memory_stats()), measure also runs the step and records the measured peak next to the estimate.
Host RSS is the process's peak resident memory while the row was built, compiled (and run).
"""
from __future__ import annotations

import copy
import os
import resource
import sys
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from fcnjax import config as config_lib
from fcnjax import models, optim, parallel, steps

GB = 1024 ** 3
MB = 1024 ** 2


def experiment_config(config: ml_collections.ConfigDict | str | os.PathLike, image_size: int = 0, dtype: str = "",
                      overrides: Mapping[str, Any] | None = None) -> tuple[ml_collections.ConfigDict, int]:
  """(config, square training size) to measure: `config` (a ConfigDict, left untouched, or a config file's path)
  without pretrained weights, with `dtype` ('' = the config's) and `overrides` applied; the size is image_size,
  else the config's crop size, else its image size."""
  if isinstance(config, (str, os.PathLike)):
    config = config_lib.load_config_file(config)
  else:
    config = copy.deepcopy(config)
  config.model.pretrained = ""
  if dtype:
    config.model.dtype = dtype
  config_lib.apply_overrides(config, overrides or {})
  size = image_size or config.data.crop_size or config.data.image_size
  return config, int(size)


class TrainStep:
  """The jitted train step of one model config, sharded as fcnjax.training shards it, compiled for abstract inputs."""

  def __init__(self, config: ml_collections.ConfigDict, image_size: int):
    self.config, self.image_size = config, image_size
    self.model = models.build_model(config.model)
    self.mesh = parallel.make_mesh()
    self.device_count = self.mesh.size
    self.replicated, self.sharded = parallel.replicated(self.mesh), parallel.batch_sharded(self.mesh)
    self.abstract_state = jax.eval_shape(self._make_state, jax.random.PRNGKey(0))
    self.step = steps.jit_train_step(config, 1000, self.replicated)

  def _make_state(self, rng):
    variables = steps.init_variables(self.model, rng, (self.image_size, self.image_size, 3))
    tx = optim.make_optimizer(self.config.optim, 1000, variables["params"])  # the params: for optim.frozen's mask
    return steps.create_train_state(self.model, tx, variables, rng)

  def abstract_batch(self, batch_size: int) -> dict:
    hw = (self.image_size, self.image_size)
    return {"image": jax.ShapeDtypeStruct((batch_size, *hw, 3), jnp.float32, sharding=self.sharded),
            "mask": jax.ShapeDtypeStruct((batch_size, *hw), jnp.int32, sharding=self.sharded)}

  def compile(self, batch_size: int):
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated),
                         self.abstract_state)
    return self.step.compile(state, self.abstract_batch(batch_size)).compiled

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


def rss_bytes() -> int:
  """Current resident set size of this process (Linux)."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
  """Peak resident set size of this process (VmHWM), since it started or since reset_peak_rss().

  getrusage's ru_maxrss only where /proc is absent: Linux carries it across exec, so a child process would report
  its parent's peak.
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in bytes on macOS, kilobytes elsewhere
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit


def reset_peak_rss() -> bool:
  """Sets VmHWM back to the current RSS (Linux >= 4.0); False where that is not allowed."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def device_peak_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def measure(step: TrainStep, batch_size: int) -> dict:
  """One row: the compiled step's bytes per device at `batch_size`, its compile time, the device's measured peak
  (where it reports one) and the host's peak RSS ('host_peak_is_per_row': whether that peak is this row's alone)."""
  reset = reset_peak_rss()
  start = time.perf_counter()
  row = {"model": step.config.model.name, "dtype": step.config.model.dtype, "image_size": step.image_size,
         "batch_size": batch_size, "devices": step.device_count}
  row.update({f"{k}_bytes": v for k, v in compiled_bytes(step.compile(batch_size)).items()})
  row["compile_s"] = time.perf_counter() - start
  if device_peak_bytes() is not None:
    step.run_once(batch_size)
    row["device_peak_bytes"] = device_peak_bytes()
  row["host_peak_rss_bytes"] = peak_rss_bytes()
  row["host_peak_is_per_row"] = reset
  return row


def largest_batch(step: TrainStep, budget_bytes: float, log: Callable[[str], None] | None = None,
                  known: dict[int, int] | None = None) -> dict:
  """The largest multiple of the device count whose compiled step needs at most budget_bytes per device.

  Memory grows about linearly in the batch size, so two compiles give a guess; compiles around the guess then
  bracket the answer and bisection settles it (each probe is a compile, nothing is run). `known` maps batch sizes
  already measured to their total bytes.
  """
  unit = step.device_count
  cache = dict(known or {})

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

