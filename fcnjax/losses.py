"""Segmentation losses on NHWC logits: cross-entropy, binary cross-entropy, soft Dice, and the losses of
segmentation_models_pytorch (smp 0.6.0): focal, soft Jaccard, Tversky and Lovasz.

Conventions shared by every function here:
- `logits` are (N, H, W, C) for a C-class softmax model or (N, H, W, 1) for a binary sigmoid model, in any float
  dtype; the loss is always computed in float32 (bfloat16 logits are upcast first).
- `labels` are int (N, H, W); pixels equal to `ignore_index` (255 by default, VOC's "void") take no part. The smp
  losses also take smp's multilabel targets: (N, H, W, C) 0/1 maps, one per logit channel.
- `weights` is an optional float (N, H, W) per-pixel weight map (the U-Net paper's border weights).
- Means are taken over the VALID pixels of the whole batch (a sum divided by a sum), never a mean of per-device or
  per-image means, so a data-parallel step over any number of devices gives the same value as one device. A batch
  with no valid pixel gives 0, not NaN, so an all-void crop cannot poison the parameters.

The smp losses take smp's `mode`: 'multiclass' (softmax channels, integer labels), 'binary' (one sigmoid channel,
0/1 labels) or 'multilabel' (C sigmoid channels, (N, H, W, C) targets); mode=None reads it from the shapes. Each
keeps smp's defaults and its quirks, stated in its docstring, so a value computed here is the value smp computes on
the same NCHW tensors (tests/test_smp_losses.py).

All functions are pure and jittable; shapes are checked at trace time.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections

Array = jax.Array

# The terms a `loss_config.name` may join with '+' ('ce' is short for cross_entropy), and the logit channels each
# needs: cross-entropy C > 1, BCE exactly 1, the others either (one channel is smp's binary mode).
TERMS = ("cross_entropy", "bce", "dice", "focal", "jaccard", "tversky", "lovasz")
MULTICLASS_ONLY = ("cross_entropy",)
BINARY_ONLY = ("bce",)


def loss_terms(name: str) -> tuple[str, ...]:
  """The terms of a loss name: 'ce+dice' -> ('cross_entropy', 'dice'), 'focal' -> ('focal',)."""
  terms = tuple("cross_entropy" if term == "ce" else term for term in name.split("+"))
  unknown = [term for term in terms if term not in TERMS]
  if unknown or len(set(terms)) != len(terms):
    raise ValueError(f"losses: loss_config.name = {name!r} is not one of {TERMS} or several of them joined by '+' "
                     "('ce' for cross_entropy), each once")
  return terms


def fits(name: str, binary: bool) -> bool:
  """Whether every term of loss `name` takes a binary (one-channel) or a multi-class model's logits."""
  refused = MULTICLASS_ONLY if binary else BINARY_ONLY
  return not any(term in refused for term in loss_terms(name))


def default_config() -> ml_collections.ConfigDict:
  """The `loss` section of an experiment config, with every key segmentation_loss reads."""
  config = ml_collections.ConfigDict()
  config.name = "cross_entropy"  # one of TERMS, or several joined by '+' ('ce+dice', 'focal+jaccard')
  config.ignore_index = 255
  # torchvision's references/segmentation/train.py: criterion = out + 0.5 * aux.
  config.aux_weight = 0.5
  # Optional sequence of C floats: torch's `weight=` for cross_entropy, smp's class_weights for focal, jaccard and
  # tversky (a weighted mean of the per-class losses).
  config.class_weights = None
  config.label_smoothing = 0.0
  config.pos_weight = None  # optional float, torch's BCEWithLogitsLoss(pos_weight=) for 'bce'
  config.dice_weight = 1.0  # coefficient of the Dice term in a combination such as 'ce+dice' / 'bce+dice'
  config.dice_smooth = 1.0
  # The smp losses, with smp's defaults; <term>_weight is the term's coefficient in a combination.
  config.focal_weight = 1.0
  config.focal_alpha = None
  config.focal_gamma = 2.0
  config.focal_normalized = False
  config.focal_reduced_threshold = None
  config.focal_reduction = "mean"
  config.jaccard_weight = 1.0
  config.jaccard_smooth = 0.0
  config.jaccard_log_loss = False
  config.tversky_weight = 1.0
  config.tversky_alpha = 0.5
  config.tversky_beta = 0.5
  config.tversky_gamma = 1.0
  config.tversky_smooth = 0.0
  config.tversky_log_loss = False
  config.lovasz_weight = 1.0
  config.lovasz_per_image = False
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


