"""Where metrics go: a JSONL file (one record per line, easy to plot or grep) and TensorBoard."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np


def to_json_value(value: Any) -> Any:
  """Arrays and numpy scalars as JSON values; NaN and Inf become null."""
  value = np.asarray(value)
  if value.ndim == 0:
    value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value
  return [to_json_value(v) for v in value]


class MetricWriter:
  """Writes to workdir/metrics.jsonl and workdir/tensorboard. Only process 0 writes; others are no-ops."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tensorboard = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # Imported here: only the writing process needs it.
      self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, kind: str, step: int, values: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"kind": kind, "step": int(step), **{k: to_json_value(v) for k, v in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for name, value in record.items():
      if isinstance(value, (int, float)) and name != "step":
        self._tensorboard.add_scalar(f"{kind}/{name}", value, step)
    self._tensorboard.flush()

  def close(self) -> None:
    """Flushes and closes the TensorBoard files. Where the flush fails (a full disk), the files are given up and
    their writer thread stopped: else tensorboardX's exit hook flushes them again and prints the same error at exit,
    and the thread dies at exit with a traceback of its own."""
    tensorboard, self._tensorboard = self._tensorboard, None
    if tensorboard is None:
      return
    try:
      tensorboard.close()
    except OSError:
      for writer in (tensorboard.all_writers or {}).values():
        events = writer.event_writer
        events._worker.stop()  # pylint: disable=protected-access
        events._closed = True  # pylint: disable=protected-access
      raise


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
