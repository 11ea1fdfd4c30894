"""Where ONNX Runtime's inference time goes, operator by operator, beside fcnjax's inference step: the profile
behind compare_torch's 'inference vs ONNX Runtime' column.

    python -m benchmarks.ort_profile                                   # fcn_resnet50, batch 2, 224x224
    python -m benchmarks.ort_profile --model lraspp_mobilenet_v3_large --runs 50

The network is compare_torch's reference (torchvision's or smp's model, random weights and BatchNorm statistics),
exported by PyTorch's own torch.onnx.export as compare_torch exports it and run in ONNX Runtime's default CPU
provider with ORT's profiler on. Per operator type of the graph ORT runs (after its graph optimisations, which fold
BatchNorm into the convolutions and fuse activations and residual adds into them: on x86 its blocked-layout 'Conv'
nodes, between 'ReorderInput' / 'ReorderOutput'), the nodes' count and their kernel time in ms per run, mean over
--runs. fcnjax's jitted eval-mode forward pass is timed over the same inputs (median of --runs).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time

import numpy as np

from benchmarks import compare_torch, harness
from fcnjax import exporting


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", default="fcn_resnet50", choices=compare_torch.ALL_MODELS)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--runs", type=int, default=10, help="timed runs per framework after one untimed")
  p.add_argument("--threads", type=int, default=0, help="threads for both (0 = all allowed cores)")
  return p.parse_args(argv)


def ort_operator_times(path: str, images_nchw: np.ndarray, threads: int, runs: int) -> tuple[dict, float]:
  """{op type: (nodes, ms per run)} from ORT's profile of `runs` runs, and the median wall ms of a run."""
  session = exporting.onnx_session(path, threads, profile_prefix=os.path.join(os.path.dirname(path), "ort_profile"))
  feed = {session.get_inputs()[0].name: images_nchw}
  session.run(None, feed)  # untimed: ORT sets its buffers up on the first run
  walls = []
  for _ in range(runs):
    start = time.perf_counter()
    session.run(None, feed)
    walls.append(1e3 * (time.perf_counter() - start))
  with open(session.end_profiling()) as f:
    events = json.load(f)
  node_runs = collections.defaultdict(list)
  op_of = {}
  for event in events:
    if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
      node_runs[event["name"]].append(event["dur"] / 1e3)
      op_of[event["name"]] = event["args"]["op_name"]
  by_op = collections.defaultdict(lambda: [0, 0.0])
  for node, durations in node_runs.items():
    timed = durations[-runs:]  # the untimed first run is in the profile too
    by_op[op_of[node]][0] += 1
    by_op[op_of[node]][1] += sum(timed) / len(timed)
  return dict(by_op), statistics.median(walls)


def fcnjax_inference(name: str, reference, images_nhwc: np.ndarray, runs: int) -> tuple[float, float | None]:
  """fcnjax's median ms per run, and the forward pass's FLOPs (XLA's count of the direct convolutions and the
  element-wise work, whatever algorithm runs them)."""
  import jax  # pylint: disable=g-import-not-at-top
  model = compare_torch.fcnjax_model(name, compare_torch.NUM_CLASSES, "float32")
  variables = jax.tree.map(np.asarray, compare_torch.flax_variables_from_torch(name, reference))
  runner = compare_torch.FcnjaxInfer(model, variables, images_nhwc, analyse=True)
  runner(1)
  return statistics.median(1e3 * runner(1) for _ in range(runs)), runner.info.flops


def roofline(flops: float, ort_ms: float, ours_ms: float, gemm: harness.Peak, nominal: harness.Peak) -> str:
  """Where ORT's and fcnjax's rates sit against a dense GEMM's on the same cores, and what 1.2x ORT would need."""
  ort_rate, ours_rate = flops / ort_ms / 1e6, flops / ours_ms / 1e6
  lines = [f"forward pass: {flops / 1e9:.1f} GFLOP (direct count); a dense fp32 GEMM here: {gemm.assumption}; "
           f"nominal peak: {nominal.assumption}",
           f"ORT: {ort_rate:.0f} GFLOP/s ({100 * ort_rate / gemm.gflops:.0f}% of the GEMM's); "
           f"fcnjax: {ours_rate:.0f} GFLOP/s ({100 * ours_rate / gemm.gflops:.0f}%); 1.2x ORT: "
           f"{1.2 * ort_rate:.0f} GFLOP/s ({120 * ort_rate / gemm.gflops:.0f}%)"]
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  import torch  # pylint: disable=g-import-not-at-top
  threads = args.threads or len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  images, _ = compare_torch.make_batch(argparse.Namespace(batch=args.batch, size=args.size,
                                                         num_classes=compare_torch.NUM_CLASSES))
  torch.manual_seed(0)
  reference = compare_torch.torch_model(args.model, compare_torch.NUM_CLASSES).eval()
  with tempfile.TemporaryDirectory() as directory:
    export = compare_torch.OrtTorchExport(reference, images, threads, directory)
    by_op, ort_ms = ort_operator_times(os.path.join(directory, "torch.onnx"), export.images, threads, args.runs)
  ours_ms, flops = fcnjax_inference(args.model, reference, images, args.runs)
  total = sum(ms for _, ms in by_op.values())
  print(f"{args.model}, batch {args.batch}, {args.size}x{args.size}, float32, {threads} threads")
  print(f"ONNX Runtime (PyTorch's export): {ort_ms:.1f} ms per run, {total:.1f} ms in kernels; "
        f"fcnjax: {ours_ms:.1f} ms per run (fcnjax / ORT speed {ort_ms / ours_ms:.2f})")
  if flops:
    print(roofline(flops, ort_ms, ours_ms, harness.gemm_gflops(), harness.cpu_peak(threads)))
  print()
  print("| ORT operator | nodes | ms per run | share |")
  print("|---|---|---|---|")
  for op, (nodes, ms) in sorted(by_op.items(), key=lambda item: -item[1][1]):
    print(f"| {op} | {nodes} | {ms:.1f} | {100 * ms / total:.0f}% |")


if __name__ == "__main__":
  main()
