"""What the benchmark scripts share: thread pinning, interleaved timing, robust statistics, device peaks, tables
(host memory: fcnjax.memory).

Timing is interleaved: with contenders A and B, round 1 times A then B, round 2 B then A, and so on. Other load on
a shared machine then slows both about equally within a round, and the median over rounds (with its min/max and
quartiles) says how much the numbers moved. The ratio of two contenders is the median of the per-round ratios,
which cancels slow drifts that a ratio of two medians would not.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import statistics
import time
from typing import Callable, Mapping, Sequence

# --------------------------------------------------------------------------------------------------------------------
# Threads


def pin_threads(threads: int | None) -> int:
  """Restricts this process to the first `threads` CPUs it may run on and returns the count it will use.

  XLA:CPU sizes its Eigen thread pool by the affinity mask when its backend starts (the first jax computation),
  so this must run before any; PyTorch's intra-op pool is set separately with torch.set_num_threads by the caller.
  """
  available = sorted(os.sched_getaffinity(0))
  if not threads or threads >= len(available):
    return len(available)
  if threads < 1:
    raise ValueError(f"--threads={threads} must be >= 1")
  os.sched_setaffinity(0, set(available[:threads]))
  return threads


# --------------------------------------------------------------------------------------------------------------------
# Statistics and interleaving


@dataclasses.dataclass
class Spread:
  median: float
  q1: float
  q3: float
  min: float
  max: float
  values: list[float]

  @classmethod
  def of(cls, values: Sequence[float]) -> "Spread":
    values = [float(v) for v in values]
    if not values:
      raise ValueError("Spread.of: no values")
    ordered = sorted(values)
    if len(values) >= 2:
      q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
      q1 = q3 = ordered[0]
    return cls(statistics.median(ordered), q1, q3, ordered[0], ordered[-1], values)

  def short(self, fmt: str = "{:.2f}") -> str:
    """'median (min-max)'."""
    return f"{fmt.format(self.median)} ({fmt.format(self.min)}-{fmt.format(self.max)})"


def interleave(contenders: Mapping[str, Callable[[int], float]], *, rounds: int, steps: int,
               items_per_step: int, log: Callable[[str], None] = print) -> dict[str, list[float]]:
  """Items per second of each contender in each round.

  `contenders[name](n)` runs n steps, waits for them to finish and returns the elapsed seconds. Rounds alternate the
  order (A B, B A, ...) so that neither contender always runs right after the other.
  """
  if rounds < 1 or steps < 1:
    raise ValueError(f"rounds={rounds} and steps={steps} must both be >= 1")
  names = list(contenders)
  rates = {name: [] for name in names}
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      seconds = contenders[name](steps)
      rates[name].append(items_per_step * steps / seconds)
    log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {rates[n][-1]:.2f}/s" for n in names))
  return rates


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> Spread:
  """Per-round ratios of two interleaved series."""
  return Spread.of([a / b for a, b in zip(numerator, denominator)])


def timed(fn: Callable[[], object]) -> tuple[object, float]:
  start = time.perf_counter()
  result = fn()
  return result, time.perf_counter() - start


def median_ms(fn: Callable[..., object], *args, repeats: int) -> float:
  """Median milliseconds of fn(*args) over `repeats` calls after one warm-up call; jax results are waited for."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def torch_conv_parts(x, kernel, dy, strides, pads, dilation, groups: int = 1) -> dict[str, Callable[[], object]]:
  """PyTorch's three parts of a convolution of NHWC x with an HWIO kernel (numpy), for dy of the output: the forward
  pass, and the input and weight gradients alone as autograd computes them (aten.convolution_backward with one
  output each, no forward pass). Asymmetric padding is applied to x beforehand (torch pads symmetrically)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  (top, bottom), (left, right) = pads
  xt = torch.tensor(np.transpose(np.asarray(x), (0, 3, 1, 2)))
  if (top, left) != (bottom, right):
    xt = torch.nn.functional.pad(xt, (left, right, top, bottom))
    top = left = 0
  kt = torch.tensor(np.transpose(np.asarray(kernel), (3, 2, 0, 1)))
  dyt = torch.tensor(np.transpose(np.asarray(dy), (0, 3, 1, 2)))

  def backward(mask):
    return torch.ops.aten.convolution_backward(dyt, xt, kt, None, list(strides), [top, left], list(dilation), False,
                                               [0, 0], groups, mask)

  def forward():
    with torch.no_grad():
      return torch.nn.functional.conv2d(xt, kt, stride=strides, padding=(top, left), dilation=dilation,
                                        groups=groups)

  return {"forward": forward, "input_grad": lambda: backward([True, False, False])[0],
          "weight_grad": lambda: backward([False, True, False])[1]}


# --------------------------------------------------------------------------------------------------------------------
# Device peaks

# Dense (no sparsity) peak TFLOP/s by device-name fragment: (fp32 on CUDA cores, tf32 tensor cores, bf16 tensor
# cores), from NVIDIA's data sheets. Checked in this order, so 'H100 PCIe' wins over 'H100' and 'A100' over 'A10'.
GPU_PEAK_TFLOPS = (
    ("H200", (67.0, 494.7, 989.4)),
    ("H100 PCIe", (51.2, 378.0, 756.0)),
    ("H100", (67.0, 494.7, 989.4)),          # SXM ('NVIDIA H100 80GB HBM3')
    ("A100", (19.5, 156.0, 312.0)),
    ("L40S", (91.6, 183.0, 362.1)),
    ("L4", (30.3, 60.0, 121.0)),
    ("A10", (31.2, 62.5, 125.0)),
    ("V100", (15.7, None, 125.0)),           # fp16 tensor cores; no tf32/bf16
    ("T4", (8.1, None, 65.0)),
    ("RTX 4090", (82.6, 82.6, 165.2)),
)


def as_the_reference_computes(model):
  """The model with every pixel the reference network computes: the FCN models' trunk without its band of
  padding-only pixels cut (`cut_band`), so that FLOP counts are the network's own, as PyTorch spends them."""
  return model.clone(cut_band=False) if hasattr(model, "cut_band") else model


