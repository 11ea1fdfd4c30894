"""fcnjax against PyTorch on the same network, the same shapes and the same weights, in one process.

  python -m benchmarks.compare_torch                                   # fcn8s, unet, fcn_resnet50; batch 2, 224x224
  python -m benchmarks.compare_torch --models unet --size 64 --steps 2 --rounds 2   # a quick check of the script
  python -m benchmarks.compare_torch --models all                      # also the rest of the torchvision/smp zoo
  python -m benchmarks.compare_torch --dtype bfloat16 --out runs/bench/bf16.json
  python -m benchmarks.compare_torch --precision highest             # on a GPU: float32 without TF32 in both

Each model is timed twice, as a train step and as inference:
- train: fcnjax's jitted `steps.train_step` (SGD momentum 0.9, cross-entropy with ignore_index 255, aux head weighted
  0.5 as in torchvision's reference, state donated) against the PyTorch model with torch.optim.SGD(momentum=0.9),
  F.cross_entropy and loss.backward() -- eager, and also torch.compile(model) (inductor, default mode) unless
  --no_torch_compile; where torch.compile fails, its row says why and the others go on.
- inference: the model's forward pass in eval mode (fcnjax returns every head, as torchvision's fcn_resnet50 computes
  its aux head in eval mode too, so both do the same work); and, where onnxruntime is installed, ONNX Runtime's
  default CPU provider on the same threads running two files: PyTorch's own export of the reference
  (torch.onnx.export, TorchScript exporter, opset 17, every head: 'onnxruntime-torch', the peer a PyTorch user
  deploys with) and the file fcnjax exports (fcnjax.exporting.save_onnx, with jax2onnx: 'onnxruntime'), which holds
  the 'out' head only, so for a model with an aux head that ORT run does less work than the others.
The references are tests.torch_reference.fcn.FCN8s, tests.torch_reference.unet.UNet (64..1024, BatchNorm,
transposed-conv up-sampling), torchvision.models.segmentation's builders (aux_loss=True where they have one) and
segmentation_models_pytorch's Unet and DeepLabV3Plus on a resnet34 encoder. fcnjax gets the torch model's initial
weights through the converters, and the two inference outputs are compared once ("parity"), which
checks that the two networks really are the same one.

Frameworks take turns in rounds (see benchmarks/harness.py). Reported per model and mode: images/s (median and
min-max over rounds), fcnjax/torch (median of per-round ratios), time to the first step (fcnjax: cold, then warm --
the step made again in the same process after jax.clear_caches(), loaded from the executable cache's file
(fcnjax.executable_cache) as a repeated command loads it; --no_warm_start skips it) and its phases (cold: jax's
tracing, the lowering to StableHLO, XLA's compile; warm: the cache's key and load, the step itself), GFLOP per
step from XLA's cost analysis (useful multiply-adds x 2; the same count is used for torch, as it is the same
network), achieved GFLOP/s and its fraction of the device's peak, and peak memory:
- fcnjax: XLA's buffer plan for the step (compiled.memory_analysis(): arguments + outputs - donated aliases + temps);
- torch on GPU: torch.cuda.max_memory_allocated() over a few steps (parameters included);
- torch on CPU: the peak RSS of a separate torch-only process over a few steps, minus its RSS before the model was
  built (parameters, gradients, momentum, activations, and whatever the allocator keeps).

Memory: --keep_freed_memory runs the process with fcnjax.host_allocator.keep_freed_memory(); the setting is the
process's, so torch runs with it too (benchmarks/host_allocator.py times each framework with and without it).

Threads: both frameworks use --threads cores (default: every core this process may run on). XLA:CPU sizes its pool
by the process's CPU affinity, which --threads restricts; torch gets torch.set_num_threads(--threads).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

if __package__ in (None, ""):  # run as a file (python benchmarks/compare_torch.py): make `benchmarks` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402 pylint: disable=g-import-not-at-top

# The default set; --models all adds the rest of the zoo.
MODELS = ("fcn8s", "unet", "fcn_resnet50")
SMP_MODELS = {"smp_unet": "Unet", "smp_deeplabv3plus": "DeepLabV3Plus"}  # fcnjax name -> smp class
SMP_ENCODER = "resnet34"  # smp's default encoder
ALL_MODELS = MODELS + ("fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large",
                       "lraspp_mobilenet_v3_large", *SMP_MODELS)
MODES = ("train", "infer")
PRECISIONS = ("default", "highest", "tf32")
NUM_CLASSES = 21  # VOC's, as torchvision's segmentation weights
LEARNING_RATE = 0.01
AUX_WEIGHT = 0.5  # torchvision references/segmentation: loss = out + 0.5 * aux; fcnjax.losses' default


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {ALL_MODELS}, or 'all'")
  p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--size", type=int, default=224, help="square input size")
  p.add_argument("--num_classes", type=int, default=NUM_CLASSES)
  p.add_argument("--steps", type=int, default=1, help="timed steps per framework per round")
  p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
  p.add_argument("--threads", type=int, default=0, help="CPU threads for both frameworks (0 = all allowed cores)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="bfloat16: fcnjax compute dtype bfloat16 (params float32); torch autocast(bfloat16)")
  p.add_argument("--no_cut_band", action="store_true",
                 help="fcn8s: convolve the whole band of padding-only pixels, as the reference nets do "
                      "(fcnjax.models.padding_band)")
  p.add_argument("--no_torch_compile", action="store_true", help="skip torch.compile(model) (default mode)")
  p.add_argument("--precision", choices=PRECISIONS, default="default",
                 help="float32 matmuls and convolutions on a GPU: 'highest' = true float32 in both frameworks (TF32 "
                      "off), 'tf32' = TF32 tensor cores in both; 'default' leaves each framework's own default")
  p.add_argument("--no_onnxruntime", action="store_true", help="skip the ONNX Runtime columns of inference")
  p.add_argument("--no_warm_start", action="store_true",
                 help="skip fcnjax's first step from the persistent compilation cache (a second compile)")
  p.add_argument("--torch_channels_last", action="store_true", help="torch in channels_last memory format")
  p.add_argument("--no_memory", action="store_true", help="skip the torch CPU memory probe (a subprocess per model)")
  p.add_argument("--cpu_ghz", type=float, default=None, help="CPU clock for the peak estimate (default: cpu MHz)")
  p.add_argument("--compilation_cache", default="",
                 help="fcnjax's persistent XLA cache folder, with the executable cache in it: a second run with the "
                      "same folder times the start that a repeated training command sees")
  p.add_argument("--keep_freed_memory", action="store_true",
                 help="fcnjax.host_allocator.keep_freed_memory(), as the entry points' --keep_freed_memory (for the "
                      "whole process: torch runs with it too)")
  p.add_argument("--out", default="", help="write the results as JSON here")
  p.add_argument("--probe_torch_memory", default="", help=argparse.SUPPRESS)  # internal: 'model:mode'
  args = p.parse_args(argv)
  args.models = list(ALL_MODELS) if args.models == "all" else [m for m in args.models.split(",") if m]
  args.modes = [m for m in args.modes.split(",") if m]
  for m in args.models:
    if m not in ALL_MODELS:
      p.error(f"--models: unknown model {m!r}; expected some of {ALL_MODELS}")
  for m in args.modes:
    if m not in MODES:
      p.error(f"--modes: unknown mode {m!r}; expected some of {MODES}")
  return args


# --------------------------------------------------------------------------------------------------------------------
# The two sides of each model


def torch_model(name: str, num_classes: int):
  """The PyTorch reference network, with zero-initialised layers given small random weights and BatchNorm's
  statistics and affine parameters drawn at random, so that the parity check compares more than zeros (FCN-8s'
  score layers start at zero) and eval-mode BatchNorm is not the identity it is when fresh."""
  import torch  # pylint: disable=g-import-not-at-top
  from tests.torch_reference import randomize_batch_norm  # pylint: disable=g-import-not-at-top
  if name == "fcn8s":
    from tests.torch_reference.fcn import FCN8s  # pylint: disable=g-import-not-at-top
    model = FCN8s(num_classes)
  elif name == "unet":
    from tests.torch_reference.unet import UNet  # pylint: disable=g-import-not-at-top
    model = UNet(num_classes=num_classes)
  elif name in SMP_MODELS:
    import segmentation_models_pytorch as smp  # pylint: disable=g-import-not-at-top
    model = getattr(smp, SMP_MODELS[name])(SMP_ENCODER, encoder_weights=None, classes=num_classes)
  else:
    from torchvision.models import segmentation  # pylint: disable=g-import-not-at-top
    aux = {} if name.startswith("lraspp") else {"aux_loss": True}  # LR-ASPP has no aux head
    model = getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=num_classes, **aux)
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for param in model.parameters():
      if param.dim() > 1 and not param.any():
        param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
  return randomize_batch_norm(model, seed=generator)  # the stream that drew the zeroed weights


def flax_variables_from_torch(name: str, model) -> dict:
  """The torch model's weights through fcnjax's converter for its architecture (the test twins' own for FCN-8s and
  U-Net, which torchvision does not ship)."""
  if name == "fcn8s":
    from tests.torch_reference.fcn import to_flax_variables  # pylint: disable=g-import-not-at-top
    return to_flax_variables(model)
  if name == "unet":
    from tests.torch_reference.unet import flax_variables  # pylint: disable=g-import-not-at-top
    return flax_variables(model)
  from fcnjax import conversion  # pylint: disable=g-import-not-at-top
  state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
  return conversion.get_converter(name)(state)


def fcnjax_model_config(name: str, num_classes: int, dtype: str, cut_band: bool = True) -> dict:
  """The fcnjax model config of the network the torch reference builds."""
  config = {"name": name, "num_classes": num_classes, "dtype": dtype}
  if name == "fcn8s":
    config["variant"] = "paper"  # the reference nets' FCN-8s, as tests.torch_reference.fcn
    config["cut_band"] = cut_band
  if name in SMP_MODELS:
    config["encoder"] = SMP_ENCODER
  return config


def fcnjax_model(name: str, num_classes: int, dtype: str, cut_band: bool = True):
  from fcnjax import models  # pylint: disable=g-import-not-at-top
  return models.build_model(fcnjax_model_config(name, num_classes, dtype, cut_band))


# --------------------------------------------------------------------------------------------------------------------
# Runners: run(n) does n steps, waits for the device, and returns the seconds taken.


def _cost_flops(lowered_or_compiled) -> float | None:
  cost = lowered_or_compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  flops = (cost or {}).get("flops")
  return float(flops) if flops else None


def _forward_flops(model, variables, images) -> float | None:
  """The model's forward-pass FLOPs from XLA's cost analysis, lowered for CUDA: there fcnjax keeps lax's
  convolutions, while on CPU most of them are custom calls to fcnjax.ops.native, whose FLOPs XLA does not see.
  The network's own count, as PyTorch computes it: the FCN models' trunk with its band of padding-only pixels
  (`cut_band`, 30% of fcn8s' FLOPs at 224x224) counted in."""
  import jax  # pylint: disable=g-import-not-at-top
  model = harness.as_the_reference_computes(model)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False)).trace(variables, images)
  try:
    return _cost_flops(forward.lower(lowering_platforms=("cuda",)))
  except Exception:  # pylint: disable=broad-except
    return None


