"""fcnjax.Segmenter: what it accepts, that its output is the model's on the normalised image, buckets, weights and runs."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import fcnjax
from fcnjax import data, models, pretrained
from fcnjax.segmenter import Segmenter

TINY_UNET = {"name": "unet", "num_classes": 3, "base_width": 4, "depth": 2}


def _random_variables(model):
  """Random values in the model's shapes (flax's initialisers take ~20 s to compile on a CPU); BatchNorm variances
  positive and means away from 0, so that a Segmenter applying the wrong statistics would change the output."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: (0.5 + rng.random(s.shape) if path[-1].key == "var" else 0.3 * rng.standard_normal(s.shape))
      .astype(np.float32), shapes)


@pytest.fixture(scope="module")
def tiny_unet():
  model = models.build_model(TINY_UNET)
  return model, _random_variables(model)


def _image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _reference_logits(model, variables, image):
  normalized = data.normalize(image, data.resolve(None))
  return np.asarray(jax.jit(model.apply)(variables, normalized[None])["out"][0])


def test_predict_is_the_models_argmax_and_softmax(tiny_unet):
  model, variables = tiny_unet
  seg = Segmenter(model, variables)
  image = _image(29, 37)
  reference = _reference_logits(model, variables, image)
  labels = seg.predict(image)
  assert labels.dtype == np.uint8 and labels.shape == (29, 37)
  np.testing.assert_array_equal(labels, np.argmax(reference, axis=-1))
  probabilities = seg.predict(image, probabilities=True)
  assert probabilities.shape == (29, 37, 3)
  np.testing.assert_allclose(probabilities, jax.nn.softmax(reference, axis=-1), atol=1e-6)
  np.testing.assert_allclose(probabilities.sum(-1), 1, atol=1e-5)


def test_predict_takes_paths_pil_images_lists_and_batches(tiny_unet, tmp_path):
  model, variables = tiny_unet
  seg = fcnjax.Segmenter(model, variables)
  image = _image(24, 20, seed=1)
  path = tmp_path / "photo.png"
  Image.fromarray(image).save(path)
  expected = seg.predict(image)
  np.testing.assert_array_equal(seg.predict(str(path)), expected)
  np.testing.assert_array_equal(seg.predict(path), expected)
  np.testing.assert_array_equal(seg.predict(Image.open(path)), expected)
  listed = seg.predict([image, _image(16, 40, seed=2)])
  assert isinstance(listed, list) and listed[0].shape == (24, 20) and listed[1].shape == (16, 40)
  np.testing.assert_array_equal(listed[0], expected)
  batch = seg.predict(np.stack([image, image]))
  assert batch.shape == (2, 24, 20)
  with pytest.raises(ValueError, match="expected an \\(H, W, 3\\) uint8 image"):
    seg.predict(image.astype(np.float32))


def test_unknown_options_are_errors_before_compiling(tiny_unet):
  model, variables = tiny_unet
  with pytest.raises(ValueError, match="tta='flips': expected one of none, flip, d4"):
    Segmenter(model, variables, tta="flips")
  with pytest.raises(ValueError, match="bucket=-1"):
    Segmenter(model, variables, bucket=-1)


def test_a_binary_model_calls_foreground_above_its_threshold(tiny_unet):
  model = models.build_model({**TINY_UNET, "num_classes": 1})
  variables = _random_variables(model)
  image = _image(30, 26, seed=3)
  logits = _reference_logits(model, variables, image)[..., 0]
  threshold = float(np.median(logits))  # half the pixels on each side, so a wrong threshold shows
  np.testing.assert_array_equal(Segmenter(model, variables).predict(image), logits > 0)
  np.testing.assert_array_equal(Segmenter(model, variables, threshold=threshold).predict(image), logits > threshold)
  with pytest.raises(ValueError, match="threshold=nan must be a finite logit"):
    Segmenter(model, variables, threshold=float("nan"))
  with pytest.raises(ValueError, match="threshold=0.5 is for one-logit binary models; this one has 3 classes"):
    Segmenter(*tiny_unet, threshold=0.5).predict(image)


def test_buckets_share_compilations_and_keep_the_output_size(tiny_unet):
  model, variables = tiny_unet
  seg = Segmenter(model, variables, bucket=32)
  for h, w in ((17, 30), (25, 31), (32, 32)):
    assert seg.predict(_image(h, w)).shape == (h, w)
  assert seg._predict_fn.compiled_signatures() == 1  # pylint: disable=protected-access
  # An image whose size is already a multiple of the bucket is not padded at all.
  unpadded = Segmenter(model, variables).predict(_image(32, 32))
  np.testing.assert_array_equal(seg.predict(_image(32, 32)), unpadded)


def test_a_segmenter_with_an_executables_folder_loads_what_another_compiled(tiny_unet, tmp_path):
  model, variables = tiny_unet
  image = _image(32, 32)
  first = Segmenter(model, variables, executables=tmp_path).predict(image, probabilities=True)
  (path,) = tmp_path.glob("*.executable")
  os.utime(path, (0, 0))  # a load sets its time to now
  again = Segmenter(model, variables, executables=tmp_path)
  np.testing.assert_array_equal(again.predict(image, probabilities=True), first)
  assert list(tmp_path.glob("*.executable")) == [path] and path.stat().st_mtime > 0, "compiled, not loaded"


def test_from_weights_reads_the_number_of_classes_and_refuses_other_models(tiny_unet, tmp_path):
  model, variables = tiny_unet
  path = pretrained.save_variables(str(tmp_path / "weights"), variables)
  seg = Segmenter.from_weights(path, "unet", model_options={"base_width": 4, "depth": 2})
  assert seg.model.num_classes == 3
  image = _image(20, 20)
  np.testing.assert_array_equal(seg.predict(image), np.argmax(_reference_logits(model, variables, image), -1))
  with pytest.raises(ValueError, match="not weights of"):
    Segmenter.from_weights(path, "unet", model_options={"base_width": 8, "depth": 2})
