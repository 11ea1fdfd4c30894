"""Segmentation losses on NHWC logits: cross-entropy, binary cross-entropy, soft Dice, and their combination.

Conventions shared by every function here:
- `logits` are (N, H, W, C) for a C-class softmax model or (N, H, W, 1) for a binary sigmoid model, in any float
  dtype; the loss is always computed in float32 (bfloat16 logits are upcast first).
- `labels` are int (N, H, W); pixels equal to `ignore_index` (255 by default, VOC's "void") take no part.
- `weights` is an optional float (N, H, W) per-pixel weight map (the U-Net paper's border weights).
- Means are taken over the VALID pixels of the whole batch (a sum divided by a sum), never a mean of per-device or
  per-image means, so a data-parallel step over any number of devices gives the same value as one device. A batch
  with no valid pixel gives 0, not NaN, so an all-void crop cannot poison the parameters.

All functions are pure and jittable; shapes are checked at trace time.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections

Array = jax.Array

# Which loss terms each `loss_config.name` combines.
LOSS_TERMS = {
    "cross_entropy": ("cross_entropy",),
    "bce": ("bce",),
    "dice": ("dice",),
    "ce+dice": ("cross_entropy", "dice"),
    "bce+dice": ("bce", "dice"),
}


def default_config() -> ml_collections.ConfigDict:
  """The `loss` section of an experiment config, with every key segmentation_loss reads."""
  config = ml_collections.ConfigDict()
  config.name = "cross_entropy"  # one of LOSS_TERMS
  config.ignore_index = 255
  # torchvision's references/segmentation/train.py: criterion = out + 0.5 * aux.
  config.aux_weight = 0.5
  config.class_weights = None  # optional sequence of C floats, torch's `weight=`
  config.label_smoothing = 0.0
  config.pos_weight = None  # optional float, torch's BCEWithLogitsLoss(pos_weight=) for 'bce'
  config.dice_weight = 1.0  # coefficient of the Dice term in 'ce+dice' / 'bce+dice'
  config.dice_smooth = 1.0
  return config


def _check_shapes(fn: str, logits: Array, labels: Array, weights: Array | None) -> None:
  if logits.ndim != 4:
    raise ValueError(f"losses.{fn}: logits must be NHWC (N, H, W, C), got shape {logits.shape}")
  if labels.shape != logits.shape[:3]:
    raise ValueError(f"losses.{fn}: labels must have shape (N, H, W) = {logits.shape[:3]} to match logits "
                     f"{logits.shape}, got {labels.shape}")
  if weights is not None and weights.shape != labels.shape:
    raise ValueError(f"losses.{fn}: weights must have the labels' shape {labels.shape}, got {weights.shape}")


def _safe_divide(numerator: Array, denominator: Array) -> Array:
  # The numerator is a sum over the same (empty) set, hence 0 whenever the denominator is: 0/1 keeps grads finite.
  return numerator / jnp.where(denominator > 0, denominator, 1.0)


def cross_entropy(logits: Array, labels: Array, ignore_index: int = 255, weights: Array | None = None,
                  class_weights: Sequence[float] | Array | None = None, label_smoothing: float = 0.0) -> Array:
  """torch.nn.functional.cross_entropy(..., weight=class_weights, ignore_index=, label_smoothing=, reduction='mean').

  With class weights, torch's mean is sum_i cw[y_i] * nll_i / sum_i cw[y_i] over valid pixels i (not a division by
  the pixel count); label smoothing adds eps/C * sum_i sum_c cw[c] * -log p_ic over the same denominator, as in
  aten's cross_entropy_loss_label_smoothing.

  The per-pixel `weights` multiply each pixel's term but NOT the denominator: with class_weights=None the loss is
  sum_i w_i * nll_i / (number of valid pixels), i.e. torch's `(F.cross_entropy(reduction='none') * w).sum() /
  valid.sum()`, the U-Net paper's weighted energy per pixel. Normalising by sum(w) instead would cancel the weight
  map's overall scale (w0 = 10 in the paper), which the paper keeps.
  """
  _check_shapes("cross_entropy", logits, labels, weights)
  num_classes = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  valid = labels != ignore_index
  # Ignored pixels index class 0 and are then masked; this keeps the gather in range under jit.
  safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]

  if class_weights is None:
    target_weight = valid.astype(jnp.float32)
  else:
    class_weights = jnp.asarray(class_weights, jnp.float32)
    if class_weights.shape != (num_classes,):
      raise ValueError(f"losses.cross_entropy: class_weights must have shape ({num_classes},) for logits "
                       f"{logits.shape}, got {class_weights.shape}")
    # A one-hot product rather than class_weights[labels]: a gather from a replicated table with batch-sharded
    # indices needs an explicit out_sharding under jax.make_mesh's Explicit axes; elementwise ops shard anywhere.
    one_hot = jax.nn.one_hot(safe_labels, num_classes, dtype=jnp.float32)
    target_weight = jnp.where(valid, jnp.sum(one_hot * class_weights, axis=-1), 0.0)
  pixel_weight = target_weight if weights is None else target_weight * weights.astype(jnp.float32)
  denominator = jnp.sum(target_weight)
  loss = _safe_divide(jnp.sum(pixel_weight * nll), denominator)

  if label_smoothing:
    per_class = -log_probs if class_weights is None else -log_probs * class_weights
    smooth = jnp.sum(per_class, axis=-1)
    smooth_weight = valid.astype(jnp.float32)
    if weights is not None:
      smooth_weight = smooth_weight * weights.astype(jnp.float32)
    smooth_loss = _safe_divide(jnp.sum(smooth_weight * smooth), denominator)
    loss = (1.0 - label_smoothing) * loss + (label_smoothing / num_classes) * smooth_loss
  return loss


def binary_cross_entropy(logits: Array, labels: Array, ignore_index: int = 255, weights: Array | None = None,
                         pos_weight: float | Array | None = None) -> Array:
  """torch.nn.functional.binary_cross_entropy_with_logits on the valid pixels, reduction='mean'.

  `logits` is (N, H, W, 1), `labels` 0/1 (or ignore_index). Per pixel, with l = (pos_weight - 1) * y + 1:
  loss = (1 - y) * x + l * (log1p(exp(-|x|)) + max(-x, 0)), torch's overflow-free form of
  -[pos_weight * y * log sigmoid(x) + (1 - y) * log(1 - sigmoid(x))]. The mean divides by the number of valid
  pixels; `weights` scale each pixel's term (torch's `weight=`), not the denominator.
  """
  if logits.ndim != 4 or logits.shape[-1] != 1:
    raise ValueError(f"losses.binary_cross_entropy: logits must be (N, H, W, 1), got {logits.shape}; "
                     "use cross_entropy for C-class logits")
  _check_shapes("binary_cross_entropy", logits, labels, weights)
  x = logits[..., 0].astype(jnp.float32)
  valid = labels != ignore_index
  y = jnp.where(valid, labels, 0).astype(jnp.float32)
  softplus_neg = jnp.log1p(jnp.exp(-jnp.abs(x))) + jnp.maximum(-x, 0.0)  # = -log sigmoid(x)
  if pos_weight is None:
    per_pixel = (1.0 - y) * x + softplus_neg
  else:
    log_weight = (jnp.asarray(pos_weight, jnp.float32) - 1.0) * y + 1.0
    per_pixel = (1.0 - y) * x + log_weight * softplus_neg
  mask = valid.astype(jnp.float32)
  pixel_weight = mask if weights is None else mask * weights.astype(jnp.float32)
  return _safe_divide(jnp.sum(pixel_weight * per_pixel), jnp.sum(mask))


def dice_loss(logits: Array, labels: Array, ignore_index: int = 255, smooth: float = 1.0) -> Array:
  """Soft Dice loss over the whole batch.

  C > 1 channels: p = softmax(logits), t = one_hot(labels); for each class c, with sums over all valid pixels of the
  batch, dice_c = (2 * sum p_c t_c + smooth) / (sum p_c + sum t_c + smooth); the loss is mean_c (1 - dice_c).
  One channel: p = sigmoid(logits), t = labels, and the loss is 1 - dice of that foreground channel only.

  This is segmentation_models_pytorch's DiceLoss (multiclass/binary mode, from_logits=True, log_loss=False,
  reduction over dims (batch, pixels)) except that SMP zeroes the term of classes absent from the batch's labels
  while still dividing by C; here every class counts, so `smooth` > 0 rewards predicting nothing for an absent class
  (dice_c -> 1). A class with no probability mass and no label pixels gets dice 1 even when smooth = 0.
  Summing over the batch rather than averaging per image keeps the value independent of how the batch is sharded.
  """
  _check_shapes("dice_loss", logits, labels, None)
  num_channels = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  valid = labels != ignore_index
  safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  mask = valid[..., None].astype(jnp.float32)
  if num_channels == 1:
    probs = jax.nn.sigmoid(logits)
    target = safe_labels[..., None].astype(jnp.float32)
  else:
    probs = jax.nn.softmax(logits, axis=-1)
    target = jax.nn.one_hot(safe_labels, num_channels, dtype=jnp.float32)
  probs, target = probs * mask, target * mask
  axes = (0, 1, 2)
  intersection = jnp.sum(probs * target, axis=axes)
  cardinality = jnp.sum(probs + target, axis=axes)
  denominator = cardinality + smooth
  dice = jnp.where(denominator > 0, (2.0 * intersection + smooth) / jnp.where(denominator > 0, denominator, 1.0),
                   1.0)
  return jnp.mean(1.0 - dice)


def _term(name: str, logits: Array, labels: Array, loss_config: Any, weights: Array | None) -> Array:
  if name == "cross_entropy":
    if logits.shape[-1] == 1:
      raise ValueError(f"losses: loss '{loss_config.name}' needs C > 1 logit channels, got {logits.shape}; "
                       "use 'bce' or 'bce+dice' for a one-channel model")
    return cross_entropy(logits, labels, ignore_index=loss_config.ignore_index, weights=weights,
                         class_weights=loss_config.get("class_weights"),
                         label_smoothing=loss_config.get("label_smoothing", 0.0))
  if name == "bce":
    if logits.shape[-1] != 1:
      raise ValueError(f"losses: loss '{loss_config.name}' needs one logit channel, got {logits.shape}; "
                       "use 'cross_entropy' or 'ce+dice' for C-class logits")
    return binary_cross_entropy(logits, labels, ignore_index=loss_config.ignore_index, weights=weights,
                                pos_weight=loss_config.get("pos_weight"))
  return dice_loss(logits, labels, ignore_index=loss_config.ignore_index,
                   smooth=loss_config.get("dice_smooth", 1.0))


def segmentation_loss(outputs: Mapping[str, Array], labels: Array, loss_config: Any,
                      weights: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """The training objective for a model's output dict, as torchvision's references/segmentation criterion.

  loss = L(outputs['out']) + aux_weight * L(outputs['aux'])  (the aux term only when the model has an aux head),
  where L is the sum of the terms named by loss_config.name (see LOSS_TERMS); in the combined losses the Dice term
  is multiplied by loss_config.dice_weight. Per-pixel `weights` apply to the cross-entropy and BCE terms (Dice has
  no per-pixel weighting).

  Returns (loss, parts) with parts['loss'] = loss, parts['out'] / parts['aux'] the per-head totals and
  parts['out/<term>'] / parts['aux/<term>'] each unweighted term, all float32 scalars ready for logging.
  """
  if loss_config.name not in LOSS_TERMS:
    raise ValueError(f"losses: loss_config.name = {loss_config.name!r} is not one of {sorted(LOSS_TERMS)}")
  if "out" not in outputs:
    raise ValueError(f"losses: model outputs must contain 'out', got keys {sorted(outputs)}")
  terms = LOSS_TERMS[loss_config.name]
  dice_weight = loss_config.get("dice_weight", 1.0) if len(terms) > 1 else 1.0
  heads = [("out", 1.0)]
  aux_weight = loss_config.get("aux_weight", 0.5)
  if "aux" in outputs and aux_weight:
    heads.append(("aux", aux_weight))

  parts = {}
  total = jnp.zeros((), jnp.float32)
  for head, head_weight in heads:
    head_loss = jnp.zeros((), jnp.float32)
    for term in terms:
      value = _term(term, outputs[head], labels, loss_config, weights)
      parts[f"{head}/{term}"] = value
      head_loss = head_loss + (dice_weight if term == "dice" else 1.0) * value
    parts[head] = head_loss
    total = total + head_weight * head_loss
  parts["loss"] = total
  return total, parts