def _planned_bytes(compiled) -> int | None:
  from fcnjax import memory  # pylint: disable=g-import-not-at-top
  try:
    return memory.compiled_bytes(compiled)["total"]
  except RuntimeError:  # a backend without memory analysis
    return None


def _compile_timed(step, info, *args):
  """The executable of a CachedJit for these arguments, its stages' seconds in `info`: tracing, lowering and XLA's
  compile, or (from the executable cache, as a repeated command finds it) the key and the load."""
  executable = step.compile(*args)
  seconds = executable.stage_seconds
  info.trace_s, info.lower_s, info.compile_s = (seconds.get(k) for k in ("trace", "lower", "compile"))
  if executable.loaded:
    info.load_s = seconds["key"] + seconds["load"]
  return executable.compiled


@dataclasses.dataclass
class RunnerInfo:
  framework: str
  first_step_s: float = 0.0             # from nothing compiled to the end of the first step (jit: compile + step)
  trace_s: float | None = None          # fcnjax only: jax's tracing of the Python function,
  lower_s: float | None = None          # its lowering to StableHLO,
  compile_s: float | None = None        # XLA's compile (ONNX Runtime: the export and the session's set-up)
  load_s: float | None = None           # fcnjax, warm: the executable cache's key and load
  warm: dict | None = None              # fcnjax only: the first step again, loaded from the executable cache
  flops: float | None = None            # per step, XLA cost analysis of the forward (training: 3x it)
  memory_bytes: int | None = None
  memory_method: str = ""
  donated: bool | None = None
  file_bytes: int | None = None         # the exported file's size (ONNX Runtime only)
  error: str = ""


class FcnjaxTrain:
  """fcnjax's jitted, donating train step, kept in the folder `executables` as the train command keeps it;
  `analyse` adds its FLOPs, memory plan and donation to its info."""

  def __init__(self, model, variables: dict, images: np.ndarray, masks: np.ndarray, analyse: bool = True,
               executables: str | None = None):
    import jax  # pylint: disable=g-import-not-at-top
    from fcnjax import executable_cache, losses, optim, steps  # pylint: disable=g-import-not-at-top
    self.jax = jax
    variables = jax.device_put(variables)  # jax arrays, so that donation can consume them
    config = optim.default_config()
    config.schedule = "constant"
    config.learning_rate = LEARNING_RATE
    config.momentum = 0.9
    tx = optim.make_optimizer(config, total_steps=1)
    self.state = steps.create_train_state(model, tx, variables, jax.random.PRNGKey(0))
    self.batch = {"image": jax.device_put(images), "mask": jax.device_put(masks)}
    loss_config = losses.default_config()
    loss_config.aux_weight = AUX_WEIGHT
    self.step = executable_cache.CachedJit(
        functools.partial(steps.train_step, loss_config=loss_config, learning_rate_fn=lambda _: LEARNING_RATE),
        f"benchmarks.compare_torch train lr={LEARNING_RATE} momentum=0.9 aux_weight={AUX_WEIGHT} "
        f"model={executable_cache.describe_module(model)}", executables, donate_argnums=0)
    self.info = RunnerInfo("fcnjax", memory_method="XLA buffer plan (args + outputs - aliased + temps)")
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)  # the step donates them
    start = time.perf_counter()
    self.compiled = _compile_timed(self.step, self.info, self.state, self.batch)
    before = self.state
    self._step()
    jax.block_until_ready(self.state)
    self.info.first_step_s = time.perf_counter() - start
    if not analyse:
      return
    # Model FLOPs, 3x the forward pass (forward + input and weight gradients), not the compiled step's count: XLA's
    # cost analysis counts a loop body once (the strip weight gradients are loops) and no custom call.
    forward_flops = _forward_flops(model, shapes, self.batch["image"])
    self.info.flops = 3 * forward_flops if forward_flops else None
    self.info.memory_bytes = _planned_bytes(self.compiled)
    # Donation worked when the old state's buffers were consumed by the step.
    self.info.donated = all(leaf.is_deleted() for leaf in jax.tree.leaves(before.params))

  def _step(self):
    self.state, self.metrics = self.step(self.state, self.batch)

  def __call__(self, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      self._step()
    self.jax.block_until_ready((self.state, self.metrics))
    return time.perf_counter() - start


class FcnjaxInfer:
  """fcnjax's jitted forward pass in eval mode, kept in the folder `executables`; `analyse` adds its FLOPs and
  memory plan to its info."""

  def __init__(self, model, variables: dict, images: np.ndarray, analyse: bool = True,
               executables: str | None = None):
    import jax  # pylint: disable=g-import-not-at-top
    from fcnjax import executable_cache  # pylint: disable=g-import-not-at-top
    self.jax = jax
    self.variables = jax.device_put(variables)
    self.images = jax.device_put(images)
    self.forward = executable_cache.CachedJit(  # every head, as torch computes them all
        functools.partial(model.apply, train=False),
        f"benchmarks.compare_torch infer model={executable_cache.describe_module(model)}", executables)
    self.info = RunnerInfo("fcnjax", memory_method="XLA buffer plan (args + outputs + temps)")
    start = time.perf_counter()
    self.compiled = _compile_timed(self.forward, self.info, self.variables, self.images)
    self.outputs = self.forward(self.variables, self.images)
    jax.block_until_ready(self.outputs)
    self.info.first_step_s = time.perf_counter() - start
    if not analyse:
      return
    self.info.flops = _forward_flops(model, variables, self.images)
    self.info.memory_bytes = _planned_bytes(self.compiled)

  def __call__(self, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      self.outputs = self.forward(self.variables, self.images)
    self.jax.block_until_ready(self.outputs)
    return time.perf_counter() - start


class OrtTorchExport:
  """PyTorch's own ONNX export of the reference (every head) in ONNX Runtime's default CPU provider."""

  def __init__(self, module, images: np.ndarray, threads: int, directory: str):
    import torch  # pylint: disable=g-import-not-at-top
    from fcnjax import exporting  # pylint: disable=g-import-not-at-top
    self.images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    self.info = RunnerInfo("onnxruntime-torch")
    path = os.path.join(directory, "torch.onnx")
    example = torch.from_numpy(self.images)
    with torch.no_grad():
      heads = ["out", "aux"][:len(_torch_outputs(module.eval()(example)))]
    start = time.perf_counter()
    torch.onnx.export(module.eval(), (example,), path, dynamo=False, opset_version=17, input_names=["images"],
                      output_names=heads)
    self.info.file_bytes = os.path.getsize(path)
    self.session = exporting.onnx_session(path, threads)
    self.info.compile_s = time.perf_counter() - start  # export and session set-up
    self.heads = heads
    self._run()
    self.info.first_step_s = time.perf_counter() - start

  def _run(self):
    outputs = self.session.run(self.heads, {"images": self.images})
    self.outputs = {head: out.transpose(0, 2, 3, 1) for head, out in zip(self.heads, outputs)}

  def __call__(self, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      self._run()
    return time.perf_counter() - start


class OrtInfer:
  """fcnjax's exported ONNX file (the 'out' head) in ONNX Runtime's default CPU provider."""

  def __init__(self, model, variables: dict, images: np.ndarray, threads: int, directory: str):
    from fcnjax import exporting  # pylint: disable=g-import-not-at-top
    from fcnjax.segmenter import Segmenter  # pylint: disable=g-import-not-at-top
    self.run_onnx = exporting.run_onnx
    self.images = images
    self.info = RunnerInfo("onnxruntime")
    path = os.path.join(directory, "model.onnx")
    start = time.perf_counter()
    exporting.save_onnx(Segmenter(model, variables), path, images.shape[1], images.shape[2])
    self.info.file_bytes = os.path.getsize(path)
    self.session = exporting.onnx_session(path, threads)
    self.info.compile_s = time.perf_counter() - start  # export and session set-up
    self.outputs = {"out": self.run_onnx(self.session, images)}
    self.info.first_step_s = time.perf_counter() - start

  def __call__(self, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      self.outputs = {"out": self.run_onnx(self.session, self.images)}
    return time.perf_counter() - start


def importable(*packages: str) -> bool:
  try:
    for package in packages:
      __import__(package)
  except ImportError:
    return False
  return True


def _torch_outputs(out) -> list:
  """The heads of a torch model's output in a fixed order: ['out'] or ['out', 'aux']."""
  if isinstance(out, dict):
    return [out[k] for k in ("out", "aux") if k in out]
  return [out]


class TorchRunner:
  """Train step or inference of a torch model; `compiled` wraps the model in torch.compile."""

  def __init__(self, model, mode: str, images: np.ndarray, masks: np.ndarray, device: str, dtype: str,
               compiled: bool, channels_last: bool):
    import torch  # pylint: disable=g-import-not-at-top
    import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
    self.torch, self.F = torch, F
    self.device, self.mode = device, mode
    self.model = model
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(
        device, memory_format=memory_format)
    self.masks = torch.from_numpy(masks.astype(np.int64)).to(device)
    self.fn = torch.compile(model) if compiled else model
    self.autocast = functools.partial(torch.autocast, device_type=device.split(":")[0], dtype=torch.bfloat16,
                                      enabled=dtype == "bfloat16")
    if mode == "train":
      self.optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)
    self.info = RunnerInfo("torch.compile" if compiled else "torch")
    if device.startswith("cuda"):
      torch.cuda.synchronize()
      torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    self._step()
    self._sync()
    self.info.first_step_s = time.perf_counter() - start

  def _sync(self):
    if self.device.startswith("cuda"):
      self.torch.cuda.synchronize()

  def _step(self):
    if self.mode == "train":
      self.model.train()
      self.optimizer.zero_grad(set_to_none=True)
      with self.autocast():
        heads = _torch_outputs(self.fn(self.images))
      loss = sum(w * self.F.cross_entropy(h.float(), self.masks, ignore_index=255)
                 for w, h in zip((1.0, AUX_WEIGHT), heads))
      loss.backward()
      self.optimizer.step()
      self.outputs = loss
    else:
      self.model.eval()
      with self.torch.inference_mode(), self.autocast():
        self.outputs = _torch_outputs(self.fn(self.images))

  def __call__(self, n: int) -> float:
    self._sync()
    start = time.perf_counter()
    for _ in range(n):
      self._step()
    self._sync()
    return time.perf_counter() - start

  def record_cuda_memory(self):
    if self.device.startswith("cuda"):
      self.info.memory_bytes = self.torch.cuda.max_memory_allocated()
      self.info.memory_method = "torch.cuda.max_memory_allocated"


# --------------------------------------------------------------------------------------------------------------------
# Torch CPU memory, measured in a process of its own: RSS peaks cannot be told apart inside one process.


def probe_torch_memory(args) -> None:
  """(internal) Prints {'bytes': peak RSS - RSS before the model} for one torch model and mode, as JSON."""
  import torch  # pylint: disable=g-import-not-at-top
  name, mode = args.probe_torch_memory.split(":")
  threads = harness.pin_threads(args.threads)
  torch.set_num_threads(threads)
  # Import everything torch_model needs first, so that the baseline holds the libraries and not the model.
  import tests.torch_reference.fcn  # noqa: F401 pylint: disable=g-import-not-at-top,unused-import
  import tests.torch_reference.unet  # noqa: F401 pylint: disable=g-import-not-at-top,unused-import
  import torchvision.models.segmentation  # noqa: F401 pylint: disable=g-import-not-at-top,unused-import
  if name in SMP_MODELS:
    import segmentation_models_pytorch  # noqa: F401 pylint: disable=g-import-not-at-top,unused-import
  from fcnjax import memory  # pylint: disable=g-import-not-at-top
  images, masks = make_batch(args)
  baseline = memory.rss_bytes()
  memory.reset_peak_rss()
  model = torch_model(name, args.num_classes)
  runner = TorchRunner(model, mode, images, masks, "cpu", args.dtype, False, args.torch_channels_last)
  runner(2)
  print(json.dumps({"bytes": memory.peak_rss_bytes() - baseline}))


def torch_cpu_memory(args, name: str, mode: str) -> tuple[int | None, str]:
  command = [sys.executable, "-m", "benchmarks.compare_torch", "--probe_torch_memory", f"{name}:{mode}",
             "--batch", str(args.batch), "--size", str(args.size), "--num_classes", str(args.num_classes),
             "--threads", str(args.threads), "--dtype", args.dtype]
  if args.torch_channels_last:
    command.append("--torch_channels_last")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(command, capture_output=True, text=True, cwd=root, check=False)
  try:
    peak = json.loads(done.stdout.strip().splitlines()[-1])["bytes"]
    return peak, "peak RSS of a torch-only process - RSS before model"
  except (IndexError, KeyError, ValueError):
    return None, f"probe failed: {done.stderr.strip().splitlines()[-1:] or done.returncode}"


# --------------------------------------------------------------------------------------------------------------------


def make_batch(args) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  images = rng.standard_normal((args.batch, args.size, args.size, 3), dtype=np.float32)
  masks = rng.integers(0, args.num_classes, (args.batch, args.size, args.size), dtype=np.int32)
  return images, masks


def parity(jax_outputs: dict, torch_heads: list) -> dict:
  """Max |fcnjax - torch| over the inference heads, and the output scale it is relative to."""
  diffs, scale = [], 0.0
  for key, head in zip(("out", "aux"), torch_heads):
    ours = np.asarray(jax_outputs[key], dtype=np.float32)
    theirs = head.detach().float().cpu().numpy().transpose(0, 2, 3, 1)
    diffs.append(float(np.max(np.abs(ours - theirs))))
    scale = max(scale, float(np.max(np.abs(theirs))))
  return {"max_abs_diff": max(diffs), "max_abs_output": scale}


def fcnjax_runner(model, mode: str, variables: dict, images: np.ndarray, masks: np.ndarray, analyse: bool = True,
                  executables: str | None = None):
  import jax  # pylint: disable=g-import-not-at-top
  if mode == "train":
    return FcnjaxTrain(model, jax.tree.map(np.copy, variables), images, masks, analyse, executables)
  return FcnjaxInfer(model, variables, images, analyse, executables)


def bench_model(args, name: str, device: str, peak: harness.Peak, log, scratch: str) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  images, masks = make_batch(args)
  torch.manual_seed(0)
  reference = torch_model(name, args.num_classes).to(device)
  if args.torch_channels_last:
    reference = reference.to(memory_format=torch.channels_last)
  model = fcnjax_model(name, args.num_classes, args.dtype, cut_band=not args.no_cut_band)
  variables = jax.tree.map(np.asarray, flax_variables_from_torch(name, reference.cpu()))
  reference = reference.to(device)
  rows = []
  for mode in args.modes:
    log(f"{name} {mode}: compiling / first steps")
    ours = fcnjax_runner(model, mode, variables, images, masks, executables=args.executables)
    if not args.no_warm_start:
      jax.clear_caches()  # nothing compiled in memory: the executable comes from the executable cache's file
      warm = fcnjax_runner(model, mode, variables, images, masks, analyse=False, executables=args.executables)
      loaded = warm.info.load_s if warm.info.load_s is not None else sum(
          getattr(warm.info, k) or 0.0 for k in ("trace_s", "lower_s", "compile_s"))
      ours.info.warm = {"first_step_s": warm.info.first_step_s, "load_s": warm.info.load_s,
                        "step_s": warm.info.first_step_s - loaded}
    # Train runners update the weights; each torch runner gets its own copy so modes do not see each other's steps.
    contenders = {"fcnjax": ours}
    variants = [False] + ([] if args.no_torch_compile else [True])
    for compiled in variants:
      label = "torch.compile" if compiled else "torch"
      if compiled:  # dynamo's caches are per code object: models sharing torchvision's would hit its recompile limit
        torch._dynamo.reset()  # pylint: disable=protected-access
      module = torch_model(name, args.num_classes) if mode == "train" else reference
      module.load_state_dict(reference.state_dict())
      module = module.to(device)
      try:
        contenders[label] = TorchRunner(module, mode, images, masks, device, args.dtype, compiled,
                                        args.torch_channels_last)
      except Exception as e:  # torch.compile does not work everywhere (no compiler, unsupported op): say so, go on
        if not compiled:
          raise
        log(f"  torch.compile failed: {type(e).__name__}: {e}")
        rows.append({"model": name, "mode": mode, "framework": label, "error": f"{type(e).__name__}: {e}"[:300]})
    if mode == "infer" and args.onnxruntime and device == "cpu" and args.dtype == "float32":
      log(f"{name} {mode}: exporting to ONNX (torch.onnx.export, fcnjax.exporting)")
      contenders["onnxruntime-torch"] = OrtTorchExport(reference, images, args.threads_used, scratch)
      if args.jax2onnx:
        contenders["onnxruntime"] = OrtInfer(model, variables, images, args.threads_used, scratch)
    for _ in range(args.warmup):
      for runner in contenders.values():
        runner(1)
    check = parity(ours.outputs, contenders["torch"].outputs) if mode == "infer" else None
    out = ours.outputs["out"] if mode == "infer" else None
    ort_differences = {label: float(np.max(np.abs(np.asarray(out) - contenders[label].outputs["out"])))
                       for label in ("onnxruntime", "onnxruntime-torch") if label in contenders}
    rates = harness.interleave(contenders, rounds=args.rounds, steps=args.steps, items_per_step=args.batch, log=log)
    for label, runner in contenders.items():
      if isinstance(runner, TorchRunner):
        runner.record_cuda_memory()
        if device == "cpu" and label == "torch" and not args.no_memory:
          runner.info.memory_bytes, runner.info.memory_method = torch_cpu_memory(args, name, mode)
    flops = ours.info.flops
    for label, runner in contenders.items():
      spread = harness.Spread.of(rates[label])
      row = {"model": name, "mode": mode, "framework": label, "img_per_s": dataclasses.asdict(spread),
             **dataclasses.asdict(runner.info), "flops_per_step": flops}
      row.pop("flops")
      if flops:
        achieved = flops * spread.median / args.batch / 1e9
        row["achieved_gflops"] = achieved
        row["fraction_of_peak"] = achieved / peak.gflops if peak.gflops else None
      for other in contenders:
        if other != label and label == "fcnjax":
          row[f"ratio_vs_{other}"] = dataclasses.asdict(harness.ratio(rates["fcnjax"], rates[other]))
      if check and label == "torch":
        row["parity"] = check
      if label in ort_differences:
        row["parity"] = {"max_abs_diff": ort_differences[label], "max_abs_output": float(np.max(np.abs(out)))}
      rows.append(row)
  return rows


def _phases(info: dict | None) -> str:
  if not info or info.get("compile_s") is None:
    return ""
  if info.get("trace_s") is None:  # ONNX Runtime: the export and the session's set-up
    return f"{info['compile_s']:.1f}"
  return " / ".join(f"{info[k]:.1f}" for k in ("trace_s", "lower_s", "compile_s"))


def _warm_phases(warm: dict | None) -> str:
  if not warm or warm.get("load_s") is None:
    return ""
  return f"{warm['load_s']:.1f} / {warm['step_s']:.1f}"


def table(rows: list[dict]) -> str:
  formatted = []
  for r in rows:
    if r.get("error"):
      formatted.append({"model": r["model"], "mode": r["mode"], "framework": r["framework"],
                        "img/s median (min-max)": "failed: " + r["error"][:80]})
      continue
    spread = harness.Spread(**r["img_per_s"])
    ratios = [f"{k[9:]} {harness.Spread(**v).short()}" for k, v in r.items() if k.startswith("ratio_vs_")]
    formatted.append({
        "model": r["model"], "mode": r["mode"], "framework": r["framework"],
        "img/s median (min-max)": spread.short(),
        "fcnjax/other": "; ".join(ratios),
        "first step s": f"{r['first_step_s']:.1f}" + ("" if not r.get("warm")
                                                      else f" / {r['warm']['first_step_s']:.1f} warm"),
        "trace / lower / compile s": _phases(r),
        "warm: load / step s": _warm_phases(r.get("warm")),
        "GFLOP/step": "" if not r.get("flops_per_step") else f"{r['flops_per_step'] / 1e9:.1f}",
        "GFLOP/s": "" if r.get("achieved_gflops") is None else f"{r['achieved_gflops']:.0f}",
        "% peak": "" if r.get("fraction_of_peak") is None else f"{100 * r['fraction_of_peak']:.0f}",
        "peak MiB": harness.fmt_mb(r.get("memory_bytes")),
        "parity": ("" if "parity" not in r
                   else f"{r['parity']['max_abs_diff']:.1e} / {r['parity']['max_abs_output']:.1e}"),
    })
  columns = ["model", "mode", "framework", "img/s median (min-max)", "fcnjax/other", "first step s",
             "trace / lower / compile s", "warm: load / step s",
             "GFLOP/step", "GFLOP/s", "% peak", "peak MiB", "parity"]
  return harness.markdown_table(formatted, columns)


def set_precision(precision: str) -> None:
  """float32 matmul/convolution precision in both frameworks (they matter on GPUs with TF32 tensor cores only)."""
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  if precision == "default":
    return
  jax.config.update("jax_default_matmul_precision", "highest" if precision == "highest" else "tensorfloat32")
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.probe_torch_memory:
    probe_torch_memory(args)
    return
  if args.keep_freed_memory:
    from fcnjax import host_allocator  # pylint: disable=g-import-not-at-top
    host_allocator.keep_freed_memory()  # before any thread allocates
  threads = harness.pin_threads(args.threads)  # before the first jax computation starts XLA's thread pool
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from fcnjax import compilation_cache, executable_cache  # pylint: disable=g-import-not-at-top
  scratch_dir = tempfile.TemporaryDirectory()
  args.executables = None
  if args.compilation_cache or not args.no_warm_start:  # a fresh cache unless one is given: the first steps start cold
    cache = compilation_cache.enable(args.compilation_cache or os.path.join(scratch_dir.name, "xla"))
    args.executables = executable_cache.directory_for(cache)
  backend = jax.default_backend()
  device = "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"
  if (backend == "gpu") != (device == "cuda"):
    raise SystemExit(f"jax runs on {backend} but torch on {device}: both frameworks must use the same device")
  set_precision(args.precision)
  if device == "cuda":
    torch.backends.cudnn.benchmark = True  # cuDNN picks its algorithms, as XLA autotunes its own
    device_name = torch.cuda.get_device_name()
    peak = harness.gpu_peak(device_name, args.dtype, tf32=args.precision != "highest")
  else:
    torch.set_num_threads(threads)
    device_name = jax.devices()[0].device_kind
    peak = harness.cpu_peak(threads, args.cpu_ghz)
  log = functools.partial(print, flush=True)
  environment = {
      "device": device, "device_name": device_name, "threads": threads, "torch_threads": torch.get_num_threads(),
      "peak_gflops": peak.gflops, "peak_assumption": peak.assumption, "jax": jax.__version__,
      "torch": torch.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""), "precision": args.precision,
      "compilation_cache": args.compilation_cache, "keep_freed_memory": args.keep_freed_memory,
  }
  log(f"{device_name}: fcnjax (XLA) and torch both on {threads} threads" if device == "cpu" else device_name)
  log(f"peak: {peak.assumption}")
  args.onnxruntime = not args.no_onnxruntime and importable("onnxruntime", "onnx")
  args.jax2onnx = args.onnxruntime and importable("jax2onnx")
  args.threads_used = threads
  rows = []
  start = time.perf_counter()
  with scratch_dir:
    for name in args.models:
      rows += bench_model(args, name, device, peak, log, scratch_dir.name)
  log(f"\nbatch {args.batch}, {args.size}x{args.size}, {args.dtype}, {args.rounds} rounds x {args.steps} steps, "
      f"{time.perf_counter() - start:.0f} s in all")
  log(table(rows))
  log("parity: max |fcnjax - other| and max |other| of the inference outputs on the same weights (onnxruntime, "
      "onnxruntime-torch: their 'out' against fcnjax's)")
  if args.out:
    harness.write_json(args.out, {"args": vars(args), "environment": environment, "results": rows})
    log(f"wrote {args.out}")


if __name__ == "__main__":
  main()
