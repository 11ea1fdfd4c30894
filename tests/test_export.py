"""fcnjax.exporting and `python -m fcnjax.export`: every zoo model as StableHLO and ONNX, run by the runtimes themselves
(deserialized jax.export, ONNX Runtime) and compared with fcnjax; portable graphs; the command's messages."""
import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import record_parity, run_python
from fcnjax import exporting, models, pretrained
from fcnjax.ops import Conv, max_pool, native, portable_forms
from fcnjax.segmenter import Segmenter

# The exported graph must reproduce fcnjax's logits to this fraction of the largest one.
TOLERANCE = 1e-4
TINY_UNET = {"name": "unet", "num_classes": 3, "base_width": 16, "depth": 2}
# One model of each family (fcn16s/32s are fcn8s with fewer skips; the 101-layer ResNets repeat the 50-layer's blocks;
# deeplabv3_resnet50 is fcn_resnet50's trunk under deeplabv3_mobilenet_v3_large's head; smp's resnet34 encoder is
# resnet18's with more blocks), each at an odd size, where the crops and resizes of odd maps are in the graph (smp's
# DeepLabV3+ takes multiples of its output stride only, as smp's); benchmarks/export_zoo.py exports every model at any
# size. FCN-8s and
# U-Net are exported narrower than their defaults, the same graphs with fewer channels: fcn8s' fc6 and fc7 at 4096 are
# 120 M of its 134 M parameters, and an export of its 540 MB graph takes minutes on 2 CPU cores.
ZOO = {
    "fcn8s": ({"num_classes": 3, "fc_channels": 256}, [(67, 45)]),
    "unet": ({"num_classes": 2, "base_width": 16}, [(67, 45)]),
    "fcn_resnet50": ({"num_classes": 3}, [(67, 45)]),
    "deeplabv3_mobilenet_v3_large": ({"num_classes": 3}, [(67, 45)]),
    "lraspp_mobilenet_v3_large": ({"num_classes": 3}, [(67, 45)]),
    "smp_unet": ({"num_classes": 2, "encoder": "resnet18"}, [(65, 97)]),
    "smp_deeplabv3plus": ({"num_classes": 2, "encoder": "resnet18"}, [(96, 160)]),
}


def random_segmenter(config: dict, size=(64, 64), seed=0) -> Segmenter:
  """A Segmenter with random values in the model's variable shapes (no initialiser to compile); BatchNorm variances
  positive, so every layer's statistics count."""
  model = models.build_model(config)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *size, 3)))
  rng = np.random.default_rng(seed)

  def value(path, leaf):
    if path[-1].key == "var":
      return (0.5 + rng.random(leaf.shape)).astype(np.float32)
    scale = 1.0 / np.sqrt(max(np.prod(leaf.shape[:-1]), 1))  # fan-in scaling keeps deep models' logits finite
    return (rng.standard_normal(leaf.shape) * scale).astype(np.float32)

  return Segmenter(model, jax.tree_util.tree_map_with_path(value, shapes))


def onnx_ops(path):
  import onnx
  graph = onnx.load(path).graph
  return {(node.domain, node.op_type) for node in graph.node}


def test_portable_forms_trace_no_native_kernel_and_give_the_same_values():
  conv = Conv(16, (3, 3), padding=((1, 1), (1, 1)))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 20, 20, 32)), jnp.float32)
  params = conv.init(jax.random.PRNGKey(0), x)
  fast = jax.jit(conv.apply).lower(params, x).as_text()
  with portable_forms():
    portable = jax.jit(conv.apply).lower(params, x).as_text()
    portable_values = jax.jit(conv.apply)(params, x)
  assert exporting.native_targets_in(portable) == []
  assert "platform_index" not in portable and "case" not in portable.split("func.func")[1]
  if native.available():  # the check above means something only where the fast form holds the kernel
    assert exporting.native_targets_in(fast) == ["fcnjax_conv_forward"]
  np.testing.assert_allclose(portable_values, jax.jit(conv.apply)(params, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,stride,padding,ceil_mode,size", [
    (2, 2, 0, False, (9, 8)), (2, 2, 0, True, (9, 7)), (3, 2, 1, True, (10, 13)), (3, 1, 1, False, (6, 5))])
def test_portable_max_pool_equals_the_tap_maximum(window, stride, padding, ceil_mode, size):
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, *size, 5)), jnp.float32)
  expected = max_pool(x, window, stride, padding, ceil_mode)
  with portable_forms():
    actual = max_pool(x, window, stride, padding, ceil_mode)
  np.testing.assert_array_equal(actual, expected)


def test_stablehlo_runs_deserialized_with_any_batch_and_holds_no_native_kernel(tmp_path):
  segmenter = random_segmenter(TINY_UNET)
  path = exporting.save_stablehlo(segmenter, str(tmp_path / "unet.stablehlo"), 37, 21)
  exported = exporting.load_stablehlo(path)
  assert set(exported.platforms) == {"cpu", "cuda"}
  assert exporting.native_targets_in(exported.mlir_module()) == []
  for batch in (1, 3):
    images = exporting.example_images(37, 21, batch)
    expected = exporting.reference_logits(segmenter, images)
    assert exporting.relative_difference(exported.call(images), expected) <= TOLERANCE


