"""Where the time of fcnjax's train step goes: a jax.profiler trace of a few steps, joined with the optimised HLO.

  python -m benchmarks.profile_step --model unet --batch 2 --size 224 --steps 2
  python -m benchmarks.profile_step --model fcn_resnet50 --hlo_out runs/profile/fcn_resnet50.hlo.txt

XLA:CPU records one trace event per executed thunk, named after its HLO instruction. Each instruction is classified
from the optimised HLO (compiled.as_text()):
- conv fwd / conv d_input / conv d_weight: convolutions (or fusions holding one) of the forward pass, of the backward
  pass producing an activation gradient, and of the backward pass producing a kernel-shaped gradient. XLA rewrites a
  weight gradient as a convolution whose window is the whole output-gradient map and drops its metadata, so it is
  recognised by its shape: an output with the same dimensions as one of the model's kernels.
- "loop-emitted" marks convolutions XLA:CPU cannot hand to Eigen/oneDNN/XNNPACK (e.g. base- or window-dilated
  convolutions in non-canonical layouts): it emits them as plain loops, parallelised only over outer dimensions
  (their backend_config carries outer_dimension_partitions).
- "YNNPACK" marks ops XLA:CPU hands to YNNPACK (kCustom fusions named ynn_fusion).
- dot (matmuls, e.g. layers.resize's einsums); layout (transpose/copy/reverse/pad...), split into kernel-shaped
  copies (a fixed cost per step: XLA flips and io-swaps every kernel for the input-gradient convolutions) and
  activation-shaped ones; reduce (BatchNorm statistics, the loss, max-pool gradients); elementwise (other fusions).
Times are summed over the executing threads and divided by the number of profiled steps: with thunks running in
parallel the total can exceed the step's wall time, which is printed next to it. Caveat: XLA:CPU runs some plain
dots asynchronously, and their events then time the launch, not the work (a 6.6 GFLOP dot_general of fcnjax.conv's
weight gradient showed 5 ms): the "dot" row can be far too low, and only the wall time is a reliable total.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import math
import os
import re
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as a file (python benchmarks/profile_step.py): make `benchmarks` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402 pylint: disable=g-import-not-at-top

CATEGORIES = ("conv fwd", "conv d_input", "conv d_weight", "dot", "layout (kernel)", "layout (activation)", "reduce",
              "elementwise", "other")


@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  shape: str
  text: str
  op_name: str = ""
  calls: str = ""


_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+) = (?P<shape>.+?) (?P<opcode>[a-z][\w\-]*)\((?P<rest>.*)$")
# XLA:CPU's ParallelTaskAssigner splits the outer loops of ops it emits itself; library calls get none.
_LOOP_EMITTED = re.compile(r'outer_dimension_partitions":\["')
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")


def parse_hlo(text: str) -> tuple[dict[str, Instruction], dict[str, list[Instruction]]]:
  """Instructions by name, and the instructions of each computation (for looking inside fusions)."""
  instructions, computations, current = {}, collections.defaultdict(list), None
  for line in text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      rest = m["rest"]
      op_name = re.search(r'op_name="([^"]*)"', rest)
      calls = re.search(r"calls=%?([\w.\-]+)", rest)
      inst = Instruction(m["name"], m["opcode"], m["shape"], line.strip(), op_name[1] if op_name else "",
                         calls[1] if calls else "")
      instructions[inst.name] = inst
      if current:
        computations[current].append(inst)
      continue
    m = _COMPUTATION.match(line)
    if m and "=" not in line.split("{")[0]:
      current = m["name"]
  return instructions, computations


def _dims(shape: str) -> tuple[int, ...]:
  m = re.search(r"\[([\d,]*)\]", shape)
  return tuple(int(d) for d in m[1].split(",") if d) if m else ()


def _inner(inst: Instruction, computations) -> list[Instruction]:
  """The instruction itself, or the instructions of the computation it calls (fusions, custom fusions)."""
  return computations.get(inst.calls, []) if inst.calls else [inst]


def classify(inst: Instruction, computations, kernel_shapes: set) -> tuple[str, str]:
  """(category, note) of one executed instruction."""
  inner = _inner(inst, computations) or [inst]
  opcodes = {i.opcode for i in inner}
  backward = "transpose(" in " ".join(i.op_name for i in inner) + " " + inst.op_name
  note = ""
  conv = next((i for i in inner if i.opcode == "convolution"), None)
  if conv is not None:
    if _LOOP_EMITTED.search(conv.text) or _LOOP_EMITTED.search(inst.text):
      note = "loop-emitted"
    elif "__ynn_fusion" in inst.text:
      note = "YNNPACK"
    elif inst.opcode == "custom-call" or "custom-call" in opcodes:
      note = "custom-call"
    window = re.search(r"window=\{([^}]*)\}", conv.text)
    labels = re.search(r"dim_labels=(\S+?)[,\s]", conv.text + " ")
    note = " ".join(filter(None, [note, window[1] if window else "", labels[1] if labels else ""]))
    forward = bool(conv.op_name) and "transpose(" not in conv.op_name
    if tuple(sorted(_dims(conv.shape))) in kernel_shapes and not forward:
      return "conv d_weight", note
    if forward:
      return "conv fwd", note
    return "conv d_input", note
  if "dot" in opcodes:
    return "dot", "bwd" if backward else "fwd"
  if inst.opcode == "custom-call" or "custom-call" in opcodes:
    target = re.search(r'custom_call_target="([^"]*)"', inst.text)
    return "other", f"custom-call {target[1] if target else ''}"
  if opcodes <= {"transpose", "copy", "bitcast", "parameter", "reverse", "slice", "concatenate", "pad", "reshape",
                 "broadcast", "constant", "dynamic-slice", "dynamic-update-slice", "tuple", "get-tuple-element"}:
    # Kernel-shaped copies are per-step costs that do not scale with the batch (flipped, io-swapped kernels for the
    # input gradients); activation-shaped ones do.
    return ("layout (kernel)" if tuple(sorted(_dims(inst.shape))) in kernel_shapes else "layout (activation)"), ""
  if "reduce" in opcodes or "reduce-window" in opcodes:
    return "reduce", ""
  if inst.opcode in ("fusion",) or opcodes:
    return "elementwise", ""
  return "other", ""


def layer_of(op_name: str) -> str:
  """'jit(train_step)/transpose(jvp(UNet))/up1/conv/conv1/conv_general_dilated' -> 'up1/conv/conv1'."""
  parts = [p for p in op_name.split("/") if p and "(" not in p]
  return "/".join(parts[:-1]) if len(parts) > 1 else "/".join(parts)


def conv_flops(conv_text: str, instructions: dict[str, Instruction]) -> float | None:
  """2 x multiply-adds of a convolution from its output shape, window and input features (dilated zeros excluded
  approximately, by dividing by the base dilation)."""
  m = re.search(r"convolution\(%?([\w.\-]+), %?([\w.\-]+)\)", conv_text)
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", conv_text)
  out = re.search(r"= (\w+\[[\d,]*\])", conv_text)
  if not (m and labels and out) or m[1] not in instructions:
    return None
  lhs_dims = _dims(instructions[m[1]].shape)
  lhs_labels = labels[1]
  if len(lhs_dims) != len(lhs_labels):
    return None
  in_features = lhs_dims[lhs_labels.index("f")]
  groups = re.search(r"feature_group_count=(\d+)", conv_text)
  in_features //= int(groups[1]) if groups else 1
  window = re.search(r"size=([\dx]+)", conv_text)
  taps = math.prod(int(v) for v in window[1].split("x")) if window else 1
  base = re.search(r"lhs_dilate=([\dx]+)", conv_text)
  dilation = math.prod(int(v) for v in base[1].split("x")) if base else 1
  return 2.0 * math.prod(_dims(out[1])) * taps * in_features / dilation


def trace_events(trace_dir: str) -> dict[str, list[float]]:
  """HLO instruction name -> durations (s) of its executions, from the XLA:CPU thunk events of a trace."""
  import jax  # pylint: disable=g-import-not-at-top
  paths = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
  if not paths:
    raise FileNotFoundError(f"no .xplane.pb under {trace_dir}: the trace was not written")
  data = jax.profiler.ProfileData.from_file(sorted(paths)[-1])
  durations = collections.defaultdict(list)
  for plane in data.planes:
    if not plane.name.startswith("/host:CPU") and not plane.name.startswith("/device:"):
      continue
    for line in plane.lines:
      if line.name == "python" or "PjRtCpuClient" in line.name:
        continue
      for event in line.events:
        if event.name.startswith("ThunkExecutor") or event.name.startswith("$"):
          continue
        durations[event.name].append(event.duration_ns * 1e-9)
  return durations


def profile(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from fcnjax import steps  # pylint: disable=g-import-not-at-top
  from benchmarks.compare_torch import FcnjaxTrain, fcnjax_model, make_batch  # pylint: disable=g-import-not-at-top
  model = fcnjax_model(args.model, args.num_classes, args.dtype)
  images, masks = make_batch(args)
  variables = steps.init_variables(model, jax.random.PRNGKey(0), images.shape[1:])
  kernel_shapes = {tuple(sorted(x.shape)) for x in jax.tree.leaves(variables["params"]) if x.ndim == 4}
  runner = FcnjaxTrain(model, variables, images, masks)
  hlo = runner.compiled.as_text()
  if args.hlo_out:
    with open(args.hlo_out, "w") as f:
      f.write(hlo)
  runner(1)
  wall = []
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    for _ in range(args.steps):
      wall.append(runner(1))
    jax.profiler.stop_trace()
    durations = trace_events(trace_dir)
  instructions, computations = parse_hlo(hlo)
  ops, totals = [], collections.defaultdict(lambda: [0.0, 0.0])
  for name, times in durations.items():
    inst = instructions.get(name)
    if inst is None:
      category, note, layer, flops = "other", "(not in HLO)", "", None
    else:
      category, note = classify(inst, computations, kernel_shapes)
      inner = _inner(inst, computations) or [inst]
      layer = layer_of(next((i.op_name for i in inner if i.op_name), inst.op_name))
      conv = next((i for i in inner if i.opcode == "convolution"), None)
      flops = conv_flops(conv.text, {**instructions, **{i.name: i for i in inner}}) if conv else None
    seconds = sum(times) / args.steps
    totals[category][0] += seconds
    totals[category][1] += (flops or 0.0) * len(times) / args.steps
    ops.append({"name": name, "category": category, "layer": layer, "note": note,
                "shape": inst.shape if inst else "", "ms_per_step": 1e3 * seconds, "flops": flops,
                "gflops_per_s": flops * len(times) / args.steps / seconds / 1e9 if flops and seconds else None})
  ops.sort(key=lambda o: -o["ms_per_step"])
  total = sum(o["ms_per_step"] for o in ops)
  return {"model": args.model, "batch": args.batch, "size": args.size, "dtype": args.dtype,
          "wall_ms_per_step": harness.Spread.of([1e3 * w for w in wall]).__dict__, "thunk_ms_per_step": total,
          "compile_s": runner.info.compile_s, "xla_flops_per_step": runner.info.flops, "donated": runner.info.donated,
          "categories": {c: {"ms_per_step": 1e3 * totals[c][0], "share": 1e3 * totals[c][0] / total if total else 0,
                             "conv_gflops": totals[c][1] / 1e9} for c in CATEGORIES if c in totals},
          "ops": ops}


def report(result: dict, top: int) -> str:
  lines = [f"{result['model']}: batch {result['batch']}, {result['size']}x{result['size']}, {result['dtype']}; "
           f"wall {result['wall_ms_per_step']['median']:.0f} ms/step, thunks {result['thunk_ms_per_step']:.0f} ms/step "
           f"(summed over threads), compile {result['compile_s']:.1f} s, donated: {result['donated']}", ""]
  rows = []
  for c, v in sorted(result["categories"].items(), key=lambda kv: -kv[1]["ms_per_step"]):
    rate = v["conv_gflops"] / v["ms_per_step"] * 1e3 if v["conv_gflops"] and v["ms_per_step"] else None
    rows.append({"category": c, "ms/step": f"{v['ms_per_step']:.0f}", "share": f"{100 * v['share']:.0f}%",
                 "conv GFLOP": f"{v['conv_gflops']:.1f}" if v["conv_gflops"] else "",
                 "GFLOP/s": "" if rate is None else f"{rate:.0f}"})
  lines += [harness.markdown_table(rows, ["category", "ms/step", "share", "conv GFLOP", "GFLOP/s"]), ""]
  rows = [{"op": o["name"], "category": o["category"], "layer": o["layer"], "ms/step": f"{o['ms_per_step']:.1f}",
           "GFLOP/s": "" if o["gflops_per_s"] is None else f"{o['gflops_per_s']:.3g}", "shape": o["shape"][:40],
           "note": o["note"][:70]} for o in result["ops"][:top]]
  lines.append(harness.markdown_table(rows, ["op", "category", "layer", "ms/step", "GFLOP/s", "shape", "note"]))
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="unet", choices=("fcn8s", "unet", "fcn_resnet50"))
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--num_classes", type=int, default=21)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--steps", type=int, default=2, help="profiled steps (after one untimed step)")
  p.add_argument("--threads", type=int, default=0)
  p.add_argument("--top", type=int, default=25, help="rows of the per-op table")
  p.add_argument("--hlo_out", default="", help="write the optimised HLO text here")
  p.add_argument("--out", default="", help="write the full result (every op) as JSON here")
  args = p.parse_args(argv)
  harness.pin_threads(args.threads)
  start = time.perf_counter()
  result = profile(args)
  print(report(result, args.top))
  print(f"\n({time.perf_counter() - start:.0f} s)")
  if args.out:
    harness.write_json(args.out, result)


if __name__ == "__main__":
  main()