@dataclasses.dataclass
class Peak:
  gflops: float | None
  assumption: str


def _cpuinfo() -> dict[str, str]:
  info = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if ":" in line:
          key, value = (s.strip() for s in line.split(":", 1))
          info.setdefault(key, value)
  except OSError:
    pass
  return info


def cpu_fp32_flops_per_cycle(info: Mapping[str, str]) -> tuple[int, str]:
  """fp32 FLOP per cycle per core from the vector ISA: lanes x 2 (FMA) x FMA pipes."""
  flags = set(info.get("flags", "").split())
  vendor = info.get("vendor_id", "")
  family = int(info.get("cpu family", "0") or 0)
  if "avx512f" in flags:
    if vendor == "AuthenticAMD" and family == 0x19:
      return 32, "AVX-512 on Zen 4, which runs 512-bit FMAs as two 256-bit halves: 2 x 8 lanes x 2"
    if vendor == "AuthenticAMD":
      return 64, f"AVX-512 on AMD family {family:#x} (Zen 5 or later: two full-width 512-bit FMA pipes): 2 x 16 x 2"
    return 64, "AVX-512 with two FMA units per core (Xeon Gold/Platinum; Silver/Bronze have one: half this)"
  if "fma" in flags and "avx2" in flags:
    return 32, "AVX2 with two 256-bit FMA units: 2 x 8 lanes x 2"
  if "avx" in flags:
    return 16, "AVX without FMA: one 8-lane add and one 8-lane multiply per cycle"
  return 8, "SSE: 4-lane add and multiply per cycle"


def cpu_peak(threads: int, ghz: float | None = None) -> Peak:
  """Peak fp32 GFLOP/s of `threads` cores: cores x clock x FLOP/cycle. The clock is /proc/cpuinfo's 'cpu MHz' (the
  nominal clock in a VM; turbo can be higher and all-core AVX-512 clocks lower) unless `ghz` is given."""
  info = _cpuinfo()
  per_cycle, why = cpu_fp32_flops_per_cycle(info)
  if ghz is None:
    mhz = float(info.get("cpu MHz", "0") or 0)
    ghz = mhz / 1000 if mhz else None
  name = info.get("model name", platform.processor() or "CPU")
  if not ghz:
    return Peak(None, f"{name}: clock unknown (pass --cpu_ghz)")
  gflops = threads * ghz * per_cycle
  return Peak(gflops, f"{name}: {threads} cores x {ghz:.2f} GHz x {per_cycle} fp32 FLOP/cycle ({why}) "
                      f"= {gflops:.0f} GFLOP/s")


def gemm_gflops(size: int = 2048, repeats: int = 10) -> Peak:
  """The fp32 GFLOP/s one square GEMM reaches on the threads PyTorch was given (oneDNN / MKL, best of `repeats`
  after 3 untimed): what the cores deliver to the best-tuned dense kernel at their clock under load, beside
  `cpu_peak`'s nominal figure."""
  import torch  # pylint: disable=g-import-not-at-top
  a = torch.randn(size, size)
  b = torch.randn(size, size)
  for _ in range(3):
    torch.mm(a, b)
  best = min(timed(lambda: torch.mm(a, b))[1] for _ in range(repeats))
  gflops = 2 * size ** 3 / best / 1e9
  return Peak(gflops, f"torch.mm {size}x{size}x{size} fp32 on {torch.get_num_threads()} threads: "
                      f"{gflops:.0f} GFLOP/s (best of {repeats})")


def gpu_peak(device_name: str, dtype: str, tf32: bool = True) -> Peak:
  """Peak for `dtype` compute: float32 convolutions run on TF32 tensor cores by default in both frameworks (XLA's
  default precision, torch.backends.cudnn.allow_tf32=True), so float32 is measured against the TF32 peak unless
  `tf32` is False (precision 'highest': the CUDA cores' fp32 peak)."""
  for fragment, (fp32, tf32_peak, bf16) in GPU_PEAK_TFLOPS:
    if fragment.lower() in device_name.lower():
      if dtype == "bfloat16":
        return Peak(bf16 * 1e3, f"{device_name}: dense bf16 tensor-core peak {bf16} TFLOP/s")
      if tf32_peak is None or not tf32:
        return Peak(fp32 * 1e3, f"{device_name}: fp32 peak {fp32} TFLOP/s ({'TF32 off' if tf32_peak else 'no TF32'})")
      return Peak(tf32_peak * 1e3,
                  f"{device_name}: dense TF32 tensor-core peak {tf32_peak} TFLOP/s (fp32 CUDA cores: {fp32})")
  return Peak(None, f"{device_name}: not in benchmarks/harness.py GPU_PEAK_TFLOPS")


# --------------------------------------------------------------------------------------------------------------------
# Output


def markdown_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
  return "\n".join(lines)


def write_json(path: str, payload: object) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=2, default=_jsonable)
    f.write("\n")


def _jsonable(value):
  if dataclasses.is_dataclass(value):
    return dataclasses.asdict(value)
  if hasattr(value, "tolist"):
    return value.tolist()
  return str(value)


def fmt_mb(num_bytes: float | None) -> str:
  return "" if num_bytes is None else f"{num_bytes / 2**20:.0f}"


def sanitize(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
