"""fcnjax.losses against live PyTorch (cross-entropy, BCE) and a written-out soft-Dice reference."""
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_python
from fcnjax import losses

IGNORE = 255


def _batch(seed=0, n=2, h=5, w=6, c=4, ignore_fraction=0.2, ignore_index=IGNORE):
  rng = np.random.default_rng(seed)
  logits = rng.normal(0.0, 3.0, size=(n, h, w, c)).astype(np.float32)
  labels = rng.integers(0, max(c, 2), size=(n, h, w)).astype(np.int32)
  labels[rng.random((n, h, w)) < ignore_fraction] = ignore_index
  return logits, labels


def _torch_ce(logits, labels, **kwargs):
  x = torch.from_numpy(np.moveaxis(np.array(logits, np.float32), -1, 1))  # NHWC -> NCHW
  y = torch.from_numpy(labels.astype(np.int64))
  return F.cross_entropy(x, y, **kwargs)


@pytest.mark.parametrize("class_weights, label_smoothing", [
    (None, 0.0), ([0.5, 2.0, 1.0, 3.0], 0.0), (None, 0.1), ([0.5, 2.0, 1.0, 3.0], 0.2)])
def test_cross_entropy_matches_torch(class_weights, label_smoothing):
  logits, labels = _batch()
  ours = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), ignore_index=IGNORE,
                              class_weights=class_weights, label_smoothing=label_smoothing)
  weight = None if class_weights is None else torch.tensor(class_weights)
  ref = _torch_ce(logits, labels, weight=weight, ignore_index=IGNORE, label_smoothing=label_smoothing)
  assert ours.dtype == jnp.float32
  np.testing.assert_allclose(float(ours), ref.item(), rtol=1e-5, atol=1e-6)


def test_cross_entropy_weighted_mean_divides_by_class_weight_sum():
  # The distinguishing case: with weights, torch divides by sum(cw[y]) over valid pixels, not by the pixel count.
  logits, labels = _batch(seed=1)
  cw = np.array([0.1, 5.0, 1.0, 2.0], np.float32)
  ours = float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), class_weights=cw))
  per_pixel = _torch_ce(logits, labels, weight=torch.from_numpy(cw), ignore_index=IGNORE, reduction="none").numpy()
  valid = labels != IGNORE
  by_count = per_pixel.sum() / valid.sum()
  by_weight = per_pixel.sum() / cw[labels[valid]].sum()
  assert abs(by_count - by_weight) > 0.1  # the two normalisations really differ on this batch
  np.testing.assert_allclose(ours, by_weight, rtol=1e-5)


def test_cross_entropy_other_ignore_index():
  logits, labels = _batch(seed=2, ignore_index=-100)
  ours = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), ignore_index=-100)
  ref = _torch_ce(logits, labels, ignore_index=-100)
  np.testing.assert_allclose(float(ours), ref.item(), rtol=1e-5)


@pytest.mark.parametrize("class_weights", [None, [0.5, 2.0, 1.0, 3.0]])
def test_cross_entropy_pixel_weights(class_weights):
  logits, labels = _batch(seed=3)
  pixel_w = np.random.default_rng(3).uniform(0.5, 10.0, size=labels.shape).astype(np.float32)
  ours = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), weights=jnp.asarray(pixel_w),
                              class_weights=class_weights)
  weight = None if class_weights is None else torch.tensor(class_weights)
  per_pixel = _torch_ce(logits, labels, weight=weight, ignore_index=IGNORE, reduction="none").numpy()
  valid = labels != IGNORE
  cw = np.ones(4, np.float32) if class_weights is None else np.asarray(class_weights, np.float32)
  ref = (per_pixel * pixel_w).sum() / cw[labels[valid]].sum()
  np.testing.assert_allclose(float(ours), ref, rtol=1e-5)


def test_cross_entropy_bfloat16_logits_compute_in_float32():
  logits, labels = _batch(seed=4, n=2, h=8, w=8, c=21)
  bf16 = jnp.asarray(logits, jnp.bfloat16)
  ours = losses.cross_entropy(bf16, jnp.asarray(labels), class_weights=np.linspace(0.5, 2.0, 21))
  assert ours.dtype == jnp.float32
  weight = torch.linspace(0.5, 2.0, 21)
  # Exact (float32) on the bf16-rounded inputs: the upcast happens before the softmax.
  ref_rounded = _torch_ce(np.asarray(bf16.astype(jnp.float32)), labels, weight=weight, ignore_index=IGNORE)
  np.testing.assert_allclose(float(ours), ref_rounded.item(), rtol=1e-5)
  # Within bfloat16's input rounding (8 mantissa bits, |logit| up to ~10) of the float32 loss.
  ref = _torch_ce(logits, labels, weight=weight, ignore_index=IGNORE)
  np.testing.assert_allclose(float(ours), ref.item(), rtol=2e-2)


