"""A Segmenter's model as a file other runtimes run: StableHLO (jax.export) and ONNX (jax2onnx, run by ONNX Runtime).

  seg = fcnjax.Segmenter.from_run("runs/pet_fcn8s")
  exporting.save_stablehlo(seg, "fcn8s.stablehlo", height=512, width=512)
  exporting.save_onnx(seg, "fcn8s.onnx", height=512, width=512)

The exported graph maps a batch of images (N, H, W, 3) (N, H, W, in_channels for a model that has them) to the
model's logits (N, H, W, K), float32, with the weights inside the file. N is symbolic ("N" in ONNX); H and W are the
sizes given: the models crop and resize by sizes known when tracing. The graph is traced with
`fcnjax.ops.portable_forms()`, so it holds lax's own convolutions and none of fcnjax's C++ CPU kernels (a speed-up
of this library, not part of a model). With `preprocessing=True` it takes uint8 images and normalises them inside
(the segmenter's mean and std); without, it takes float32 images normalised as `fcnjax.data.normalize` does:
(image - 255 mean) / (255 std).
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fcnjax.ops import portable_forms

FORMATS = ("stablehlo", "onnx")
# What runs each format when it is verified.
RUNTIMES = {"stablehlo": "jax.export.deserialize", "onnx": "ONNX Runtime"}
# jax.export lowers for these platforms at once; lowering for CUDA needs no GPU.
PLATFORMS = ("cpu", "cuda")
# The package each format needs at export / run time, and where it comes from.
PACKAGES = {"onnx": ("jax2onnx", "onnx", "onnxruntime")}
INSTALL_HINT = "pip install 'fcnjax[export]'"
# Names of the C++ CPU kernels' XLA targets (fcnjax.ops.native); none may appear in an exported graph.
NATIVE_TARGETS = ("fcnjax_conv_forward", "fcnjax_conv_weight_grad", "fcnjax_depthwise_forward",
                  "fcnjax_depthwise_input_grad", "fcnjax_depthwise_weight_grad")
ONNX_INPUT, ONNX_OUTPUT = "images", "logits"


class ExportError(ValueError):
  """A request that cannot be exported: a size the model cannot take, a missing package, a bad file."""


def require(format_name: str) -> None:
  """Raises ExportError naming the package to install when a format's packages are missing."""
  for package in PACKAGES.get(format_name, ()):
    try:
      importlib.import_module(package)
    except ImportError as e:
      raise ExportError(f"{format_name} export needs the package {package!r} ({e}); {INSTALL_HINT}") from None


def logits_fn(segmenter, preprocessing: bool = False) -> Callable[[jax.Array], jax.Array]:
  """images -> float32 logits 'out' of the segmenter's model in eval mode, its weights closed over."""
  model, variables = segmenter.model, segmenter.variables
  scale = 1.0 / (np.asarray(segmenter.std, np.float32) * 255.0)
  mean = np.asarray(segmenter.mean, np.float32) * 255.0

  def fn(images):
    if preprocessing:  # the same arithmetic as fcnjax.data.normalize_with
      images = (images.astype(jnp.float32) - mean) * scale
    return model.apply(variables, images, train=False)["out"].astype(jnp.float32)

  return fn


def input_dtype(preprocessing: bool):
  return np.uint8 if preprocessing else np.float32


def describe(segmenter, model_name: str, height: int, width: int, preprocessing: bool = False) -> dict:
  """What an exported graph takes and gives, for the JSON written beside it; ExportError for a size the model cannot
  take (check_size)."""
  num_classes = check_size(segmenter, height, width)[-1]
  return {
      "model": model_name,
      "input": {"name": ONNX_INPUT, "shape": ["N", height, width, segmenter.channels], "layout": "NHWC",
                "dtype": np.dtype(input_dtype(preprocessing)).name,
                "normalisation": ("inside the graph" if preprocessing else
                                  "(uint8 image - 255 * mean) / (255 * std)"
                                  + (", RGB" if segmenter.channels == 3 else ", per channel"))},
      "mean": list(segmenter.mean), "std": list(segmenter.std),
      "output": {"name": ONNX_OUTPUT, "shape": ["N", height, width, int(num_classes)], "layout": "NHWC",
                 "dtype": "float32", "meaning": "logits; class ids = argmax over the last axis"
                 + (" (one logit: sigmoid > 0.5 is the foreground)" if num_classes == 1 else "")},
      "verified": {},
  }


def check_size(segmenter, height: int, width: int) -> tuple[int, ...]:
  """The logits' shape for one (height, width) image; ExportError when the model cannot take such images or does not
  give logits of that size."""
  if height < 1 or width < 1:
    raise ExportError(f"height and width must be positive, got {height}x{width}")
  try:
    shape = output_shape(segmenter, height, width)
  except Exception as e:  # a shape error from inside the model: say which size, keep the model's reason
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ExportError(f"the model cannot take {height}x{width} images: {reason}") from None
  if shape[1:3] != (height, width):
    raise ExportError(f"the model gives {shape[1]}x{shape[2]} logits for {height}x{width} images")
  return shape


