"""benchmarks/ort_profile.py reads ONNX Runtime's profile into per-operator times."""
from __future__ import annotations

import numpy as np
import torch

from benchmarks import ort_profile


def test_operator_times_are_those_of_the_optimised_graph(tmp_path):
  """conv -> BatchNorm -> ReLU, then a second conv: ORT folds the BatchNorm and fuses the ReLU, so the graph it runs
  has two convolution nodes, each counted once however many runs the profile holds."""
  torch.manual_seed(0)
  net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                            torch.nn.Conv2d(8, 4, 1)).eval()
  images = np.random.default_rng(0).standard_normal((1, 3, 32, 32), dtype=np.float32)
  path = tmp_path / "net.onnx"
  torch.onnx.export(net, (torch.from_numpy(images),), str(path), dynamo=False, opset_version=17)
  by_op, wall_ms = ort_profile.ort_operator_times(str(path), images, threads=1, runs=3)
  assert by_op["Conv"][0] == 2, by_op  # beside them, ORT's layout reorders ('ReorderInput' / 'ReorderOutput')
  assert "BatchNormalization" not in by_op and "Relu" not in by_op, by_op
  assert all(ms > 0 for _, ms in by_op.values()) and wall_ms > 0, (by_op, wall_ms)


def test_roofline_puts_both_rates_against_the_measured_gemm():
  """1 GFLOP in 10 ms is 100 GFLOP/s: all of a 100 GFLOP/s GEMM for ORT, half of it for fcnjax at 20 ms, and 1.2x
  ORT would need 120% of it."""
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  text = ort_profile.roofline(1e9, 10.0, 20.0, harness.Peak(100.0, "GEMM"), harness.Peak(150.0, "nominal"))
  assert "ORT: 100 GFLOP/s (100% of the GEMM's)" in text, text
  assert "fcnjax: 50 GFLOP/s (50%)" in text, text
  assert "1.2x ORT: 120 GFLOP/s (120%)" in text, text


def test_gemm_rate_is_measured():
  from benchmarks import harness  # pylint: disable=g-import-not-at-top
  peak = harness.gemm_gflops(size=64, repeats=2)
  assert peak.gflops > 0 and "64x64x64" in peak.assumption, peak