def test_all_ignored_batch_gives_zero_and_finite_gradients():
  logits, labels = _batch(seed=5)
  labels[:] = IGNORE
  logits, labels = jnp.asarray(logits), jnp.asarray(labels)
  for fn in (lambda x: losses.cross_entropy(x, labels, class_weights=[1.0, 2.0, 3.0, 4.0], label_smoothing=0.1),
             lambda x: losses.dice_loss(x, labels, smooth=0.0),
             lambda x: losses.binary_cross_entropy(x[..., :1], labels, pos_weight=3.0)):
    value, grad = jax.jit(jax.value_and_grad(fn))(logits)
    assert float(value) == 0.0
    assert np.all(np.asarray(grad) == 0.0)


def _torch_bce(logits, labels, pixel_w=None, pos_weight=None):
  valid = labels != IGNORE
  x = torch.from_numpy(logits[..., 0][valid])
  y = torch.from_numpy(labels[valid].astype(np.float32))
  kwargs = {}
  if pixel_w is not None:
    kwargs["weight"] = torch.from_numpy(pixel_w[valid])
  if pos_weight is not None:
    kwargs["pos_weight"] = torch.tensor(pos_weight)
  return F.binary_cross_entropy_with_logits(x, y, **kwargs).item()


@pytest.mark.parametrize("use_weights, pos_weight", [(False, None), (True, None), (False, 3.0), (True, 0.5)])
def test_binary_cross_entropy_matches_torch(use_weights, pos_weight):
  logits, labels = _batch(seed=6, c=1)
  logits[0, 0, :3, 0] = [80.0, -90.0, 60.0]  # far into the saturated range: the stable form must not overflow
  labels[0, 0, :3] = [0, 1, 1]
  pixel_w = np.random.default_rng(6).uniform(0.5, 10.0, size=labels.shape).astype(np.float32) if use_weights else None
  ours = losses.binary_cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                                     weights=None if pixel_w is None else jnp.asarray(pixel_w), pos_weight=pos_weight)
  ref = _torch_bce(logits, labels, pixel_w, pos_weight)
  assert np.isfinite(float(ours)) and ref > 1.0
  np.testing.assert_allclose(float(ours), ref, rtol=1e-5)


def test_binary_cross_entropy_bfloat16():
  logits, labels = _batch(seed=7, c=1)
  bf16 = jnp.asarray(logits, jnp.bfloat16)
  ours = losses.binary_cross_entropy(bf16, jnp.asarray(labels), pos_weight=2.0)
  assert ours.dtype == jnp.float32
  np.testing.assert_allclose(float(ours), _torch_bce(np.asarray(bf16.astype(jnp.float32)), labels, None, 2.0),
                             rtol=1e-5)
  np.testing.assert_allclose(float(ours), _torch_bce(logits, labels, None, 2.0), rtol=2e-2)


def _torch_soft_dice(logits, labels, smooth):
  """segmentation_models_pytorch DiceLoss (from_logits, dims=(0, 2)), every class averaged (see dice_loss)."""
  x = torch.from_numpy(np.moveaxis(logits, -1, 1)).flatten(2)  # (N, C, HW)
  y = torch.from_numpy(labels.astype(np.int64)).flatten(1)  # (N, HW)
  mask = (y != IGNORE).unsqueeze(1).float()
  if x.shape[1] == 1:
    probs = torch.sigmoid(x)
    target = (y * (y != IGNORE)).unsqueeze(1).float()
  else:
    probs = x.softmax(dim=1)
    target = F.one_hot(y * (y != IGNORE), x.shape[1]).permute(0, 2, 1).float()
  probs, target = probs * mask, target * mask
  intersection = (probs * target).sum(dim=(0, 2))
  cardinality = (probs + target).sum(dim=(0, 2))
  dice = (2 * intersection + smooth) / (cardinality + smooth).clamp_min(1e-7)
  return (1 - dice).mean().item()


@pytest.mark.parametrize("channels, smooth", [(4, 1.0), (4, 0.0), (1, 1.0), (1, 0.0)])
def test_dice_loss_matches_reference(channels, smooth):
  logits, labels = _batch(seed=8, c=channels)
  ours = losses.dice_loss(jnp.asarray(logits), jnp.asarray(labels), smooth=smooth)
  np.testing.assert_allclose(float(ours), _torch_soft_dice(logits, labels, smooth), rtol=1e-5, atol=1e-6)
  bf16 = losses.dice_loss(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels), smooth=smooth)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(float(bf16), float(ours), rtol=2e-2, atol=1e-3)