def test_preprocessing_inside_the_graph_is_fcnjax_normalisation(tmp_path):
  segmenter = random_segmenter(TINY_UNET)
  images = exporting.example_images(32, 24, 2, preprocessing=True)
  path = exporting.save_stablehlo(segmenter, str(tmp_path / "unet.stablehlo"), 32, 24, preprocessing=True)
  normalised = np.stack([segmenter.logits(image) for image in images])
  assert exporting.relative_difference(exporting.load_stablehlo(path).call(images), normalised) <= TOLERANCE


def test_requests_that_cannot_be_exported_say_why(tmp_path, monkeypatch):
  segmenter = random_segmenter(TINY_UNET)
  with pytest.raises(exporting.ExportError, match="must be positive, got 0x32"):
    exporting.check_size(segmenter, 0, 32)
  bad = tmp_path / "bad.stablehlo"
  bad.write_bytes(b"not a graph")
  with pytest.raises(exporting.ExportError, match="bad.stablehlo: not a file written by jax.export"):
    exporting.load_stablehlo(str(bad))
  real_import = importlib.import_module
  monkeypatch.setattr(importlib, "import_module",
                      lambda name, *a: (_ for _ in ()).throw(ImportError(name)) if name == "jax2onnx"
                      else real_import(name, *a))
  with pytest.raises(exporting.ExportError, match=r"needs the package 'jax2onnx'.*pip install 'fcnjax\[export\]'"):
    exporting.save_onnx(segmenter, str(tmp_path / "unet.onnx"), 32, 32)
  assert not (tmp_path / "unet.onnx").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_exports_to_both_formats_and_the_runtimes_match_fcnjax(name, tmp_path):
  pytest.importorskip("jax2onnx")
  options, sizes = ZOO[name]
  segmenter = random_segmenter({"name": name, **options}, sizes[0])
  for height, width in sizes:
    images = exporting.example_images(height, width, batch=2)
    expected = exporting.reference_logits(segmenter, images)
    scale = float(np.max(np.abs(expected)))
    stablehlo = exporting.load_stablehlo(exporting.save_stablehlo(
        segmenter, str(tmp_path / f"{name}_{height}x{width}.stablehlo"), height, width))
    assert exporting.native_targets_in(stablehlo.mlir_module()) == []
    difference = exporting.relative_difference(stablehlo.call(images), expected)
    record_parity(f"export: {name} {height}x{width} StableHLO (jax.export.deserialize)", difference * scale, scale)
    assert difference <= TOLERANCE
    onnx_path = exporting.save_onnx(segmenter, str(tmp_path / f"{name}_{height}x{width}.onnx"), height, width)
    assert not [op for op in onnx_ops(onnx_path) if "fcnjax" in "".join(op)]
    difference = exporting.relative_difference(exporting.run_onnx(exporting.onnx_session(onnx_path), images), expected)
    record_parity(f"export: {name} {height}x{width} ONNX (ONNX Runtime)", difference * scale, scale)
    assert difference <= TOLERANCE


@pytest.mark.slow
def test_export_command_writes_verified_files_and_a_description(tmp_path):
  segmenter = random_segmenter(TINY_UNET)
  weights = pretrained.save_variables(str(tmp_path / "weights"), segmenter.variables)
  out = tmp_path / "exported" / "tiny"
  result = run_python("-m", "fcnjax.export", f"--weights={weights}", "--model=unet", "--height=45", "--width=33",
                      "--model_option=base_width=16", "--model_option=depth=2", f"--out={out}", "--preprocessing",
                      "--format=stablehlo", "--format=onnx", timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "ONNX Runtime matches fcnjax" in result.stdout
  description = json.loads((tmp_path / "exported" / "tiny.json").read_text())
  assert description["input"]["dtype"] == "uint8" and description["output"]["shape"] == ["N", 45, 33, 3]
  assert set(description["verified"]) == {"stablehlo", "onnx"}
  images = exporting.example_images(45, 33, 2, preprocessing=True)
  import onnxruntime
  session = onnxruntime.InferenceSession(str(out) + ".onnx", providers=["CPUExecutionProvider"])
  expected = np.stack([segmenter.logits(image) for image in images])
  assert exporting.relative_difference(session.run(None, {"images": images})[0], expected) <= TOLERANCE


@pytest.mark.slow
def test_export_command_errors_are_one_line(tmp_path):
  segmenter = random_segmenter(TINY_UNET)
  weights = pretrained.save_variables(str(tmp_path / "weights"), segmenter.variables)
  os.makedirs(tmp_path / "empty_run")
  cases = [
      (["--workdir", str(tmp_path / "empty_run"), "--height=32"], "config.json not found"),
      ([f"--weights={weights}", "--model=fcn8s", "--height=32"], "not weights of"),
      ([f"--weights={weights}", "--model=unet", "--model_option=base_width=16", "--model_option=depth=2",
        "--height=-5"], "must be positive, got -5x-5"),
  ]
  for args, message in cases:
    result = run_python("-m", "fcnjax.export", *args, f"--out={tmp_path / 'x'}", "--format=stablehlo")
    assert result.returncode == 1, (args, result.stderr[-1000:])
    last = result.stderr.strip().splitlines()[-1]
    assert message in last and "Traceback" not in result.stderr, (args, result.stderr[-1000:])