SMP_MODES = ("binary", "multiclass", "multilabel")


def _smp_inputs(fn: str, logits: Array, labels: Array, mode: str | None, ignore_index: int | None):
  """(logits as float32, mode, targets (N, H, W, C) float 0/1, valid (N, H, W, C) float) for an smp loss."""
  if logits.ndim != 4:
    raise ValueError(f"losses.{fn}: logits must be NHWC (N, H, W, C), got shape {logits.shape}")
  if mode is None:
    mode = "multilabel" if labels.ndim == 4 else "binary" if logits.shape[-1] == 1 else "multiclass"
  if mode not in SMP_MODES:
    raise ValueError(f"losses.{fn}: mode={mode!r} is not one of {SMP_MODES}")
  num_channels = logits.shape[-1]
  want = logits.shape if mode == "multilabel" else logits.shape[:3]
  if labels.shape != want:
    raise ValueError(f"losses.{fn}: {mode} labels must have shape {want} to match logits {logits.shape}, "
                     f"got {labels.shape}")
  if mode == "binary" and num_channels != 1:
    raise ValueError(f"losses.{fn}: binary mode needs one logit channel, got {logits.shape}")
  valid = jnp.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
  if mode == "multiclass":
    safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
    target = jax.nn.one_hot(safe_labels, num_channels, dtype=jnp.float32)
    valid = jnp.broadcast_to(valid[..., None], logits.shape)
  else:
    target = jnp.where(valid, labels, 0).astype(jnp.float32)
    if mode == "binary":
      target, valid = target[..., None], valid[..., None]
  return logits.astype(jnp.float32), mode, target, valid.astype(jnp.float32)


def _class_weighted_mean(fn: str, per_class: Array, mode: str, class_weights) -> Array:
  """smp's reduction of per-class losses: their mean, or sum(w_c * loss_c) / sum(w_c) with class weights."""
  if class_weights is None:
    return jnp.mean(per_class)
  if mode == "binary":
    raise ValueError(f"losses.{fn}: class_weights need multiclass or multilabel mode (smp refuses them for binary)")
  class_weights = jnp.asarray(class_weights, jnp.float32)
  if class_weights.shape != per_class.shape:
    raise ValueError(f"losses.{fn}: class_weights must have shape {per_class.shape}, got {class_weights.shape}")
  return jnp.sum(per_class * class_weights) / jnp.sum(class_weights)


def focal_loss(logits: Array, labels: Array, mode: str | None = None, ignore_index: int | None = 255,
               alpha: float | None = None, gamma: float = 2.0, normalized: bool = False,
               reduced_threshold: float | None = None, reduction: str = "mean",
               class_weights: Sequence[float] | Array | None = None, from_logits: bool = True,
               eps: float = 1e-7) -> Array:
  """smp's FocalLoss(mode, alpha, gamma, ignore_index, from_logits, eps, reduction, normalized, reduced_threshold,
  class_weights), with smp's defaults.

  In every mode the loss is a sigmoid focal loss per channel: channel c's logit x against t = (label == c)
  (multiclass, one-vs-rest, no softmax), the 0/1 label (binary), or target channel c (multilabel). Per valid pixel,
  with bce = BCE-with-logits(x, t) and p_t = exp(-bce): term = (1 - p_t)^gamma * bce, where the focal factor is
  ((1 - p_t) / reduced_threshold)^gamma but 1 below p_t < reduced_threshold when that is set; times
  alpha * t + (1 - alpha) * (1 - t) when alpha is set; divided by max(sum of the channel's focal factors, 1e-6)
  when normalized (smp's functional eps, not `eps`). Each channel's terms are averaged ('mean') or summed ('sum')
  over its valid pixels, and the channel losses averaged (or weighted by class_weights, over their sum).

  from_logits=False takes probabilities clamped to [eps, 1 - eps] and, as smp does, turns them into logits by
  log(p / (1 - p)) in binary and multilabel mode but by log(p) in multiclass mode. A channel with no valid pixel
  contributes 0 (smp's mean of an empty set is NaN).
  """
  if reduction not in ("mean", "sum"):
    raise ValueError(f"losses.focal_loss: reduction={reduction!r} is not one of ('mean', 'sum')")
  x, mode, target, valid = _smp_inputs("focal_loss", logits, labels, mode, ignore_index)
  if not from_logits:
    p = jnp.clip(x, eps, 1.0 - eps)
    x = jnp.log(p) if mode == "multiclass" else jnp.log(p / (1.0 - p))
  log_pt = (1.0 - target) * x + jnp.log1p(jnp.exp(-jnp.abs(x))) + jnp.maximum(-x, 0.0)  # BCE with logits
  pt = jnp.exp(-log_pt)
  if reduced_threshold is None:
    focal_term = (1.0 - pt) ** gamma
  else:
    focal_term = jnp.where(pt < reduced_threshold, 1.0, ((1.0 - pt) / reduced_threshold) ** gamma)
  loss = focal_term * log_pt
  if alpha is not None:
    loss = loss * (alpha * target + (1.0 - alpha) * (1.0 - target))
  axes = (0, 1, 2)
  if normalized:
    loss = loss / jnp.maximum(jnp.sum(focal_term * valid, axis=axes), 1e-6)
  per_class = jnp.sum(loss * valid, axis=axes)
  if reduction == "mean":
    per_class = _safe_divide(per_class, jnp.sum(valid, axis=axes))
  return _class_weighted_mean("focal_loss", per_class, mode, class_weights)


