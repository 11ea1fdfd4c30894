"""Parity of fcnjax's smp_unet and smp_deeplabv3plus with segmentation_models_pytorch's Unet and DeepLabV3Plus,
through fcnjax.conversion.smp; parameter counts; the ImageNet encoder path; the converter's and models' refusals.

As in test_resnet.py, the smp models are built without weights and their BatchNorm parameters and running statistics
randomised before conversion; outputs are compared in eval mode at 64x96 (divisible by 32, as smp's DeepLabV3Plus
needs by 16).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch  # a hard import: parity tests must run, never skip
import torchvision

from conftest import load_converter, record_parity
from test_resnet import nchw_to_nhwc, shapes
from torch_reference import randomize_batch_norm
from fcnjax import models
from fcnjax.conversion import ConversionError, get_converter
from fcnjax.conversion.smp import adapt_first_conv, convert_smp_encoder
from fcnjax.pretrained import load_variables, merge_pretrained

# max|fcnjax - smp| <= RTOL * max|smp| (float32 on CPU; measured 8e-7 to 5.1e-6 on an AVX-512 Xeon and up to 1.2e-5
# on an AVX2 EPYC, the largest on the resnet50 Unet, whose random decoder grows the logits to ~1e2-1e3).
RTOL = 3e-5
SIZE = (64, 96)
SMP = {"smp_unet": smp.Unet, "smp_deeplabv3plus": smp.DeepLabV3Plus}


@functools.lru_cache(maxsize=None)
def torch_model(name: str, encoder: str, in_channels: int, classes: int, **options) -> torch.nn.Module:
  torch.manual_seed(0)
  model = SMP[name](encoder, encoder_weights=None, in_channels=in_channels, classes=classes, **options)
  return randomize_batch_norm(model, seed=1).eval()


def init_shapes(name: str, in_channels: int, **options):
  model = models.build_model({"name": name, **options, "in_channels": in_channels})
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *SIZE, in_channels)))


def count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def compare(name: str, encoder: str, in_channels: int, classes: int, size=SIZE, **options) -> None:
  reference = torch_model(name, encoder, in_channels, classes, **options)
  variables = get_converter(name)(reference.state_dict())
  # Option names are smp's (encoder_output_stride, decoder_channels, ...).
  own = init_shapes(name, in_channels, encoder=encoder, num_classes=classes, **options)
  assert shapes(variables) == shapes(own)
  assert count(own["params"]) == sum(p.numel() for p in reference.parameters())

  x = torch.randn(2, in_channels, *size, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    expected = reference(x).numpy().transpose(0, 2, 3, 1)
  model = models.build_model({"name": name, "encoder": encoder, "in_channels": in_channels, "num_classes": classes,
                              **options})
  out = jax.jit(model.apply)(variables, nchw_to_nhwc(x))["out"]
  assert out.shape == expected.shape
  assert_parity(out, expected,
                f"smp: {name} {encoder} in_channels={in_channels} classes={classes} {options or ''} at {size}")


def assert_parity(logits, expected: np.ndarray, record: str = "") -> None:
  """max |logits - expected| <= RTOL * max |expected|; the figures go to the parity log under `record` if given."""
  diff, scale = float(np.abs(np.asarray(logits) - expected).max()), float(np.abs(expected).max())
  if record:
    record_parity(record, diff, scale)
  assert scale > 0 and diff <= RTOL * scale, f"max|diff| {diff:.3g} > {RTOL} * max|smp| {scale:.3g}"


# Every encoder with both models; in_channels 1 and 3 and classes 1 and 5 with each model; smp's Unet at a size not
# divisible by 32 (it resizes to each skip's size, nearest with F.interpolate(size=) rounding: 65x97 gives 33x49,
# 17x25, ...) and DeepLabV3Plus at output stride 8 (layer3 dilated by 2 and layer4 by 4 in every block, the decoder's
# x2 upsampling). The fast subset runs the first.
CASES = [
    ("smp_unet", "resnet18", 3, 1, SIZE, {}),
    ("smp_unet", "resnet34", 1, 5, (65, 97), {}),
    ("smp_unet", "resnet50", 1, 1, SIZE, {}),
    ("smp_deeplabv3plus", "resnet18", 1, 5, SIZE, {}),
    ("smp_deeplabv3plus", "resnet34", 3, 1, SIZE, {"encoder_output_stride": 8}),
    ("smp_deeplabv3plus", "resnet50", 3, 5, SIZE, {}),
]
CASES = [pytest.param(*case, id="-".join([*case[:2], f"in{case[2]}", f"classes{case[3]}", "x".join(map(str, case[4])),
                                          *(f"{k}={v}" for k, v in case[5].items())]),
                      marks=[pytest.mark.slow] if i else [])
         for i, case in enumerate(CASES)]


@pytest.mark.parametrize("name, encoder, in_channels, classes, size, options", CASES)
def test_outputs_and_parameter_counts_match_smp(name, encoder, in_channels, classes, size, options):
  compare(name, encoder, in_channels, classes, size, **options)


@pytest.mark.slow
def test_encoder_from_imagenet_resnet_is_smps_patched_encoder():
  """A torchvision resnet18 state_dict through convert_smp_encoder is what smp builds from it: smp loads it into
  its encoder and patches the first conv for in_channels; converting that whole smp model gives the same backbone."""
  torch.manual_seed(0)
  imagenet = randomize_batch_norm(torchvision.models.resnet18(weights=None), seed=3).state_dict()
  for in_channels in (1, 4):  # the sum over RGB; RGB repeated and scaled
    unet = smp.Unet("resnet18", encoder_weights=None, classes=2)
    unet.encoder.load_state_dict(dict(imagenet))
    unet.encoder.set_in_channels(in_channels, pretrained=True)  # smp's own adaptation of pretrained weights
    from_smp = get_converter("smp_unet")(unet.state_dict())
    ours = convert_smp_encoder(imagenet, in_channels=in_channels)
    assert set(ours) == {"params", "batch_stats"}
    for collection in ours:
      assert set(ours[collection]) == {"backbone"}
      jax.tree_util.tree_map(np.testing.assert_array_equal, ours[collection]["backbone"],
                             from_smp[collection]["backbone"])

  # Everything but the decoder and the head loads into smp_unet's backbone by path; fc is not converted.
  init = init_shapes("smp_unet", 1, encoder="resnet18", num_classes=2)
  init = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), init)
  merged, report = merge_pretrained(init, convert_smp_encoder(imagenet, in_channels=1), scope="all")
  assert not report["unused"] and not report["skipped"]
  assert report["left_at_init"] and all(p.split("/")[1] in ("decoder", "segmentation_head")
                                        for p in report["left_at_init"])
  np.testing.assert_array_equal(merged["params"]["backbone"]["conv1"]["kernel"],
                                imagenet["conv1.weight"].numpy().sum(1, keepdims=True).transpose(2, 3, 1, 0))


def test_adapt_first_conv_repeats_rgb_scaled():
  kernel = np.random.default_rng(0).normal(size=(7, 7, 3, 4)).astype(np.float32)
  five = adapt_first_conv(kernel, 5)
  np.testing.assert_allclose(five[:, :, [0, 1, 2, 0, 1]], kernel[:, :, [0, 1, 2, 0, 1]] * 3 / 5, rtol=1e-6)
  np.testing.assert_array_equal(adapt_first_conv(kernel, 3), kernel)


def test_converter_names_a_misshaped_key():
  state = torch_model("smp_unet", "resnet18", 3, 1).state_dict()
  damaged = dict(state)
  damaged["decoder.blocks.2.conv2.0.weight"] = torch.zeros(64, 63, 3, 3)
  with pytest.raises(ConversionError) as error:
    get_converter("smp_unet")(damaged)
  message = str(error.value)
  assert "mis-shaped keys (1): decoder.blocks.2.conv2.0.weight: got (64, 63, 3, 3), expected (64, 64, 3, 3)" in message
  assert "missing" not in message and "unexpected" not in message
  # A DeepLabV3Plus file is refused as a Unet, by its keys.
  dlv3 = torch_model("smp_deeplabv3plus", "resnet18", 1, 5).state_dict()
  with pytest.raises(ConversionError, match="missing keys .*decoder.blocks.0.conv1.0.weight"):
    get_converter("smp_unet")(dlv3)


@pytest.mark.slow
def test_command_line_converts_smp_files(tmp_path):
  state = torch_model("smp_unet", "resnet18", 3, 1).state_dict()
  converter = load_converter()
  torch.save(state, tmp_path / "unet.pth")
  assert converter.main(["--arch", "smp_unet", "--pth", str(tmp_path / "unet.pth"), "--out",
                         str(tmp_path / "out")]) == 0
  assert shapes(load_variables(str(tmp_path / "out"))) == shapes(init_shapes("smp_unet", 3, encoder="resnet18"))
  assert converter.main(["--arch", "smp_unet", "--pth", str(tmp_path / "unet.pth"), "--out", str(tmp_path / "x"),
                         "--in_channels", "1"]) == 1
  torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
  assert converter.main(["--arch", "smp_encoder", "--pth", str(tmp_path / "resnet18.pth"), "--out",
                         str(tmp_path / "grey"), "--in_channels", "1"]) == 0
  assert shapes(load_variables(str(tmp_path / "grey"))["params"]["backbone"]) == shapes(
      init_shapes("smp_unet", 1, encoder="resnet18")["params"]["backbone"])


def test_model_options_are_checked():
  with pytest.raises(ValueError, match="encoder='resnet152'"):
    models.build_model({"name": "smp_unet", "encoder": "resnet152"})
  with pytest.raises(ValueError, match="encoder_output_stride=32"):
    models.build_model({"name": "smp_deeplabv3plus", "encoder_output_stride": 32})
  with pytest.raises(TypeError, match=r"does not take the option\(s\) \['depth'\]"):
    models.build_model({"name": "smp_unet", "depth": 4})
  dlv3 = models.build_model({"name": "smp_deeplabv3plus", "encoder": "resnet18"})
  with pytest.raises(ValueError, match="divisible by the output stride 16, got 72x96"):
    jax.eval_shape(dlv3.init, jax.random.key(0), jnp.zeros((1, 72, 96, 3)))
  unet = models.build_model({"name": "smp_unet", "encoder": "resnet18", "in_channels": 1})
  with pytest.raises(ValueError, match=r"in_channels=1 channels, got shape \(1, 64, 64, 3\)"):
    jax.eval_shape(unet.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


@pytest.mark.slow
def test_deeplabv3plus_trains_on_two_images_and_refuses_one():
  dlv3 = models.build_model({"name": "smp_deeplabv3plus", "encoder": "resnet18"})
  variables = jax.eval_shape(dlv3.init, jax.random.key(0), jnp.zeros((2, 64, 96, 3)))
  train = lambda v, x: dlv3.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
  out, _ = jax.eval_shape(train, variables, jnp.zeros((2, 64, 96, 3)))
  assert out["out"].shape == (2, 64, 96, 1)
  with pytest.raises(ValueError, match="training batch of at least 2 images"):
    jax.eval_shape(train, variables, jnp.zeros((1, 64, 96, 3)))


def _grey_image(height: int, width: int) -> np.ndarray:
  return np.random.default_rng(3).integers(0, 256, (height, width), dtype=np.uint8)


def _grey_unet_weights(tmp_path) -> tuple[torch.nn.Module, str]:
  """smp's resnet18 Unet for 1-channel images and 2 classes, and its state_dict converted and saved under tmp_path."""
  from fcnjax import pretrained  # pylint: disable=g-import-not-at-top
  reference = torch_model("smp_unet", "resnet18", 1, 2)
  return reference, pretrained.save_variables(tmp_path / "grey_unet", get_converter("smp_unet")(reference.state_dict()))


