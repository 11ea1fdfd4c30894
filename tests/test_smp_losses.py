"""fcnjax's focal, Jaccard, Tversky and Lovasz losses against segmentation_models_pytorch's own, values and
gradients (jax.grad against torch autograd), on NHWC logits moved to NCHW for smp."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from segmentation_models_pytorch import losses as smp_losses

from fcnjax import losses

IGNORE = 255


def _batch(seed, mode, n=2, h=6, w=7, c=4, ignore_fraction=0.2):
  rng = np.random.default_rng(seed)
  c = 1 if mode == "binary" else c
  logits = rng.normal(0.0, 2.0, size=(n, h, w, c)).astype(np.float32)
  if mode == "multilabel":
    labels = rng.integers(0, 2, size=(n, h, w, c))
  else:
    labels = rng.integers(0, 2 if mode == "binary" else c, size=(n, h, w))
  labels[rng.random(labels.shape) < ignore_fraction] = IGNORE
  return logits, labels.astype(np.int32)


def _ours(fn, logits, labels, **kwargs):
  value, grad = jax.jit(jax.value_and_grad(lambda x: fn(x, jnp.asarray(labels), **kwargs)))(jnp.asarray(logits))
  return float(value), np.asarray(grad)


def _smp(loss, logits, labels, mode):
  x = torch.from_numpy(np.moveaxis(logits, -1, 1).copy()).requires_grad_()  # NHWC -> NCHW
  y = labels if mode != "multilabel" else np.moveaxis(labels, -1, 1)
  value = loss(x, torch.from_numpy(y.astype(np.int64)))
  value.backward()
  return value.item(), np.moveaxis(x.grad.numpy(), 1, -1)


def _assert_matches(ours, ref):
  (value, grad), (ref_value, ref_grad) = ours, ref
  assert np.isfinite(ref_value)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-7)
  assert np.abs(ref_grad).max() > 0
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-5 * np.abs(ref_grad).max())


def _compare(fn, smp_cls, mode, seed, ignore=True, ours_kwargs=None, smp_kwargs=None, **batch_kwargs):
  """Our loss with ignore_index=255 against smp's with ignore_index=255 (ignored pixels present) or None (none).
  Ours reads the mode from the shapes; smp is told it."""
  logits, labels = _batch(seed, mode, ignore_fraction=0.2 if ignore else 0.0, **batch_kwargs)
  if ignore:
    assert (labels == IGNORE).any()
  kwargs = dict(ours_kwargs or {}, **(smp_kwargs or {}))
  ref = _smp(smp_cls(mode, ignore_index=IGNORE if ignore else None, **kwargs), logits, labels, mode)
  _assert_matches(_ours(fn, logits, labels, ignore_index=IGNORE, **kwargs), ref)


MODES = ["multiclass", "binary", "multilabel"]
# The fast subset keeps one multiclass case per loss; the other modes and options run in the full suite.
FAST_MODES = [MODES[0]] + [pytest.param(mode, marks=pytest.mark.slow) for mode in MODES[1:]]


# No multilabel case with ignored pixels: smp's multilabel FocalLoss indexes each channel with the (N, C, H, W)
# mask and fails.
@pytest.mark.parametrize("mode, ignore", [("multiclass", True)] + [
    pytest.param(*case, marks=pytest.mark.slow)
    for case in (("multiclass", False), ("binary", True), ("binary", False), ("multilabel", False))])
def test_focal_matches_smp(mode, ignore):
  _compare(losses.focal_loss, smp_losses.FocalLoss, mode, seed=1, ignore=ignore)


@pytest.mark.slow
@pytest.mark.parametrize("mode, options", [
    ("multiclass", dict(alpha=0.25, gamma=1.5, class_weights=[0.5, 2.0, 1.0, 3.0])),
    ("multiclass", dict(normalized=True)),
    ("multiclass", dict(reduced_threshold=0.5, reduction="sum")),
    ("binary", dict(alpha=0.8, normalized=True)),
    ("multiclass", dict(from_logits=False)),
    ("binary", dict(from_logits=False, alpha=0.25)),
])
def test_focal_options_match_smp(mode, options):
  if options.get("from_logits") is False:
    logits, labels = _batch(2, mode)
    probs = jax.nn.softmax(logits, -1) if mode == "multiclass" else jax.nn.sigmoid(logits)
    probs = np.asarray(probs)
    ref = _smp(smp_losses.FocalLoss(mode, ignore_index=IGNORE, **options), probs, labels, mode)
    _assert_matches(_ours(losses.focal_loss, probs, labels, mode=mode, **options), ref)
  else:
    _compare(losses.focal_loss, smp_losses.FocalLoss, mode, seed=2, ours_kwargs=options)


@pytest.mark.parametrize("mode", FAST_MODES)
def test_jaccard_matches_smp(mode):
  _compare(losses.jaccard_loss, smp_losses.JaccardLoss, mode, seed=3)


@pytest.mark.slow
@pytest.mark.parametrize("mode, options", [
    ("multiclass", dict(smooth=1.0, log_loss=True)),
    ("multiclass", dict(classes=[0, 2, 3], class_weights=[1.0, 5.0, 0.5, 2.0])),
    ("binary", dict(smooth=0.5)),
    ("multilabel", dict(log_loss=True, class_weights=[1.0, 2.0, 3.0, 4.0])),
    ("multiclass", dict(from_logits=False)),
])
def test_jaccard_options_match_smp(mode, options):
  if options.get("from_logits") is False:
    logits, labels = _batch(4, mode)
    probs = np.asarray(jax.nn.softmax(logits, -1))
    ref = _smp(smp_losses.JaccardLoss(mode, ignore_index=IGNORE, **options), probs, labels, mode)
    _assert_matches(_ours(losses.jaccard_loss, probs, labels, mode=mode, **options), ref)
  else:
    _compare(losses.jaccard_loss, smp_losses.JaccardLoss, mode, seed=4, ours_kwargs=options)


@pytest.mark.slow
@pytest.mark.parametrize("mode, ignore", [("multiclass", True), ("binary", True), ("multilabel", False)])
def test_tversky_matches_smp(mode, ignore):
  _compare(losses.tversky_loss, smp_losses.TverskyLoss, mode, seed=5, ignore=ignore,
           ours_kwargs=dict(alpha=0.3, beta=0.7, gamma=1.5, smooth=0.1))


@pytest.mark.parametrize("mode", FAST_MODES)
def test_tversky_at_one_half_is_smp_dice(mode):
  logits, labels = _batch(6, mode)
  ref = _smp(smp_losses.DiceLoss(mode, ignore_index=IGNORE), logits, labels, mode)
  _assert_matches(_ours(losses.tversky_loss, logits, labels, mode=mode), ref)


@pytest.mark.slow
def test_absent_class_has_zero_overlap_loss_as_in_smp():
  logits, labels = _batch(7, "multiclass")
  labels[labels == 2] = 0  # class 2 absent: smp zeroes its term but still divides by C
  for fn, smp_cls in ((losses.jaccard_loss, smp_losses.JaccardLoss), (losses.tversky_loss, smp_losses.DiceLoss)):
    ref = _smp(smp_cls("multiclass", ignore_index=IGNORE), logits, labels, "multiclass")
    value, grad = _ours(fn, logits, labels)
    _assert_matches((value, grad), ref)
    per_class = jax.jit(lambda x, y: [fn(x, y, classes=[c]) for c in range(4)])(logits, labels)
    per_class = [float(v) for v in per_class]
    assert per_class[2] == 0.0 and min(per_class[:2] + per_class[3:]) > 0.0
    np.testing.assert_allclose(value, np.mean(per_class), rtol=1e-6)


@pytest.mark.parametrize("mode", FAST_MODES)
@pytest.mark.parametrize("per_image", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_lovasz_matches_smp(mode, per_image):
  _compare(losses.lovasz_loss, smp_losses.LovaszLoss, mode, seed=8, ours_kwargs=dict(per_image=per_image))


@pytest.mark.slow
def test_lovasz_without_ignored_pixels_and_absent_class():
  logits, labels = _batch(9, "multiclass", ignore_fraction=0.0)
  labels[labels == 1] = 3  # Lovasz-Softmax averages over the classes present only
  ref = _smp(smp_losses.LovaszLoss("multiclass"), logits, labels, "multiclass")
  _assert_matches(_ours(losses.lovasz_loss, logits, labels), ref)


@pytest.mark.slow
def test_all_ignored_batch_gives_zero_and_finite_gradients():
  per_image = lambda x, y: losses.lovasz_loss(x, y, per_image=True)  # noqa: E731
  normalized = lambda x, y: losses.focal_loss(x, y, normalized=True)  # noqa: E731
  cases = {"multiclass": (losses.focal_loss, losses.jaccard_loss, losses.tversky_loss, losses.lovasz_loss, per_image,
                          normalized),
           "binary": (losses.focal_loss, losses.lovasz_loss),  # the hinge
           "multilabel": (losses.jaccard_loss,)}
  for mode, fns in cases.items():
    logits, labels = _batch(11, mode)
    labels[:] = IGNORE
    values_and_grads = jax.jit(lambda x, y: [jax.value_and_grad(fn)(x, y) for fn in fns])
    for value, grad in values_and_grads(jnp.asarray(logits), jnp.asarray(labels)):
      assert float(value) == 0.0
      assert np.all(np.asarray(grad) == 0.0)


def test_smp_loss_errors():
  logits, labels = _batch(12, "multiclass")
  x, y = jnp.asarray(logits), jnp.asarray(labels)
  trace = lambda fn, *args, **kwargs: jax.eval_shape(lambda: fn(*args, **kwargs))  # errors come at trace time
  with pytest.raises(ValueError, match="binary mode needs one logit channel"):
    trace(losses.jaccard_loss, x, y, mode="binary")
  with pytest.raises(ValueError, match=r"multilabel labels must have shape \(2, 6, 7, 4\)"):
    trace(losses.lovasz_loss, x, y, mode="multilabel")
  with pytest.raises(ValueError, match="mode='multi' is not one of"):
    trace(losses.focal_loss, x, y, mode="multi")
  with pytest.raises(ValueError, match=r"class_weights must have shape \(4,\)"):
    trace(losses.focal_loss, x, y, class_weights=[1.0, 2.0])
  with pytest.raises(ValueError, match="class_weights need multiclass or multilabel mode"):
    trace(losses.tversky_loss, x[..., :1], y, class_weights=[1.0])
  with pytest.raises(ValueError, match="reduction='none' is not one of"):
    trace(losses.focal_loss, x, y, reduction="none")


def _config(**overrides):
  config = losses.default_config()
  config.update(overrides)
  return config


@pytest.mark.parametrize("name, channels, smp_terms", [
    ("focal+dice", 4, [("focal", lambda: smp_losses.FocalLoss("multiclass", ignore_index=IGNORE, gamma=1.0), 0.5)]),
    pytest.param("ce+lovasz", 4, [("lovasz", lambda: smp_losses.LovaszLoss("multiclass", ignore_index=IGNORE,
                                                                            per_image=True), 0.3)],
                 marks=pytest.mark.slow),
    pytest.param("bce+jaccard", 1, [("jaccard", lambda: smp_losses.JaccardLoss("binary", ignore_index=IGNORE,
                                                                               smooth=1.0), 2.0)],
                 marks=pytest.mark.slow),
    pytest.param("tversky", 4, [("tversky", lambda: smp_losses.TverskyLoss(
        "multiclass", ignore_index=IGNORE, alpha=0.7, beta=0.3, class_weights=[1.0, 2.0, 3.0, 4.0]), 1.0)],
                 marks=pytest.mark.slow),
])
def test_segmentation_loss_selects_smp_terms(name, channels, smp_terms):
  mode = "binary" if channels == 1 else "multiclass"
  logits, labels = _batch(13, mode, c=channels)
  config = _config(name=name, focal_gamma=1.0, focal_weight=0.5, lovasz_per_image=True, lovasz_weight=0.3,
                   jaccard_smooth=1.0, jaccard_weight=2.0, tversky_alpha=0.7, tversky_beta=0.3, tversky_weight=9.0,
                   class_weights=(1.0, 2.0, 3.0, 4.0) if name == "tversky" else None)
  loss, parts = jax.jit(lambda o, y: losses.segmentation_loss({"out": o}, y, config))(jnp.asarray(logits),
                                                                                       jnp.asarray(labels))
  want = 0.0
  for term, make, coefficient in smp_terms:
    value, _ = _smp(make(), logits, labels, mode)
    np.testing.assert_allclose(float(parts[f"out/{term}"]), value, rtol=1e-5)
    want += coefficient * value
  for term in losses.loss_terms(name):
    if term not in [t for t, _, _ in smp_terms]:  # cross-entropy, BCE and Dice are tested in test_losses.py
      want += float(parts[f"out/{term}"]) * (config.get(f"{term}_weight", 1.0) if term == "dice" else 1.0)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_loss_names_and_fit():
  assert losses.loss_terms("ce+lovasz") == ("cross_entropy", "lovasz")
  assert losses.loss_terms("focal") == ("focal",)
  assert losses.fits("bce+lovasz", binary=True) and losses.fits("focal+jaccard", binary=False)
  assert not losses.fits("ce+jaccard", binary=True) and not losses.fits("bce", binary=False)
  for bad in ("hinge", "ce+ce", "ce+"):
    with pytest.raises(ValueError, match=re.escape(f"loss_config.name = {bad!r} is not one of")):
      losses.loss_terms(bad)