def _soft_overlap_loss(fn: str, logits: Array, labels: Array, mode: str | None, ignore_index: int | None,
                       alpha: float, beta: float, smooth: float, eps: float, log_loss: bool,
                       classes: Sequence[int] | None, class_weights, from_logits: bool) -> Array:
  """Per-class Tversky losses over the batch, smp's DiceLoss.forward up to its aggregate_loss."""
  x, mode, target, valid = _smp_inputs(fn, logits, labels, mode, ignore_index)
  if classes is not None and mode == "binary":
    raise ValueError(f"losses.{fn}: classes need multiclass or multilabel mode (smp refuses them for binary)")
  if not from_logits:
    probs = x
  elif mode == "multiclass":
    probs = jax.nn.softmax(x, axis=-1)
  else:
    probs = jax.nn.sigmoid(x)
  probs, target = probs * valid, target * valid
  axes = (0, 1, 2)
  # smp's true positives are (sum p + sum t - sum |p - t|) / 2 = sum min(p, t): sum p * t for 0/1 targets, the
  # fuzzy intersection for soft ones, and at p == t the same half gradient as torch's |.| (sign(0) = 0).
  intersection = jnp.sum(jnp.minimum(probs, target), axis=axes)
  false_pos = jnp.sum(probs, axis=axes) - intersection
  false_neg = jnp.sum(target, axis=axes) - intersection
  score = (intersection + smooth) / jnp.maximum(intersection + alpha * false_pos + beta * false_neg + smooth, eps)
  loss = -jnp.log(jnp.maximum(score, eps)) if log_loss else 1.0 - score
  # smp zeroes the loss of a class absent from the batch's labels but still averages over every class.
  loss = jnp.where(jnp.sum(target, axis=axes) > 0, loss, 0.0)
  if classes is not None:
    classes = jnp.asarray(classes, jnp.int32)
    loss = loss[classes]
    if class_weights is not None:
      class_weights = jnp.asarray(class_weights, jnp.float32)[classes]
  return _class_weighted_mean(fn, loss, mode, class_weights)


def jaccard_loss(logits: Array, labels: Array, mode: str | None = None, ignore_index: int | None = 255,
                 smooth: float = 0.0, eps: float = 1e-7, log_loss: bool = False,
                 classes: Sequence[int] | None = None, class_weights: Sequence[float] | Array | None = None,
                 from_logits: bool = True) -> Array:
  """smp's JaccardLoss(mode, classes, log_loss, from_logits, smooth, ignore_index, eps, class_weights).

  p = softmax (multiclass) or sigmoid (binary, multilabel) of the logits, or the input itself when from_logits is
  False; t the one-hot / 0/1 targets; both zero on ignored pixels. Per class, over every valid pixel of the batch:
  iou_c = (I + smooth) / max(I + FP + FN + smooth, eps) with I = sum min(p, t), FP = sum p - I, FN = sum t - I;
  loss_c = 1 - iou_c, or -log(max(iou_c, eps)) with log_loss. As in smp, a class with no target pixel in the batch
  has loss_c = 0 yet counts in the mean over classes; `classes` keeps only those channels, class_weights weight them.
  """
  return _soft_overlap_loss("jaccard_loss", logits, labels, mode, ignore_index, 1.0, 1.0, smooth, eps, log_loss,
                            classes, class_weights, from_logits)


