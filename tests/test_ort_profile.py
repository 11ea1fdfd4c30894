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
