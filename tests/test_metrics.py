"""fcnjax.metrics on hand-computed cases, sharded vs single device, and the ISBI 2012 challenge metrics."""
import math
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_python
from fcnjax import metrics

X = 255  # ignore

# Three examples of 2x3 pixels, three classes. Example 1 is padding (valid=False).
LABELS = np.array([[[0, 0, 1], [2, X, 1]],
                   [[2, 2, 2], [0, 0, 0]],
                   [[1, 2, X], [0, 2, 2]]], np.int32)
PRED = np.array([[[0, 1, 1], [2, 0, 0]],
                 [[1, 1, 1], [1, 1, 1]],
                 [[1, 2, 2], [0, 0, 2]]], np.int32)
VALID = np.array([True, False, True])
# (gt, pred) pairs of examples 0 and 2, ignored pixels skipped:
#   ex 0: (0,0) (0,1) (1,1) (2,2) (1,0)      ex 2: (1,1) (2,2) (0,0) (2,0) (2,2)
EXPECTED = np.array([[2, 1, 0],
                     [1, 2, 0],
                     [1, 0, 3]])
# Example 1 adds (2,1) x 3 and (0,1) x 3.
EXPECTED_ALL = EXPECTED + np.array([[0, 3, 0], [0, 0, 0], [0, 3, 0]])


def test_confusion_matrix_hand_computed():
  fn = jax.jit(metrics.confusion_matrix, static_argnames=("num_classes", "ignore_index"))
  got = fn(jnp.asarray(PRED), jnp.asarray(LABELS), num_classes=3, valid=jnp.asarray(VALID))
  assert got.dtype == jnp.int32 and got.shape == (3, 3)
  np.testing.assert_array_equal(np.asarray(got), EXPECTED)
  np.testing.assert_array_equal(np.asarray(fn(jnp.asarray(PRED), jnp.asarray(LABELS), num_classes=3)), EXPECTED_ALL)


def test_confusion_matrix_ignore_index_inside_class_range():
  # Datasets that mark void as 0: those pixels must be skipped even though 0 < num_classes.
  got = metrics.confusion_matrix(jnp.asarray(PRED), jnp.asarray(np.where(LABELS == X, 0, LABELS)), 3,
                                 ignore_index=0, valid=jnp.asarray(VALID))
  expected = EXPECTED.copy()
  expected[0] = 0
  np.testing.assert_array_equal(np.asarray(got), expected)


def test_confusion_matrix_accumulates_and_matches_bincount():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 21, (4, 17, 13)).astype(np.int32)
  labels[rng.random(labels.shape) < 0.2] = X
  pred = rng.integers(0, 21, labels.shape).astype(np.int32)
  keep = labels != X
  reference = np.bincount(labels[keep] * 21 + pred[keep], minlength=21 * 21).reshape(21, 21)
  fn = jax.jit(lambda p, y: metrics.confusion_matrix(p, y, 21))
  whole = np.asarray(fn(jnp.asarray(pred), jnp.asarray(labels)))
  summed = np.asarray(fn(jnp.asarray(pred[:2]), jnp.asarray(labels[:2])) + fn(jnp.asarray(pred[2:]),
                                                                               jnp.asarray(labels[2:])))
  np.testing.assert_array_equal(whole, reference)
  np.testing.assert_array_equal(summed, reference)


def test_predictions():
  logits = np.zeros((1, 1, 3, 3), np.float32)
  logits[0, 0] = [[0.1, 2.0, -1.0], [3.0, 0.0, 0.0], [-5.0, -4.0, -4.5]]
  np.testing.assert_array_equal(np.asarray(metrics.predictions(jnp.asarray(logits, jnp.bfloat16))), [[[1, 0, 1]]])
  binary = np.array([[[[2.0], [0.0], [-0.5]]]], np.float32)  # logit 0 is p = 0.5: background
  got = metrics.predictions(jnp.asarray(binary))
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), [[[1, 0, 0]]])
  np.testing.assert_array_equal(np.asarray(metrics.predictions(jnp.asarray(binary), threshold=-0.6)), [[[1, 1, 1]]])


# Class 2 is absent from ground truth and prediction; class 3 is predicted once but absent from ground truth.
KNOWN = np.array([[5, 1, 0, 0],
                  [2, 3, 0, 1],
                  [0, 0, 0, 0],
                  [0, 0, 0, 0]])


def test_best_binary_threshold_is_the_fewest_errors_of_any_threshold():
  rng = np.random.default_rng(0)
  for _ in range(100):
    n = int(rng.integers(1, 40))
    logits = np.round(rng.normal(size=n), 1).astype(np.float32)  # rounded: equal logits occur and cannot be split
    truth = rng.integers(0, 2, n)
    threshold, error = metrics.best_binary_threshold(logits, truth)
    np.testing.assert_allclose(np.mean((logits > threshold) != truth), error, atol=1e-12)
    tried = np.concatenate([np.unique(logits) - 0.05, np.unique(logits) + 0.05])
    assert error <= min(np.mean((logits > t) != truth) for t in tried) + 1e-12


def test_best_binary_threshold_skips_ignored_pixels_and_prefers_thresholds_near_zero():
  # Background logits below -1, foreground above 1: every threshold in (-1, 1) is right, and 0 is the nearest.
  logits = np.array([[-3.0, -1.0, 1.0, 2.0, 9.0]])
  truth = np.array([[0, 0, 1, 1, X]])  # the ignored pixel's logit 9 would otherwise be a foreground pixel
  assert metrics.best_binary_threshold(logits, truth) == (0.0, 0.0)
  # Shifted: a foreground at -0.6 and a background at -1 put the only error-free threshold at -0.8.
  threshold, error = metrics.best_binary_threshold([-3.0, -1.0, -0.6, 2.0], [0, 0, 1, 1])
  assert (threshold, error) == (pytest.approx(-0.8), 0.0)
  with pytest.raises(ValueError, match="labels must be 0/1"):
    metrics.best_binary_threshold([0.0, 1.0], [0, 2])
  with pytest.raises(ValueError, match="no labelled pixels"):
    metrics.best_binary_threshold([0.0], [X])


def test_summarize_known_matrix():
  s = metrics.summarize(KNOWN, class_names=["bg", "cat", "dog", "bird"])
  iou = [5 / 8, 3 / 7, math.nan, 0.0]  # tp / (gt + pred - tp): gt = (6, 6, 0, 0), pred = (7, 4, 0, 1)
  dice = [10 / 13, 6 / 10, math.nan, 0.0]
  accuracy = [5 / 6, 3 / 6, math.nan, math.nan]
  np.testing.assert_allclose(s["per_class_iou"], iou, rtol=1e-12)
  np.testing.assert_allclose(s["per_class_dice"], dice, rtol=1e-12)
  np.testing.assert_allclose(s["per_class_accuracy"], accuracy, rtol=1e-12)
  assert s["miou"] == pytest.approx((5 / 8 + 3 / 7 + 0.0) / 3, rel=1e-12)
  assert s["mean_dice"] == pytest.approx((10 / 13 + 0.6 + 0.0) / 3, rel=1e-12)
  assert s["mean_accuracy"] == pytest.approx((5 / 6 + 1 / 2) / 2, rel=1e-12)
  assert s["pixel_accuracy"] == pytest.approx(8 / 12, rel=1e-12)
  assert s["fw_iou"] == pytest.approx(6 / 12 * 5 / 8 + 6 / 12 * 3 / 7, rel=1e-12)
  assert s["class_names"] == ["bg", "cat", "dog", "bird"]


def test_summarize_perfect_and_empty():
  s = metrics.summarize(np.diag([4, 0, 7]))
  assert s["miou"] == s["mean_dice"] == s["pixel_accuracy"] == s["fw_iou"] == 1.0
  assert math.isnan(s["per_class_iou"][1])
  empty = metrics.summarize(np.zeros((2, 2), np.int64))
  assert all(math.isnan(empty[k]) for k in ("miou", "pixel_accuracy", "mean_accuracy", "mean_dice", "fw_iou"))
  with pytest.raises(ValueError, match=r"square \(C, C\)"):
    metrics.summarize(np.zeros((2, 3)))


def test_format_table():
  table = metrics.format_table(metrics.summarize(KNOWN), ["bg", "cat", "dog", "bird"])
  lines = table.splitlines()
  cat = next(line for line in lines if line.startswith("cat"))
  assert cat.split() == ["cat", "42.86", "60.00", "50.00"]
  dog = next(line for line in lines if line.startswith("dog"))
  assert dog.split() == ["dog", "-", "-", "-"]
  assert next(line for line in lines if line.startswith("mean IoU")).split()[-1] == "35.12"
  assert next(line for line in lines if line.startswith("pixel accuracy")).split()[-1] == "66.67"


_SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from fcnjax import metrics
    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(8, 9, 7, 6)).astype(np.float32)
    labels = rng.integers(0, 6, (8, 9, 7)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.25] = 255
    valid = np.arange(8) < 6  # the last two examples are padding
    step = jax.jit(lambda x, y, v: metrics.confusion_matrix(metrics.predictions(x), y, 6, valid=v))
    want = np.asarray(step(*[jax.device_put(a, jax.devices()[0]) for a in (logits, labels, valid)]))
    assert want.sum() == (labels[:6] != 255).sum()
    for axis_type in (jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto):
      mesh = jax.make_mesh((4,), ('data',), axis_types=(axis_type,))
      with jax.set_mesh(mesh):
        sharded = [jax.device_put(a, NamedSharding(mesh, P('data'))) for a in (logits, labels, valid)]
        assert all(len(a.sharding.device_set) == 4 for a in sharded)
        got = np.asarray(step(*sharded))
      print(axis_type, np.abs(got - want).max())
      np.testing.assert_array_equal(got, want)
    print('OK')
    """)


@pytest.mark.slow
def test_sharded_confusion_matrix_equals_single_device():
  result = run_python("-c", _SHARDED_SCRIPT, num_devices=4)
  assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr


# ISBI 2012 challenge metrics. Foreground = cell interior = 1, membrane = 0.


def test_challenge_metrics_perfect_and_inverted():
  gt = np.array([[1, 1, 0, 1], [1, 1, 0, 1], [0, 0, 0, 1]], np.uint8)
  perfect = metrics.challenge_metrics(gt, gt)
  assert perfect == {"pixel_error": 0.0, "rand_error": 0.0, "foreground_iou": 1.0, "foreground_dice": 1.0}
  inverted = metrics.challenge_metrics(1 - gt, gt)
  assert inverted["pixel_error"] == 1.0 and inverted["foreground_iou"] == 0.0 and inverted["foreground_dice"] == 0.0
  # Every ground-truth cell pixel predicted as membrane (a singleton): no pair kept together -> F = 0.
  assert inverted["rand_error"] == 1.0


def test_rand_error_split_and_merge():
  # Split: one 2x4 cell cut by a predicted membrane column -> segments of 4 and 2 pixels plus 2 singletons.
  # Ordered pairs within segments: gt 8*7 = 56; pred 4*3 + 2*1 = 14 = pairs shared; F = 14 / ((56 + 14) / 2) = 0.4.
  gt = np.ones((2, 4), np.int32)
  split = gt.copy()
  split[:, 2] = 0
  got = metrics.challenge_metrics(split, gt)
  assert got["rand_error"] == pytest.approx(0.6, rel=1e-12)
  assert got["pixel_error"] == pytest.approx(2 / 8)
  assert got["foreground_iou"] == pytest.approx(6 / 8)
  assert got["foreground_dice"] == pytest.approx(12 / 14)
  # Merge: two 2x2 cells either side of a membrane column, predicted as one region.
  # gt pairs 2 * 4*3 = 24 = pairs shared; pred (restricted to gt cells) 8*7 = 56; F = 24 / 40.
  gt_two = np.ones((2, 5), np.int32)
  gt_two[:, 2] = 0
  merged = metrics.challenge_metrics(np.ones((2, 5), np.int32), gt_two)
  assert merged["rand_error"] == pytest.approx(0.4, rel=1e-12)
  assert merged["pixel_error"] == pytest.approx(2 / 10)
  # A stack averages the Rand error per slice and pools pixels for the rest.
  stack = metrics.challenge_metrics(np.stack([gt, split]), np.stack([gt, gt]))
  assert stack["rand_error"] == pytest.approx(0.3, rel=1e-12)
  assert stack["pixel_error"] == pytest.approx(2 / 16)


def test_rand_error_uses_four_connectivity():
  # Two cells touching only at a corner are two cells with connectivity=1, one with connectivity=2.
  gt = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], np.uint8)
  pred = gt.copy()
  pred[2, 2] = 0  # cuts the lower cell's corner: still one 3-pixel segment under 4-connectivity
  # gt pairs 2 * 12 = 24; pred segments 4 and 3 (+1 singleton): 12 + 6 = 18 shared; F = 18 / 21.
  assert metrics.rand_error(pred, gt) == pytest.approx(1 - 18 / 21, rel=1e-12)
  assert metrics.rand_error(pred, gt, connectivity=2) != pytest.approx(1 - 18 / 21, rel=1e-3)


def test_challenge_metrics_real_isbi_mask(shared_data):
  from PIL import Image
  from scipy import ndimage
  gt = np.asarray(Image.open(shared_data / "isbi2012-em" / "masks" / "00.png")) > 127
  assert metrics.challenge_metrics(gt, gt)["rand_error"] == 0.0
  # Growing the cells by 2 pixels erases thin membranes and merges cells; shrinking them by 2 keeps every cell.
  # Both flip a similar number of pixels, but only merging is a topological error, which the Rand error must show.
  merged = metrics.challenge_metrics(ndimage.binary_dilation(gt, iterations=2), gt)
  shrunk = metrics.challenge_metrics(ndimage.binary_erosion(gt, iterations=2), gt)
  assert merged["pixel_error"] == pytest.approx(shrunk["pixel_error"], rel=0.1)
  assert merged["rand_error"] > 0.5 > 0.2 > shrunk["rand_error"]


def test_challenge_metrics_rejects_bad_input():
  with pytest.raises(ValueError, match="must be binary"):
    metrics.challenge_metrics(np.array([[0, 255]]), np.array([[0, 1]]))
  with pytest.raises(ValueError, match="differ in shape"):
    metrics.challenge_metrics(np.zeros((2, 2), bool), np.zeros((2, 3), bool))