def test_dice_loss_known_cases():
  labels = np.array([[[0, 1], [2, IGNORE]]], np.int32)
  perfect = 50.0 * np.eye(3, dtype=np.float32)[np.where(labels == IGNORE, 0, labels)]
  perfect[0, 1, 1] = [-50.0, -50.0, 50.0]  # a wrong prediction, but on the ignored pixel
  assert float(losses.dice_loss(jnp.asarray(perfect), jnp.asarray(labels), smooth=0.0)) < 1e-6
  # Everything predicted as class 0 (hard): dice_0 = 2*1/(3+1), dice_1 = dice_2 = 0 -> loss = 1 - (0.5 / 3).
  all_zero = np.broadcast_to(np.array([50.0, -50.0, -50.0], np.float32), perfect.shape)
  np.testing.assert_allclose(float(losses.dice_loss(jnp.asarray(all_zero), jnp.asarray(labels), smooth=0.0)),
                             1.0 - 0.5 / 3, rtol=1e-6)


def _config(**overrides):
  config = losses.default_config()
  config.update(overrides)
  return config


def test_default_config_keys():
  config = losses.default_config()
  assert isinstance(config, ml_collections.ConfigDict)
  assert {"name", "aux_weight", "ignore_index", "class_weights", "dice_weight", "label_smoothing", "pos_weight",
          "dice_smooth"} <= set(config.keys())
  assert config.aux_weight == 0.5 and config.ignore_index == 255 and config.name == "cross_entropy"
  config.class_weights = (1.0, 2.0)  # None defaults must accept a value later (ml_collections type-locks fields)
  config.pos_weight = 3.0


def test_segmentation_loss_equals_torchvision_criterion():
  out, labels = _batch(seed=9, c=21)
  aux, _ = _batch(seed=10, c=21)
  loss, parts = losses.segmentation_loss({"out": jnp.asarray(out), "aux": jnp.asarray(aux)}, jnp.asarray(labels),
                                         losses.default_config())
  # torchvision references/segmentation/train.py criterion.
  ref = _torch_ce(out, labels, ignore_index=255) + 0.5 * _torch_ce(aux, labels, ignore_index=255)
  np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-5)
  np.testing.assert_allclose(float(parts["aux"]), _torch_ce(aux, labels, ignore_index=255).item(), rtol=1e-5)
  assert float(parts["loss"]) == float(loss)


@pytest.mark.parametrize("name, channels", [("ce+dice", 4), ("bce+dice", 1), ("dice", 4), ("bce", 1)])
def test_segmentation_loss_combinations(name, channels):
  out, labels = _batch(seed=11, c=channels)
  aux, _ = _batch(seed=12, c=channels)
  pixel_w = np.random.default_rng(11).uniform(0.5, 3.0, size=labels.shape).astype(np.float32)
  config = _config(name=name, dice_weight=0.7, aux_weight=0.4, pos_weight=2.0 if channels == 1 else None)
  fn = jax.jit(lambda o, a, y, w: losses.segmentation_loss({"out": o, "aux": a}, y, config, weights=w))
  loss, parts = fn(jnp.asarray(out), jnp.asarray(aux), jnp.asarray(labels), jnp.asarray(pixel_w))

  def head(logits):
    total = 0.0
    if "bce" in name:
      total += _torch_bce(logits, labels, pixel_w, 2.0)
    if name.startswith("ce"):
      per_pixel = _torch_ce(logits, labels, ignore_index=IGNORE, reduction="none").numpy()
      total += (per_pixel * pixel_w).sum() / (labels != IGNORE).sum()
    if "dice" in name:
      total += (0.7 if "+" in name else 1.0) * _torch_soft_dice(logits, labels, 1.0)
    return total

  np.testing.assert_allclose(float(loss), head(out) + 0.4 * head(aux), rtol=1e-5)
  np.testing.assert_allclose(float(parts["out"]) + 0.4 * float(parts["aux"]), float(loss), rtol=1e-6)


