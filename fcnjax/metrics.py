"""Segmentation metrics: a confusion matrix accumulated on device, its summary on the host, and the ISBI 2012 EM
challenge's binary metrics.

Device part (jittable, batch may be sharded): `predictions` turns logits into labels and `confusion_matrix` counts
(ground truth, prediction) pairs; per-batch matrices are summed over an epoch. Host part (numpy): `summarize` turns
the matrix into mIoU, accuracies, Dice and frequency-weighted IoU; `format_table` prints them; `challenge_metrics`
scores a binary membrane/cell prediction.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


# --------------------------------------------------------------------------------------------------------------------
# Device part


def predictions(logits: Array, threshold: float = 0.0) -> Array:
  """int32 labels (N, H, W) from NHWC logits: argmax for C > 1 channels, (logit > threshold) for one channel.

  A one-channel (sigmoid) model is thereby scored as two classes, background 0 and foreground 1; threshold 0 is
  probability 0.5 (best_binary_threshold chooses another from labelled data).
  """
  if logits.ndim != 4:
    raise ValueError(f"metrics.predictions: logits must be NHWC (N, H, W, C), got shape {logits.shape}")
  if logits.shape[-1] == 1:
    return (logits[..., 0] > threshold).astype(jnp.int32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def confusion_matrix(pred: Array, labels: Array, num_classes: int, ignore_index: int = 255,
                     valid: Array | None = None) -> Array:
  """int32 (num_classes, num_classes) counts; rows = ground truth, columns = prediction.

  Counts every pixel whose label is not `ignore_index` and lies in [0, num_classes) (torchvision's
  references/segmentation/utils.py ConfusionMatrix skips out-of-range labels the same way) and whose prediction is
  in range,
  for the examples where `valid` (N,) is True (False marks the padding examples of a last, partial batch).

  Jittable, and shards with the batch under any mesh: per image, the count is a matmul of one-hot ground truth and
  one-hot prediction, (C, H*W) @ (H*W, C), summed over images in int32. A bincount/scatter-add would touch less
  memory but, under jax.make_mesh's Explicit axes, a scatter from batch-sharded indices into a replicated table needs
  an explicit out_sharding; a batched matmul shards along the batch anywhere. The one-hots are bfloat16 (0/1 is
  exact) and the product accumulates in float32, exact for counts below 2**24, hence at most 2**24 pixels per
  image (checked). Temporaries are O(N * H * W * C) (about 0.7 GB for 16 x 512 x 512 x 21 on CPU). Sum the per-batch
  matrices to accumulate; int32 holds 2**31 pixels (about 8000 images of 512x512), so accumulate on the host in
  int64 beyond that.
  """
  if pred.shape != labels.shape or pred.ndim != 3:
    raise ValueError(f"metrics.confusion_matrix: pred and labels must both be (N, H, W), got {pred.shape} and "
                     f"{labels.shape}")
  num_images, height, width = labels.shape
  if height * width > 2**24:
    raise ValueError(f"metrics.confusion_matrix: {height}x{width} images exceed the 2**24 pixels that float32 "
                     "accumulation counts exactly; split them into tiles")
  keep = (labels != ignore_index) & (labels >= 0) & (labels < num_classes) & (pred >= 0) & (pred < num_classes)
  if valid is not None:
    if valid.shape != labels.shape[:1]:
      raise ValueError(f"metrics.confusion_matrix: valid must have shape ({num_images},), got {valid.shape}")
    keep = keep & valid.astype(bool)[:, None, None]
  # one_hot of -1 is all zeros: excluded pixels fall in no bin.
  gt_one_hot = jax.nn.one_hot(jnp.where(keep, labels, -1).reshape(num_images, -1), num_classes, dtype=jnp.bfloat16)
  pred_one_hot = jax.nn.one_hot(pred.reshape(num_images, -1), num_classes, dtype=jnp.bfloat16)
  per_image = jnp.einsum("npc,npd->ncd", gt_one_hot, pred_one_hot, preferred_element_type=jnp.float32)
  return jnp.sum(per_image.astype(jnp.int32), axis=0)


# --------------------------------------------------------------------------------------------------------------------
# Host part


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  """numerator / denominator, NaN where the denominator is 0 (an undefined ratio, not a perfect or a zero one)."""
  out = np.full(np.shape(numerator), np.nan, dtype=np.float64)
  np.divide(numerator, denominator, out=out, where=denominator != 0)
  return out


def _nanmean(values: np.ndarray) -> float:
  values = values[~np.isnan(values)]
  return float(values.mean()) if values.size else float("nan")


def summarize(confusion: Any, class_names: Sequence[str] | None = None) -> dict[str, Any]:
  """Scores from a (C, C) confusion matrix, rows = ground truth, columns = prediction.

  Per class c, with tp = M[c, c], gt = row sum, pred = column sum:
    per_class_iou = tp / (gt + pred - tp), per_class_dice = 2 tp / (gt + pred), per_class_accuracy = tp / gt.
  IoU and Dice are NaN for a class absent from both ground truth and prediction (0/0: nothing to score); a class
  predicted but absent from the ground truth has IoU 0 and counts against the means. Accuracy (recall) is NaN for
  a class absent from the ground truth. 'miou', 'mean_dice' and 'mean_accuracy' average the non-NaN per-class
  values. torchvision's ConfusionMatrix.compute gives the same per-class IoU and accuracy but averages with
  .mean(), so its mean IoU is NaN as soon as one class is absent from both.
    pixel_accuracy = trace / total (torchvision's acc_global);
    fw_iou = sum_c (gt_c / total) * iou_c  (frequency-weighted IoU of the FCN paper).
  Values are Python floats (lists for per-class values), NaN where undefined; 'class_names' is included if given.
  """
  matrix = np.asarray(confusion, dtype=np.float64)
  if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
    raise ValueError(f"metrics.summarize: confusion must be a square (C, C) matrix, got shape {matrix.shape}")
  if class_names is not None and len(class_names) != matrix.shape[0]:
    raise ValueError(f"metrics.summarize: {len(class_names)} class_names for a {matrix.shape[0]}-class matrix")
  tp = np.diag(matrix)
  gt = matrix.sum(axis=1)
  pred = matrix.sum(axis=0)
  total = matrix.sum()
  iou = _divide(tp, gt + pred - tp)
  dice = _divide(2 * tp, gt + pred)
  accuracy = _divide(tp, gt)
  frequency = gt / total if total else np.zeros_like(gt)
  present = gt > 0
  summary = {
      "miou": _nanmean(iou),
      "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
      "mean_accuracy": _nanmean(accuracy),
      "mean_dice": _nanmean(dice),
      "fw_iou": float(np.sum(frequency[present] * iou[present])) if total else float("nan"),
      "per_class_iou": iou.tolist(),
      "per_class_dice": dice.tolist(),
      "per_class_accuracy": accuracy.tolist(),
  }
  if class_names is not None:
    summary["class_names"] = list(class_names)
  return summary


def format_table(summary: dict[str, Any], class_names: Sequence[str] | None = None) -> str:
  """A per-class table (IoU, Dice, accuracy in percent; '-' where undefined) followed by the mean lines."""
  num_classes = len(summary["per_class_iou"])
  names = list(class_names or summary.get("class_names") or [str(c) for c in range(num_classes)])
  if len(names) != num_classes:
    raise ValueError(f"metrics.format_table: {len(names)} class_names for {num_classes} classes")

  def percent(value: float) -> str:
    return "-" if np.isnan(value) else f"{100 * value:.2f}"

  width = max(12, *(len(n) for n in names))
  lines = [f"{'class':<{width}} {'IoU':>7} {'Dice':>7} {'Acc':>7}", "-" * (width + 24)]
  for name, iou, dice, acc in zip(names, summary["per_class_iou"], summary["per_class_dice"],
                                  summary["per_class_accuracy"]):
    lines.append(f"{name:<{width}} {percent(iou):>7} {percent(dice):>7} {percent(acc):>7}")
  lines.append("-" * (width + 24))
  for label, key in (("mean IoU", "miou"), ("mean Dice", "mean_dice"), ("mean accuracy", "mean_accuracy"),
                     ("pixel accuracy", "pixel_accuracy"), ("fw IoU", "fw_iou")):
    lines.append(f"{label:<{width}} {percent(summary[key]):>7}")
  return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# ISBI 2012 EM challenge metrics (binary, host numpy)


def _as_binary(name: str, array: Any) -> np.ndarray:
  array = np.asarray(array)
  if array.dtype != bool:
    values = np.unique(array)
    if not np.all(np.isin(values, (0, 1))):
      raise ValueError(f"metrics.challenge_metrics: {name} must be binary (bool or 0/1; foreground = cell "
                       f"interior = 1), got values {values[:8]}; threshold it first, e.g. mask > 127")
  return array.astype(bool)


def _pair(pred_binary: Any, gt_binary: Any) -> tuple[np.ndarray, np.ndarray]:
  pred, gt = _as_binary("pred_binary", pred_binary), _as_binary("gt_binary", gt_binary)
  if pred.shape != gt.shape:
    raise ValueError(f"metrics.challenge_metrics: pred_binary {pred.shape} and gt_binary {gt.shape} differ in shape")
  return pred, gt


def best_binary_threshold(logits: Any, gt: Any, ignore_index: int = 255) -> tuple[float, float]:
  """(threshold, pixel error at it): the logit threshold with the fewest wrong pixels when (logit > threshold) is
  foreground, over one-logit `logits` and their labels `gt` (0/1, pixels at ignore_index left out), exact: halfway
  between the two logits where the count is least (of equally good thresholds, the one nearest 0).

  A loss that weighs one class's pixels more (the U-Net border weights on membranes) moves the logits of the
  boundary pixels toward that class, so a threshold of 0 draws its regions too wide; chosen on training images,
  the threshold undoes that shift without looking at the images it is scored on."""
  logits, gt = np.asarray(logits, np.float64).reshape(-1), np.asarray(gt).reshape(-1)
  if logits.shape != gt.shape:
    raise ValueError(f"metrics.best_binary_threshold: {logits.size} logits for {gt.size} labels")
  scored = gt != ignore_index
  labels = gt[scored]
  if not np.all((labels == 0) | (labels == 1)):
    raise ValueError("metrics.best_binary_threshold: labels must be 0/1 (or ignore_index)")
  logits, foreground = logits[scored], labels.astype(bool)
  if logits.size == 0:
    raise ValueError("metrics.best_binary_threshold: no labelled pixels")
  order = np.argsort(logits, kind="stable")
  ordered, fg_ordered = logits[order], foreground[order]
  # Thresholds between ordered[k - 1] and ordered[k] call the first k pixels background: their foreground pixels and
  # the background pixels after them are wrong.
  fg_below = np.concatenate([[0], np.cumsum(fg_ordered)])
  bg_below = np.arange(ordered.size + 1) - fg_below
  wrong = fg_below + (bg_below[-1] - bg_below)
  cut = np.concatenate([[True], ordered[1:] > ordered[:-1], [True]])  # equal logits cannot be split
  candidates = np.flatnonzero(cut)
  padded = np.concatenate([[ordered[0] - 1.0], ordered, [ordered[-1] + 1.0]])
  thresholds = (padded[candidates] + padded[candidates + 1]) / 2
  counts = wrong[candidates]
  best = thresholds[counts == counts.min()]
  return float(best[np.argmin(np.abs(best))]), float(counts.min() / ordered.size)


def pixel_error(pred: Any, gt: Any) -> float:
  """Fraction of pixels whose binary label differs (the challenge's pixel error: squared Euclidean distance between
  the binary labelings over the pixel count, at one threshold)."""
  pred, gt = _pair(pred, gt)
  return float(np.mean(pred != gt))


def foreground_iou(pred: Any, gt: Any) -> float:
  """|pred & gt| / |pred | gt| for the foreground (cell interior); NaN when both are empty."""
  pred, gt = _pair(pred, gt)
  union = np.sum(pred | gt)
  return float(np.sum(pred & gt) / union) if union else float("nan")


def foreground_dice(pred: Any, gt: Any) -> float:
  """2 |pred & gt| / (|pred| + |gt|) for the foreground (cell interior); NaN when both are empty."""
  pred, gt = _pair(pred, gt)
  total = np.sum(pred) + np.sum(gt)
  return float(2 * np.sum(pred & gt) / total) if total else float("nan")


def _rand_error_2d(pred: np.ndarray, gt: np.ndarray, connectivity: int) -> float:
  from skimage.measure import label
  from skimage.metrics import adapted_rand_error

  gt_segments = label(gt, connectivity=connectivity)  # membrane = 0, ignored by adapted_rand_error
  pred_segments = label(pred, connectivity=connectivity)
  # Predicted membrane pixels are singletons, as in the SNEMI3D/Fiji scoring: label 0 would otherwise join every
  # missed pixel of every cell into one merged segment.
  membrane = pred_segments == 0
  pred_segments[membrane] = pred_segments.max() + 1 + np.arange(np.count_nonzero(membrane))
  with np.errstate(divide="ignore", invalid="ignore"):
    error, _, _ = adapted_rand_error(gt_segments, pred_segments, ignore_labels=(0,))
  # 0/0: no pair of ground-truth cell pixels and none put together by the prediction -> nothing is wrong.
  return 0.0 if np.isnan(error) else float(error)


def rand_error(pred: Any, gt: Any, connectivity: int = 1) -> float:
  """Foreground-restricted adapted Rand error of the cell segmentation implied by binary masks.

  Per 2D slice: the cells of gt and of pred are their connected foreground components (skimage.measure.label;
  connectivity=1 is 4-connectivity, so a one-pixel diagonal membrane separates two cells); predicted membrane
  pixels are singleton segments; then skimage.metrics.adapted_rand_error(gt_cells, pred_cells,
  ignore_labels=(0,)) = 1 - F-score of the pairwise Rand precision and recall over the pixels inside ground-truth
  cells (ground-truth membrane is ignored), which is the SNEMI3D definition. A stack (N, H, W) gives the mean
  over slices, as Fiji's RandError does.

  Relation to the ISBI 2012 leaderboard: the challenge's Rand error is 1 - the MAXIMAL foreground-restricted Rand
  F-score over thresholds of a probability map, and its final version (V_rand) first thins the borders to one
  pixel (Fiji trainableSegmentation RandError.getMaximalVRandAfterThinning). Here there is one threshold (the
  caller's binary prediction) and no thinning, so values are comparable in kind, not digit for digit, with the
  U-Net paper's 0.0382.
  """
  pred, gt = _pair(pred, gt)
  if pred.ndim == 2:
    pred, gt = pred[None], gt[None]
  if pred.ndim != 3:
    raise ValueError(f"metrics.rand_error: expected (H, W) or (N, H, W) masks, got shape {pred.shape}")
  return float(np.mean([_rand_error_2d(p, g, connectivity) for p, g in zip(pred, gt)]))


def challenge_metrics(pred_binary: Any, gt_binary: Any, connectivity: int = 1) -> dict[str, float]:
  """ISBI 2012 EM metrics for binary masks (H, W) or (N, H, W); foreground = cell interior = 1, membrane = 0.

  Returns {'pixel_error', 'rand_error', 'foreground_iou', 'foreground_dice'}; pixel error, IoU and Dice pool
  all pixels of the stack, rand_error averages slices (see rand_error for exactly what it computes and how it
  differs from the challenge's thresholded, border-thinned V_rand). The warping error is not computed.
  """
  pred, gt = _pair(pred_binary, gt_binary)
  return {
      "pixel_error": pixel_error(pred, gt),
      "rand_error": rand_error(pred, gt, connectivity=connectivity),
      "foreground_iou": foreground_iou(pred, gt),
      "foreground_dice": foreground_dice(pred, gt),
  }