def output_shape(segmenter, height: int, width: int) -> tuple[int, ...]:
  """The logits' shape for one (height, width) image, traced without computing."""
  with portable_forms():
    images = jax.ShapeDtypeStruct((1, height, width, segmenter.channels), jnp.float32)
    return tuple(jax.eval_shape(logits_fn(segmenter), images).shape)


def export_stablehlo(segmenter, height: int, width: int, preprocessing: bool = False,
                     platforms=PLATFORMS) -> jax.export.Exported:
  """The model lowered by jax.export for `platforms`, batch size symbolic."""
  check_size(segmenter, height, width)
  batch, = jax.export.symbolic_shape("N")
  images = jax.ShapeDtypeStruct((batch, height, width, segmenter.channels), input_dtype(preprocessing))
  with portable_forms():
    return jax.export.export(jax.jit(logits_fn(segmenter, preprocessing)), platforms=platforms)(images)


def save_stablehlo(segmenter, path: str, height: int, width: int, preprocessing: bool = False) -> str:
  """Writes jax.export's serialized bytes to `path`; returns the path."""
  exported = export_stablehlo(segmenter, height, width, preprocessing)
  _write_bytes(path, exported.serialize())
  return path


def load_stablehlo(path: str) -> jax.export.Exported:
  """The Exported in `path`; call it as `exported.call(images)`."""
  with open(path, "rb") as f:
    serialized = f.read()
  try:
    return jax.export.deserialize(bytearray(serialized))
  except Exception as e:
    raise ExportError(f"{path}: not a file written by jax.export's serialize ({type(e).__name__})") from None


def save_onnx(segmenter, path: str, height: int, width: int, preprocessing: bool = False,
              opset: int = 21) -> str:
  """Writes the model as ONNX (jax2onnx), batch dimension "N"; returns the path."""
  require("onnx")
  check_size(segmenter, height, width)
  import jax2onnx

  images = jax.ShapeDtypeStruct(("N", height, width, segmenter.channels), input_dtype(preprocessing))
  with portable_forms():
    proto = jax2onnx.to_onnx(logits_fn(segmenter, preprocessing), [images], model_name="fcnjax", opset=opset,
                             input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT])
  _write_bytes(path, proto.SerializeToString())
  return path


def onnx_session(path: str, threads: int = 0, profile_prefix: str | None = None):
  """An ONNX Runtime session on the default CPU provider; threads=0 lets ORT choose. With `profile_prefix`, ORT's
  profiler records every run into a JSON file of that prefix (session.end_profiling() names it)."""
  require("onnx")
  import onnxruntime

  options = onnxruntime.SessionOptions()
  if threads:
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
  if profile_prefix:
    options.enable_profiling = True
    options.profile_file_prefix = profile_prefix
  try:
    return onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
  except Exception as e:
    raise ExportError(f"{path}: ONNX Runtime cannot load it: {str(e).splitlines()[0]}") from None


def run_onnx(session, images: np.ndarray) -> np.ndarray:
  return session.run([ONNX_OUTPUT], {ONNX_INPUT: images})[0]


def native_targets_in(text: str) -> list[str]:
  """fcnjax's C++ kernel targets named in a graph's text (StableHLO or ONNX); an exported graph has none."""
  return [name for name in NATIVE_TARGETS if name in text]


def relative_difference(actual: np.ndarray, expected: np.ndarray) -> float:
  """max |actual - expected| / max |expected|: the measure exported files are held to (<= 1e-4)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  if actual.shape != expected.shape:
    raise ExportError(f"exported output has shape {actual.shape}, fcnjax's {expected.shape}")
  return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def example_images(height: int, width: int, batch: int = 2, preprocessing: bool = False, seed: int = 0,
                   channels: int = 3) -> np.ndarray:
  """Random images of the exported graph's input type: uint8, or float32 normalised-looking values."""
  rng = np.random.default_rng(seed)
  if preprocessing:
    return rng.integers(0, 256, (batch, height, width, channels), dtype=np.uint8)
  return rng.standard_normal((batch, height, width, channels), dtype=np.float32)


def reference_logits(segmenter, images: np.ndarray, preprocessing: bool = False) -> np.ndarray:
  """fcnjax's own logits for `images` (its fastest forms, C++ kernels included where they apply)."""
  return np.asarray(jax.jit(logits_fn(segmenter, preprocessing))(images))


def verify(format_name: str, path: str, segmenter, height: int, width: int, preprocessing: bool = False,
           batch: int = 2) -> float:
  """Runs the file at `path` in its runtime (deserialized jax.export, or ONNX Runtime) on random images of batch
  `batch` and returns its relative difference from fcnjax's logits."""
  images = example_images(height, width, batch, preprocessing, channels=segmenter.channels)
  expected = reference_logits(segmenter, images, preprocessing)
  if format_name == "stablehlo":
    actual = load_stablehlo(path).call(images)
  else:
    actual = run_onnx(onnx_session(path), images)
  return relative_difference(actual, expected)


def _write_bytes(path: str, payload: bytes) -> None:
  """Writes `payload` whole or not at all: a failed write leaves no half file under `path`."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(payload)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