def test_segmentation_loss_without_aux_and_errors():
  out, labels = _batch(seed=13, c=4)
  loss, parts = losses.segmentation_loss({"out": jnp.asarray(out)}, jnp.asarray(labels), losses.default_config())
  assert "aux" not in parts
  np.testing.assert_allclose(float(loss), _torch_ce(out, labels, ignore_index=255).item(), rtol=1e-5)
  with pytest.raises(ValueError, match="'hinge' is not one of"):
    losses.segmentation_loss({"out": jnp.asarray(out)}, jnp.asarray(labels), _config(name="hinge"))
  with pytest.raises(ValueError, match="needs one logit channel"):
    losses.segmentation_loss({"out": jnp.asarray(out)}, jnp.asarray(labels), _config(name="bce"))
  with pytest.raises(ValueError, match="class_weights must have shape"):
    losses.segmentation_loss({"out": jnp.asarray(out)}, jnp.asarray(labels), _config(class_weights=(1.0, 2.0)))
  with pytest.raises(ValueError, match=r"labels must have shape \(N, H, W\)"):
    losses.cross_entropy(jnp.asarray(out), jnp.asarray(labels[:, :-1]))


_SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from fcnjax import losses
    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    out = rng.normal(0, 3, (8, 12, 10, 5)).astype(np.float32)
    aux = rng.normal(0, 3, (8, 12, 10, 5)).astype(np.float32)
    binary = rng.normal(0, 3, (8, 12, 10, 1)).astype(np.float32)
    labels = rng.integers(0, 5, (8, 12, 10)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.3] = 255
    labels[:2] = 255  # two fully ignored examples: a per-device mean of means would differ
    binary_labels = np.where(labels == 255, 255, labels % 2).astype(np.int32)
    weights = rng.uniform(0.5, 5, labels.shape).astype(np.float32)
    ce_dice = losses.default_config(); ce_dice.name = 'ce+dice'; ce_dice.class_weights = (1., 2., .5, 3., 1.)
    bce_dice = losses.default_config(); bce_dice.name = 'bce+dice'; bce_dice.pos_weight = 2.0
    fns = {
        'ce': lambda o, a, b, y, by, w: losses.cross_entropy(o, y, weights=w, class_weights=(1., 2., .5, 3., 1.),
                                                             label_smoothing=0.1),
        'bce': lambda o, a, b, y, by, w: losses.binary_cross_entropy(b, by, weights=w, pos_weight=2.0),
        'dice': lambda o, a, b, y, by, w: losses.dice_loss(o, y),
        'ce+dice': lambda o, a, b, y, by, w: losses.segmentation_loss({'out': o, 'aux': a}, y, ce_dice, w)[0],
        'bce+dice': lambda o, a, b, y, by, w: losses.segmentation_loss({'out': b}, by, bce_dice, w)[0],
        # smp's losses; Lovasz sorts the whole batch, which Explicit axes must gather first.
        'focal': lambda o, a, b, y, by, w: losses.focal_loss(o, y, normalized=True),
        'jaccard': lambda o, a, b, y, by, w: losses.jaccard_loss(o, y),
        'lovasz': lambda o, a, b, y, by, w: losses.lovasz_loss(o, y),
        'hinge': lambda o, a, b, y, by, w: losses.lovasz_loss(b, by, per_image=True),
    }
    args = (out, aux, binary, labels, binary_labels, weights)

    def values(*a):
      return jnp.stack([fn(*a) for fn in fns.values()])

    # One compiled function per placement: every loss, and the gradient of their sum w.r.t. all three logits.
    step = jax.jit(lambda *a: (values(*a), jax.grad(lambda *b: jnp.sum(values(*b)), argnums=(0, 1, 2))(*a)))
    want, want_grads = step(*[jax.device_put(a, jax.devices()[0]) for a in args])
    # Explicit axes (jax.make_mesh's default, used under jax.set_mesh) and Auto axes (the classic Mesh) both.
    for axis_type in (jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto):
      mesh = jax.make_mesh((4,), ('data',), axis_types=(axis_type,))
      with jax.set_mesh(mesh):
        sharded = [jax.device_put(a, NamedSharding(mesh, P('data'))) for a in args]
        assert all(len(a.sharding.device_set) == 4 for a in sharded)
        got, grads = step(*sharded)
        got, want_np = np.asarray(got), np.asarray(want)
        grad_diff = max(float(np.max(np.abs(np.asarray(g) - np.asarray(w)))) for g, w in zip(grads, want_grads))
        print(axis_type, dict(zip(fns, got)), 'max rel diff', np.max(np.abs(got - want_np) / want_np), grad_diff)
        # Only the float32 summation order differs between 4 shards and 1 device.
        np.testing.assert_allclose(got, want_np, rtol=2e-6)
        assert grad_diff < 1e-7, grad_diff
    print('OK')
    """)


@pytest.mark.slow
def test_sharded_jit_equals_single_device():
  result = run_python("-c", _SHARDED_SCRIPT, num_devices=4)
  assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr
