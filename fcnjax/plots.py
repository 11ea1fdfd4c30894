"""Training curves from workdir/metrics.jsonl to workdir/curves.png."""
from __future__ import annotations

import os

from fcnjax import reporting


def plot_training_curves(workdir: str) -> str | None:
  records = reporting.read_metrics(workdir)
  if not records:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  def series(kind, key):
    # A resumed run may re-log steps after its last checkpoint: the later record wins.
    points = {r["step"]: r[key] for r in records if r["kind"] == kind and r.get(key) is not None}
    return sorted(points), [points[s] for s in sorted(points)]

  fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
  ax_loss.plot(*series("train", "loss"), label="train loss")
  ax_loss.set_xlabel("step")
  ax_loss.set_yscale("log")
  ax_loss.legend()
  for key in ("miou", "pixel_accuracy", "mean_dice"):
    steps, values = series("eval", key)
    if steps:
      ax_eval.plot(steps, values, marker="o", label=key)
  ax_eval.set_xlabel("step")
  ax_eval.set_ylim(0, 1)
  ax_eval.legend()
  fig.tight_layout()
  path = os.path.join(workdir, "curves.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
