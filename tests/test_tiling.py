"""Overlap-tile inference (fcnjax.inference.predict_tiled) equals whole-image inference wherever it must.

For a translation-equivariant model (convs only, no pooling) whose receptive radius is within the tile margin,
every tile centre pixel sees exactly what it would see in the mirror-padded whole image, so the tiled logits must
equal the whole-image logits of that padded image, cropped back, up to float rounding.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcnjax import inference

TOLERANCE = 1e-5  # float32 convs of the same pixels in a different batch/shape: rounding only


class SmallConvNet(nn.Module):
  """Three 3x3 'SAME' convs: translation-equivariant, receptive radius 3 pixels."""
  channels: int = 2

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i in range(2):
      x = nn.relu(nn.Conv(6, (3, 3), padding="SAME", name=f"conv{i}")(x))
    return {"out": nn.Conv(self.channels, (3, 3), padding="SAME", name="score")(x)}


RADIUS = 3


class TileMean(nn.Module):
  """Output constant over each input tile: the tile's mean of channel 0, and a constant channel of 1."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    mean = jnp.mean(x[..., :1], axis=(1, 2), keepdims=True)
    return {"out": jnp.broadcast_to(jnp.concatenate([mean, jnp.ones_like(mean)], -1), (*x.shape[:3], 2))}


def _model_and_fn(model, seed=0):
  variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8, 8, 3)))
  return variables, inference.make_predict_fn(model)


def _reference(predict_fn, variables, image, margin):
  """Whole-image logits of the mirror-padded image, cropped back to the image."""
  padded = np.pad(image, ((margin, margin), (margin, margin), (0, 0)), mode="symmetric")
  logits = np.asarray(predict_fn(variables, padded[None]))[0]
  h, w = image.shape[:2]
  return logits[margin:margin + h, margin:margin + w]


def _image(h, w, seed=0):
  return np.random.default_rng(seed).normal(size=(h, w, 3)).astype(np.float32)


@pytest.mark.parametrize("size", [(37, 53), (64, 64), (7, 5), (1, 1), (16, 40)])
@pytest.mark.parametrize("blend", [False, True])
def test_tiled_equals_whole_image_of_mirror_padded(size, blend):
  variables, predict_fn = _model_and_fn(SmallConvNet())
  image = _image(*size)
  tile, margin = 24, 4
  tiled = inference.predict_tiled(predict_fn, variables, image, tile, margin, batch_size=3, blend=blend)
  assert tiled.shape == (*size, 2)
  expected = _reference(predict_fn, variables, image, margin)
  np.testing.assert_allclose(tiled, expected, atol=TOLERANCE, rtol=0)
  assert np.abs(expected).max() > 0.1  # a real signal, not zeros


def test_margin_below_receptive_radius_shows_seams():
  """The check above can fail: with a margin of 1 < radius 3, tile edges see zero padding instead of context."""
  variables, predict_fn = _model_and_fn(SmallConvNet())
  image = _image(37, 53)
  tiled = inference.predict_tiled(predict_fn, variables, image, 24, 1)
  expected = _reference(predict_fn, variables, image, 1)
  assert np.abs(tiled - expected).max() > 1e-3


def _gaussian(n):
  # The window predict_tiled documents: exp(-x^2 / 2 (n/4)^2), x from the centre of the n-pixel tile centre.
  x = np.arange(n) - (n - 1) / 2
  return np.exp(-0.5 * (x / (n / 4)) ** 2)


def test_blend_is_gaussian_weighted_average_of_tiles():
  variables, predict_fn = _model_and_fn(TileMean())
  image = _image(40, 40, seed=1)
  tile, margin = 24, 4
  core = tile - 2 * margin                  # 16: tiles step by core // 2 = 8
  starts = [0, 8, 16, 24]                   # 24 + 16 = 40 covers the image exactly
  padded = np.pad(image, ((margin, margin), (margin, margin), (0, 0)), mode="symmetric")
  window = np.outer(_gaussian(core), _gaussian(core))
  total = np.zeros((40, 40))
  weight = np.zeros((40, 40))
  for y in starts:
    for x in starts:
      value = padded[y:y + tile, x:x + tile, 0].mean()
      total[y:y + core, x:x + core] += window * value
      weight[y:y + core, x:x + core] += window
  expected = total / weight
  blended = inference.predict_tiled(predict_fn, variables, image, tile, margin, blend=True)
  np.testing.assert_allclose(blended[..., 0], expected, atol=1e-5, rtol=0)
  np.testing.assert_allclose(blended[..., 1], 1.0, atol=1e-6)  # weights are normalised
  # Without blending tiles step by a whole centre, 0 and 16, plus a last one at 24 that overlaps the one before
  # and wins there: each pixel takes the value of the last tile whose centre holds it.
  hard = inference.predict_tiled(predict_fn, variables, image, tile, margin, blend=False)
  for (y0, y1), y in (((0, 16), 0), ((16, 24), 16), ((24, 40), 24)):
    for (x0, x1), x in (((0, 16), 0), ((16, 24), 16), ((24, 40), 24)):
      np.testing.assert_allclose(hard[y0:y1, x0:x1, 0], padded[y:y + tile, x:x + tile, 0].mean(), atol=1e-6)
  assert np.abs(blended[..., 0] - hard[..., 0]).max() > 1e-3