def _smp_logits(reference: torch.nn.Module, image: np.ndarray, mean: float, std: float) -> np.ndarray:
  x = torch.from_numpy((image.astype(np.float32) / 255 - mean) / std)[None, None]
  with torch.no_grad():
    return reference(x)[0].numpy().transpose(1, 2, 0)


def test_segmenter_reads_in_channels_and_classes_from_converted_smp_weights(tmp_path):
  """A grey smp Unet's converted weights: Segmenter.from_weights builds a 1-channel, 2-class model from them, takes
  grey arrays and grey files, and gives smp's logits on the image normalised with GREY_MEAN / GREY_STD."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from fcnjax import segmenter  # pylint: disable=g-import-not-at-top
  reference, path = _grey_unet_weights(tmp_path)
  seg = segmenter.Segmenter.from_weights(path, "smp_unet", model_options={"encoder": "resnet18"})
  assert (seg.channels, seg.model.num_classes) == (1, 2)
  assert (seg.mean, seg.std) == ((segmenter.GREY_MEAN,), (segmenter.GREY_STD,))
  image = _grey_image(*SIZE)
  logits = seg.logits(image[..., None])
  assert_parity(logits, _smp_logits(reference, image, segmenter.GREY_MEAN, segmenter.GREY_STD))
  probabilities = seg.predict(image, probabilities=True)
  np.testing.assert_allclose(probabilities, jax.nn.softmax(logits, -1), atol=1e-6)
  Image.fromarray(image).save(tmp_path / "grey.png")
  np.testing.assert_array_equal(seg.predict(str(tmp_path / "grey.png")), np.argmax(logits, -1))
  with pytest.raises(ValueError, match=r"expected an \(H, W, 1\) uint8 image"):
    seg.predict(np.zeros((*SIZE, 3), np.uint8))
  with pytest.raises(ValueError, match="need 1 values each"):
    segmenter.Segmenter.from_weights(path, "smp_unet", model_options={"encoder": "resnet18"}, mean=(0.5, 0.5))


@pytest.mark.slow
def test_exported_grey_smp_unet_takes_one_channel(tmp_path):
  """StableHLO export of a 1-channel smp Unet with the normalisation inside: (N, H, W, 1) uint8 images in, smp's
  logits out."""
  from fcnjax import exporting, segmenter  # pylint: disable=g-import-not-at-top
  reference, path = _grey_unet_weights(tmp_path)
  seg = segmenter.Segmenter.from_weights(path, "smp_unet", model_options={"encoder": "resnet18"}, mean=0.3, std=0.2)
  exported = exporting.export_stablehlo(seg, *SIZE, preprocessing=True)
  assert exported.in_avals[0].shape[1:] == (*SIZE, 1)
  image = _grey_image(*SIZE)
  assert_parity(np.asarray(exported.call(image[None, ..., None]))[0], _smp_logits(reference, image, 0.3, 0.2))
  assert exporting.describe(seg, "smp_unet", *SIZE)["input"]["shape"] == ["N", *SIZE, 1]