def tversky_loss(logits: Array, labels: Array, mode: str | None = None, ignore_index: int | None = 255,
                 alpha: float = 0.5, beta: float = 0.5, gamma: float = 1.0, smooth: float = 0.0, eps: float = 1e-7,
                 log_loss: bool = False, classes: Sequence[int] | None = None,
                 class_weights: Sequence[float] | Array | None = None, from_logits: bool = True) -> Array:
  """smp's TverskyLoss(mode, classes, log_loss, from_logits, smooth, ignore_index, eps, alpha, beta, gamma,
  class_weights): jaccard_loss's per-class losses with score (I + smooth) / max(I + alpha FP + beta FN + smooth,
  eps), alpha weighing false positives and beta false negatives; the (weighted) mean over classes is raised to
  `gamma`. alpha = beta = 0.5, gamma = 1 is smp's DiceLoss exactly (unlike dice_loss, which averages absent classes
  in and defaults to smooth = 1).
  """
  loss = _soft_overlap_loss("tversky_loss", logits, labels, mode, ignore_index, alpha, beta, smooth, eps, log_loss,
                            classes, class_weights, from_logits)
  return loss ** gamma


def _whole(x: Array) -> Array:
  """`x` with no axis split over devices. Sorting needs a whole axis on each device, which an array sharded over
  jax.make_mesh's Explicit axes does not have; with Auto axes or one device `x` is returned as it is."""
  if any(axis is not None for axis in jax.typeof(x).sharding.spec):
    return jax.sharding.reshard(x, jax.sharding.PartitionSpec())
  return x


def _lovasz_extension(errors: Array, foreground: Array, valid: Array) -> Array:
  """The Lovasz extension of the Jaccard loss at 1-D `errors` (Berman et al. 2018, Alg. 1), over valid entries.

  Valid errors are sorted in decreasing order; the weight of the k-th is the Jaccard loss of the k largest minus
  that of the k - 1 largest, computed from the labels alone (no gradient flows through the order or the weights).
  Invalid entries sort last and add nothing to the union, so their weights are 0; with no valid entry the loss is 0.
  """
  order = jnp.argsort(jnp.where(valid > 0, -errors, jnp.inf))
  errors, foreground, valid = errors[order], (foreground * valid)[order], valid[order]
  num_foreground = jnp.sum(foreground)
  intersection = num_foreground - jnp.cumsum(foreground)
  union = num_foreground + jnp.cumsum((1.0 - foreground) * valid)
  jaccard = 1.0 - _safe_divide(intersection, union)
  weights = jax.lax.stop_gradient(jnp.diff(jaccard, prepend=0.0))
  return jnp.sum(errors * valid * weights)


def _lovasz_softmax_flat(probs: Array, target: Array, valid: Array) -> Array:
  """Mean over the classes present among the valid pixels of the Lovasz extension of |t_c - p_c| (smp's
  classes='present'); (P, C) probabilities and targets, (P,) validity."""
  per_class = jax.vmap(_lovasz_extension, in_axes=(1, 1, None))(jnp.abs(target - probs), target, valid)
  present = jnp.sum(target * valid[:, None], axis=0) > 0
  return _safe_divide(jnp.sum(jnp.where(present, per_class, 0.0)), jnp.sum(present.astype(jnp.float32)))


def _lovasz_hinge_flat(logits: Array, target: Array, valid: Array) -> Array:
  """The Lovasz extension of the hinge errors max(1 - x * (2t - 1), 0); (P,) inputs."""
  errors = jax.nn.relu(1.0 - logits * (2.0 * target - 1.0))
  return _lovasz_extension(errors, target, valid)


def lovasz_loss(logits: Array, labels: Array, mode: str | None = None, ignore_index: int | None = 255,
                per_image: bool = False) -> Array:
  """smp's LovaszLoss(mode, per_image, ignore_index).

  Multiclass: Lovasz-Softmax on softmax probabilities, averaged over the classes present in the valid labels.
  Binary and multilabel: the Lovasz hinge, with every channel of the batch flattened into one binary problem (so a
  multilabel batch is one set of N*H*W*C predictions, as smp does). per_image: the loss of each image separately,
  averaged over the images; an image with no valid pixel counts as 0. Takes logits only: smp's `from_logits`
  argument is accepted and never read there.
  """
  x, mode, target, valid = _smp_inputs("lovasz_loss", logits, labels, mode, ignore_index)
  if mode == "multiclass":
    probs = jax.nn.softmax(x, axis=-1)
    num_classes = x.shape[-1]
    flat = lambda a: a.reshape(-1, num_classes)
    loss_fn = lambda p, t, v: _lovasz_softmax_flat(flat(p), flat(t), flat(v)[:, 0])
    inputs = (probs, target, valid)
  else:
    loss_fn = lambda p, t, v: _lovasz_hinge_flat(p.reshape(-1), t.reshape(-1), v.reshape(-1))
    inputs = (x, target, valid)
  inputs = tuple(_whole(a) for a in inputs)
  if per_image:
    return jnp.mean(jax.vmap(loss_fn)(*inputs))
  return loss_fn(*inputs)


def _term(name: str, logits: Array, labels: Array, loss_config: Any, weights: Array | None) -> Array:
  get = loss_config.get
  ignore_index = loss_config.ignore_index
  if name == "cross_entropy":
    if logits.shape[-1] == 1:
      raise ValueError(f"losses: loss '{loss_config.name}' needs C > 1 logit channels, got {logits.shape}; "
                       "use a loss without cross_entropy ('bce', 'bce+dice') for a one-channel model")
    return cross_entropy(logits, labels, ignore_index=ignore_index, weights=weights,
                         class_weights=get("class_weights"), label_smoothing=get("label_smoothing", 0.0))
  if name == "bce":
    if logits.shape[-1] != 1:
      raise ValueError(f"losses: loss '{loss_config.name}' needs one logit channel, got {logits.shape}; "
                       "use a loss without bce ('cross_entropy', 'ce+dice') for C-class logits")
    return binary_cross_entropy(logits, labels, ignore_index=ignore_index, weights=weights,
                                pos_weight=get("pos_weight"))
  if name == "dice":
    return dice_loss(logits, labels, ignore_index=ignore_index, smooth=get("dice_smooth", 1.0))
  # smp's class_weights are refused in binary mode; a binary model's config has no use for class weights.
  class_weights = get("class_weights") if logits.shape[-1] > 1 else None
  if name == "focal":
    return focal_loss(logits, labels, ignore_index=ignore_index, alpha=get("focal_alpha"),
                      gamma=get("focal_gamma", 2.0), normalized=get("focal_normalized", False),
                      reduced_threshold=get("focal_reduced_threshold"), reduction=get("focal_reduction", "mean"),
                      class_weights=class_weights)
  if name == "jaccard":
    return jaccard_loss(logits, labels, ignore_index=ignore_index, smooth=get("jaccard_smooth", 0.0),
                        log_loss=get("jaccard_log_loss", False), class_weights=class_weights)
  if name == "tversky":
    return tversky_loss(logits, labels, ignore_index=ignore_index, alpha=get("tversky_alpha", 0.5),
                        beta=get("tversky_beta", 0.5), gamma=get("tversky_gamma", 1.0),
                        smooth=get("tversky_smooth", 0.0), log_loss=get("tversky_log_loss", False),
                        class_weights=class_weights)
  return lovasz_loss(logits, labels, ignore_index=ignore_index, per_image=get("lovasz_per_image", False))


def segmentation_loss(outputs: Mapping[str, Array], labels: Array, loss_config: Any,
                      weights: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """The training objective for a model's output dict, as torchvision's references/segmentation criterion.

  loss = L(outputs['out']) + aux_weight * L(outputs['aux'])  (the aux term only when the model has an aux head),
  where L is the sum of the terms named by loss_config.name (see loss_terms); in a combination each term other than
  cross_entropy and bce is multiplied by loss_config.<term>_weight (dice_weight, focal_weight, ...). Per-pixel
  `weights` apply to the cross-entropy and BCE terms (the overlap losses have no per-pixel weighting, nor has smp's
  focal loss). The smp terms run in binary mode for one logit channel, multiclass mode otherwise.

  Returns (loss, parts) with parts['loss'] = loss, parts['out'] / parts['aux'] the per-head totals and
  parts['out/<term>'] / parts['aux/<term>'] each unweighted term, all float32 scalars ready for logging.
  """
  if "out" not in outputs:
    raise ValueError(f"losses: model outputs must contain 'out', got keys {sorted(outputs)}")
  terms = loss_terms(loss_config.name)
  # Alone, a term is the loss; in a combination the others are scaled to cross-entropy's or BCE's unit weight.
  scaled = [term for term in terms if len(terms) > 1 and term not in ("cross_entropy", "bce")]
  coefficients = {term: loss_config.get(f"{term}_weight", 1.0) if term in scaled else 1.0 for term in terms}
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
      head_loss = head_loss + coefficients[term] * value
    parts[head] = head_loss
    total = total + head_weight * head_loss
  parts["loss"] = total
  return total, parts