def _flip_symmetric(variables):
  """Every kernel averaged with its left-right mirror image: the net then commutes with horizontal flips."""
  return jax.tree.map(lambda a: (a + a[:, ::-1]) / 2 if a.ndim == 4 else a, variables)


def _square_symmetric(variables):
  """Every kernel averaged over the 8 symmetries of the square: the net then commutes with all of them."""
  def symmetrise(a):
    copies = [np.rot90(m, k, axes=(0, 1)) for m in (a, a[:, ::-1]) for k in range(4)]
    return sum(copies) / 8
  return jax.tree.map(lambda a: symmetrise(np.asarray(a)) if a.ndim == 4 else a, variables)


@pytest.mark.parametrize("blend", [False, True])
@pytest.mark.parametrize("tta, symmetric_variables", [("flip", _flip_symmetric), ("d4", _square_symmetric)])
def test_tta_of_symmetric_model_changes_nothing(blend, tta, symmetric_variables):
  variables, predict_fn = _model_and_fn(SmallConvNet())
  symmetric = symmetric_variables(variables)
  image = _image(37, 53, seed=2)
  plain = inference.predict_tiled(predict_fn, symmetric, image, 24, 4, blend=blend)
  averaged = inference.predict_tiled(predict_fn, symmetric, image, 24, 4, blend=blend, tta=tta)
  np.testing.assert_allclose(averaged, plain, atol=TOLERANCE, rtol=0)
  # ...while for the original, asymmetric kernels TTA does change the logits (the check can fail).
  asymmetric = inference.predict_tiled(predict_fn, variables, image, 24, 4, blend=blend, tta=tta)
  assert np.abs(asymmetric - inference.predict_tiled(predict_fn, variables, image, 24, 4, blend=blend)).max() > 1e-3


@pytest.mark.parametrize("tta, symmetric_variables", [("flip", _flip_symmetric), ("d4", _square_symmetric)])
def test_tta_whole_image_of_symmetric_model(tta, symmetric_variables):
  # 21x30: the quarter-turned copies of "d4" have another shape, and come back to this one.
  variables, predict_fn = _model_and_fn(SmallConvNet())
  symmetric = symmetric_variables(variables)
  image = _image(21, 30, seed=3)
  np.testing.assert_allclose(inference.predict_whole(predict_fn, symmetric, image, tta=tta),
                             inference.predict_whole(predict_fn, symmetric, image), atol=TOLERANCE, rtol=0)


def test_flip_symmetric_model_is_not_square_symmetric():
  # "d4" must use the quarter turns: a model symmetric under the mirror alone is changed by them.
  variables, predict_fn = _model_and_fn(SmallConvNet())
  flip_only = _flip_symmetric(variables)
  image = _image(24, 24, seed=4)
  plain = inference.predict_whole(predict_fn, flip_only, image)
  np.testing.assert_allclose(inference.predict_whole(predict_fn, flip_only, image, tta="flip"), plain,
                             atol=TOLERANCE, rtol=0)
  assert np.abs(inference.predict_whole(predict_fn, flip_only, image, tta="d4") - plain).max() > 1e-3


def test_unknown_tta_is_an_error():
  variables, predict_fn = _model_and_fn(SmallConvNet())
  with pytest.raises(ValueError, match="tta='rot'"):
    inference.predict_whole(predict_fn, variables, _image(8, 8), tta="rot")


def test_margin_leaving_no_centre_is_an_error():
  variables, predict_fn = _model_and_fn(SmallConvNet())
  with pytest.raises(ValueError, match="margin 12 leaves no centre"):
    inference.predict_tiled(predict_fn, variables, _image(30, 30), 24, 12)
