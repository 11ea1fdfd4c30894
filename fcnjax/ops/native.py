"""fcnjax's C++ convolution kernels for XLA:CPU (native_conv.cc): built on first use, called through the XLA FFI.

The kernels are compiled with the machine's C++ compiler (`$CXX`, else c++ or g++) for the machine's own vector
units (-march=native), against the FFI headers that jaxlib ships, into a cache folder (`$FCNJAX_CACHE_DIR`, else
~/.cache/fcnjax). The library's name holds a hash of the source, the compiler, its flags, jaxlib's version and the
CPU's features, so a changed source, toolchain or machine builds anew and a shared cache never serves a library
built for another CPU. The folder is created private (0700); a folder or library that another user owns or can
write is never loaded from (fcnjax warns and builds into a private temporary folder instead). Without a compiler,
or when the build fails, fcnjax warns once and every convolution keeps the pure-XLA forms (fcnjax.ops.conv).

Switches: FCNJAX_NATIVE=0 turns the kernels off for the process (for comparisons and debugging); `kernels_enabled`
turns them off for what is traced inside it (a run's `config.native_kernels`); FCNJAX_WINOGRAD=0 turns off
Winograd's F(2x2, 3x3) (`supports_winograd`), leaving the direct kernels; FCNJAX_NATIVE_LANES=8 or 16 builds the
register blocks of 8-float (AVX2) or 16-float (AVX-512) vectors whatever the machine has (tests/test_conv.py runs
the other target's blocks this way).

The calls (`conv_forward`, `conv_weight_grad`) are stride-1 NHWC/HWIO float32 convolutions whose output channels
are a multiple of 16; fcnjax.ops.conv decides which convolutions meet that and are worth it. `depthwise_forward`,
`depthwise_input_grad` and `depthwise_weight_grad` are a float32 depthwise convolution (any channels, strides,
padding and dilation) and its gradients, which fcnjax.ops.depthwise uses.
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import stat
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax import custom_batching
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from fcnjax.ops import windows

SOURCE = pathlib.Path(__file__).with_name("native_conv.cc")
COMPILER_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
# Tiling (figures from benchmarks/conv_layers.py, batch 2):
# - FORWARD_PANEL_BYTES: the weights that one pass of the forward kernel reads, which stay in L1/L2. It sets the
#   input channels per pass; for 3x3 kernels, AVX-512 builds (64-channel blocks) take 32 and AVX2 builds
#   (16-channel blocks) 128, the fastest on a 2-core Xeon (AVX-512) and a 2-core EPYC (AVX2) respectively.
# - FORWARD_PIXELS_PER_TASK: output pixels per forward task; narrow maps group rows, so that each weight block is
#   read by more pixels.
# - WEIGHT_GRAD_BLOCK_BYTES: the bytes of x and dy that a weight-gradient block reads, which stay in L2 for every
#   tap; it sets the rows per block.
FORWARD_PANEL_BYTES = 72 * 1024
FORWARD_PIXELS_PER_TASK = 224
WEIGHT_GRAD_BLOCK_BYTES = 256 * 1024
# Winograd's F(2x2, 3x3) schedule (forward ms, batch 2, against the direct kernel's, on a 2-core EPYC, AVX2). Its
# kernel transform U is 16 x cin x cout floats.
# - Up to WINOGRAD_LOCAL_KERNEL_BYTES of U (256 -> 256 channels), each task transforms, multiplies and transforms
#   back a chunk of tiles whose transformed input and output fill about WINOGRAD_LOCAL_CHUNK_BYTES, which stay in
#   L2 (224x224x64: 22 vs 41 ms; chunks of 4 MiB shared by the threads take 25-48 ms, depending on the machine's
#   other load).
# - A bigger U is read from memory once per chunk, so there the chunks hold at least U's bytes of tiles
#   (WINOGRAD_CHUNK_BYTES at least) and the threads share each chunk's products (28x28, 512 -> 512: 23 vs 43 ms;
#   2048 -> 512: 85 vs 175 ms; chunks of L2's size: 40 and 191 ms).
# - A pass of the products reads about WINOGRAD_PANEL_BYTES of U (32-72 KiB: within 5%; 8 KiB: 1.3x slower).
# - Below WINOGRAD_MIN_IN_CHANNELS the transforms cost what the products save (16 -> 16 at 64x64: 2.0 vs 1.9 ms).
WINOGRAD_CHUNK_BYTES = 4 << 20
WINOGRAD_PANEL_BYTES = 72 * 1024
WINOGRAD_LOCAL_KERNEL_BYTES = 4 << 20
WINOGRAD_LOCAL_CHUNK_BYTES = 256 << 10
WINOGRAD_MIN_IN_CHANNELS = 32
CHANNEL_MULTIPLE = 16  # output channels come in 16-float vectors
# XLA custom-call target -> the library's FFI handler.
_FFI_HANDLERS = {"fcnjax_conv_forward": "ConvForward", "fcnjax_conv_weight_grad": "ConvWeightGrad",
                 "fcnjax_depthwise_forward": "DepthwiseForward", "fcnjax_depthwise_input_grad": "DepthwiseInputGrad",
                 "fcnjax_depthwise_weight_grad": "DepthwiseWeightGrad"}


def _compiler_flags() -> tuple[str, ...]:
  lanes = os.environ.get("FCNJAX_NATIVE_LANES")
  return COMPILER_FLAGS + ((f"-DFCNJAX_LANES={int(lanes)}",) if lanes else ())


def _compiler() -> str | None:
  return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def cpu_features() -> str:
  """The CPU's model and feature flags (what -march=native compiles for)."""
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    import platform
    return platform.processor() + platform.machine()
  return "\n".join(sorted({l for l in lines if l.startswith(("model name", "flags", "Features", "CPU part"))}))


def cache_dir() -> pathlib.Path:
  """Where fcnjax caches what it builds: $FCNJAX_CACHE_DIR, else ~/.cache/fcnjax."""
  return pathlib.Path(os.environ.get("FCNJAX_CACHE_DIR") or pathlib.Path.home() / ".cache" / "fcnjax")


def untrusted_reason(path: pathlib.Path) -> str | None:
  """Why a cache folder or library is not safe to load code from, or None when it is: it must be owned by this
  user and writable by no one else (a library another user could write or replace would run as every user who
  loads it). A folder that does not exist yet is created private, so it is safe."""
  try:
    info = os.lstat(path)
  except FileNotFoundError:
    return None
  if stat.S_ISLNK(info.st_mode):
    return f"{path} is a symbolic link"
  if info.st_uid != os.getuid():
    return f"{path} is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})"
  if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
    return f"{path} is writable by {'group and others' if info.st_mode & stat.S_IWOTH else 'its group'}"
  return None


def _private_dir(path: pathlib.Path) -> pathlib.Path:
  """`path`, created with mode 0700 where missing; a private temporary folder instead (with a warning) where `path`
  is not safe (untrusted_reason)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  try:
    path.mkdir(mode=0o700)
  except FileExistsError:
    pass
  reason = untrusted_reason(path)
  if reason is None:
    return path
  fallback = pathlib.Path(tempfile.mkdtemp(prefix="fcnjax-kernels-"))  # 0700, this process's alone
  warnings.warn(f"fcnjax: not loading C++ kernels from {path}: {reason}; building them into {fallback} instead "
                "(set FCNJAX_CACHE_DIR to a folder only you can write)")
  return fallback


def library_path(compiler: str) -> pathlib.Path:
  """Where the library for this source, compiler, jaxlib and CPU is (or will be) cached."""
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
  key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, *_compiler_flags(), jaxlib.__version__,
                                  cpu_features()]).encode()).hexdigest()[:16]
  return _private_dir(cache_dir()) / f"native_conv-{key}.so"


def build(compiler: str, target: pathlib.Path) -> None:
  """Compile native_conv.cc to `target`: into a temporary file next to it, then renamed, so that processes
  building at once (multi-host tests) never load a half-written library."""
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
  os.close(fd)
  try:
    subprocess.run([compiler, *_compiler_flags(), f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp], check=True,
                   capture_output=True, text=True)
    os.chmod(tmp, 0o755)  # whatever the umask: a library others can write would not be loaded (untrusted_reason)
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


# Whether convolutions traced in this context may use the kernels (kernels_enabled); FCNJAX_NATIVE=0 overrides.
_ENABLED = contextvars.ContextVar("fcnjax_native_kernels_enabled", default=True)


@contextlib.contextmanager
def kernels_enabled(enabled: bool):
  """Convolutions traced inside this block use the kernels only if `enabled` (a run's `config.native_kernels`).

  The choice is made when a function is traced: a jitted function already compiled keeps the forms it was traced
  with.
  """
  token = _ENABLED.set(bool(enabled))
  try:
    yield
  finally:
    _ENABLED.reset(token)


def available() -> bool:
  """Whether the kernels may be used here and are built, loaded and registered with XLA (building them on the
  first call)."""
  return _ENABLED.get() and os.environ.get("FCNJAX_NATIVE", "1") != "0" and _loaded()


def _loaded() -> bool:
  return _library() is not None


@functools.cache
def _library() -> ctypes.CDLL | None:
  """The built library, loaded and registered with XLA (built on the first call); None where it cannot be."""
  compiler = _compiler()
  if compiler is None:
    warnings.warn("fcnjax: no C++ compiler found ($CXX, c++, g++); convolutions on CPU use XLA's own forms, "
                  "which train slower (docs/performance.md)")
    return None
  try:
    path = library_path(compiler)
    reason = untrusted_reason(path)
    if reason is not None:
      path = pathlib.Path(tempfile.mkdtemp(prefix="fcnjax-kernels-")) / path.name  # 0700, this process's alone
      warnings.warn(f"fcnjax: not loading {reason}; building the C++ kernels into {path.parent} instead")
    if not path.exists():
      build(compiler, path)
    library = ctypes.cdll.LoadLibrary(str(path))
  except (OSError, subprocess.CalledProcessError) as error:
    detail = getattr(error, "stderr", "") or str(error)
    warnings.warn(f"fcnjax: could not build or load {SOURCE.name} with {compiler}; convolutions on CPU use XLA's "
                  f"own forms. {detail[-2000:]}")
    return None
  for name, symbol in _FFI_HANDLERS.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  return library


@functools.cache
def vector_lanes() -> int:
  """Floats per vector register the built kernels use: 16 (AVX-512) or 8 (AVX2 and others); 0 without them."""
  if os.environ.get("FCNJAX_NATIVE", "1") == "0" or not _loaded():
    return 0
  return int(_library().FcnjaxVectorLanes())


def supports(dtype, out_channels: int, strides) -> bool:
  """Whether a convolution with these operands can use the kernels (built or not)."""
  return (jnp.dtype(dtype) == jnp.float32 and out_channels % CHANNEL_MULTIPLE == 0
          and tuple(strides) == (1, 1))


def _require_loaded() -> None:
  if not _loaded():
    raise RuntimeError("fcnjax.ops.native: the C++ kernels are not available (their build failed: see the warning "
                       "above); fcnjax.ops.conv falls back to XLA's forms by itself")


def supports_winograd(kernel_shape, flip: bool = False) -> bool:
  """Whether conv_forward(..., flip, by_winograd=True) takes this kernel: 3x3, and input channels (of the
  convolution it computes) a multiple of 16 and at least WINOGRAD_MIN_IN_CHANNELS. FCNJAX_WINOGRAD=0 says no."""
  cin = kernel_shape[3 if flip else 2]
  return (os.environ.get("FCNJAX_WINOGRAD", "1") != "0" and tuple(kernel_shape[:2]) == (3, 3)
          and cin % CHANNEL_MULTIPLE == 0 and cin >= WINOGRAD_MIN_IN_CHANNELS)


def _forward_call(x, kernel, pads, dilation, flip, by_winograd):
  _require_loaded()
  cout = kernel.shape[2 if flip else 3]
  (top, _), (left, _) = pads
  out_h, out_w = windows.out_hw(x.shape[1:3], kernel.shape[:2], (1, 1), pads, dilation)
  if by_winograd and not supports_winograd(kernel.shape, flip):
    raise ValueError(f"fcnjax.ops.native: Winograd's F(2x2, 3x3) does not take a {kernel.shape} kernel (flip={flip})")
  call = jax.ffi.ffi_call("fcnjax_conv_forward", jax.ShapeDtypeStruct((x.shape[0], out_h, out_w, cout), x.dtype))
  return call(x, kernel, pad_top=np.int64(top), pad_left=np.int64(left), dil_h=np.int64(dilation[0]),
              dil_w=np.int64(dilation[1]), flip=np.int64(flip),
              panel_bytes=np.int64(WINOGRAD_PANEL_BYTES if by_winograd else FORWARD_PANEL_BYTES),
              pixels_per_task=np.int64(FORWARD_PIXELS_PER_TASK),
              winograd_chunk_bytes=np.int64(WINOGRAD_CHUNK_BYTES if by_winograd else 0),
              winograd_local_kernel_bytes=np.int64(WINOGRAD_LOCAL_KERNEL_BYTES),
              winograd_local_chunk_bytes=np.int64(WINOGRAD_LOCAL_CHUNK_BYTES))


def _weight_grad_call(x, dy, kernel_shape, pads, dilation):
  _require_loaded()
  (top, _), (left, _) = pads
  call = jax.ffi.ffi_call("fcnjax_conv_weight_grad", jax.ShapeDtypeStruct(tuple(kernel_shape), x.dtype))
  return call(x, dy, pad_top=np.int64(top), pad_left=np.int64(left), dil_h=np.int64(dilation[0]),
              dil_w=np.int64(dilation[1]), block_bytes=np.int64(WEIGHT_GRAD_BLOCK_BYTES))


def _depthwise_call(target: str, a, b, result_shape, strides, pads, dilation):
  """One of the depthwise kernels on operands a, b: the window's attributes are the same for all three."""
  _require_loaded()
  (top, _), (left, _) = pads
  call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(tuple(result_shape), a.dtype))
  return call(a, b, pad_top=np.int64(top), pad_left=np.int64(left), dil_h=np.int64(dilation[0]),
              dil_w=np.int64(dilation[1]), stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]))


def _depthwise_forward_call(x, kernel, strides, pads, dilation):
  out_hw = windows.out_hw(x.shape[1:3], kernel.shape[:2], strides, pads, dilation)
  return _depthwise_call("fcnjax_depthwise_forward", x, kernel, (x.shape[0], *out_hw, x.shape[3]), strides, pads,
                         dilation)


def _depthwise_input_grad_call(dy, kernel, x_shape, strides, pads, dilation):
  return _depthwise_call("fcnjax_depthwise_input_grad", dy, kernel, (dy.shape[0], *x_shape[1:]), strides, pads,
                         dilation)


def _depthwise_weight_grad_call(x, dy, kernel_shape, strides, pads, dilation):
  return _depthwise_call("fcnjax_depthwise_weight_grad", x, dy, kernel_shape, strides, pads, dilation)


# Data parallelism: XLA does not know how to split a custom call, and would gather the whole batch onto every
# device and compute it there. These rules keep each device on its own images: the batch axis stays sharded as it
# comes, every other axis replicated; the weight gradient's per-device sums are then all-reduced (psum).
def _batch_axes(sharding):
  spec = getattr(sharding, "spec", ())
  return spec[0] if len(spec) else None


@functools.partial(custom_partitioning, static_argnums=(2, 3, 4, 5))
def _partitioned_forward(x, kernel, pads, dilation, flip, by_winograd):
  return _forward_call(x, kernel, pads, dilation, flip, by_winograd)


def _forward_partition(pads, dilation, flip, by_winograd, mesh, arg_shapes, result_shape):
  del result_shape
  by_batch = NamedSharding(mesh, PartitionSpec(_batch_axes(arg_shapes[0].sharding)))
  return (mesh, lambda x, kernel: _forward_call(x, kernel, pads, dilation, flip, by_winograd), by_batch,
          (by_batch, NamedSharding(mesh, PartitionSpec())))


_partitioned_forward.def_partition(_forward_partition, sharding_rule="n h w c, i j c o -> n p q o",
                           need_replication_factors=("h", "w", "c", "i", "j", "o", "p", "q"))


def _all_but_batch(sharding_rule: str) -> tuple[str, ...]:
  """Every factor of a sharding rule but the batch's ("n"), in the order the rule names them (Shardy's order)."""
  return tuple(f for f in dict.fromkeys(sharding_rule.replace(",", " ").replace("->", " ").split()) if f != "n")


def _partitioned_by_batch_sum(call, sharding_rule: str):
  """call(x, dy, params) for a weight gradient (a sum over the batch): each device sums its own images, then the
  sums are all-reduced. `params` (static) are the call's remaining arguments."""

  @functools.partial(custom_partitioning, static_argnums=(2,))
  def partitioned(x, dy, params):
    return call(x, dy, *params)

  def partition(params, mesh, arg_shapes, result_shape):
    del result_shape
    batch = _batch_axes(arg_shapes[0].sharding)
    by_batch = NamedSharding(mesh, PartitionSpec(batch))

    def per_device(x, dy):
      grad = call(x, dy, *params)
      return grad if batch is None else jax.lax.psum(grad, batch)

    return mesh, per_device, NamedSharding(mesh, PartitionSpec()), (by_batch, by_batch)

  partitioned.def_partition(partition, sharding_rule=sharding_rule, reduction_factors=("n",),
                            need_replication_factors=_all_but_batch(sharding_rule))
  return partitioned


def _partitioned_by_batch(call, sharding_rule: str):
  """call(images, kernel, params) per image (a depthwise forward pass or input gradient): each device computes its
  own images with the whole kernel. `params` (static) are the call's remaining arguments."""

  @functools.partial(custom_partitioning, static_argnums=(2,))
  def partitioned(images, kernel, params):
    return call(images, kernel, *params)

  def partition(params, mesh, arg_shapes, result_shape):
    del result_shape
    by_batch = NamedSharding(mesh, PartitionSpec(_batch_axes(arg_shapes[0].sharding)))
    return (mesh, lambda images, kernel: call(images, kernel, *params), by_batch,
            (by_batch, NamedSharding(mesh, PartitionSpec())))

  partitioned.def_partition(partition, sharding_rule=sharding_rule,
                            need_replication_factors=_all_but_batch(sharding_rule))
  return partitioned


_partitioned_depthwise_forward = _partitioned_by_batch(_depthwise_forward_call, "n h w c, i j k c -> n p q c")
_partitioned_depthwise_input_grad = _partitioned_by_batch(_depthwise_input_grad_call, "n p q c, i j k c -> n h w c")

_partitioned_weight_grad = _partitioned_by_batch_sum(_weight_grad_call, "n h w c, n p q o -> i j c o")
_partitioned_depthwise_weight_grad = _partitioned_by_batch_sum(_depthwise_weight_grad_call,
                                                               "n h w c, n p q c -> i j k c")


# jax.vmap: neither a custom call nor custom_partitioning has a batching rule. A vmapped axis of the images alone is
# folded into their batch axis (one call); anything else (per-example kernels, or the weight gradient, which is
# per example under vmap) is one call per example (lax.map).
def _with_vmap_rule(call, fold_images: bool):
  """call(a, b) with a jax.vmap rule: with fold_images, a vmapped axis of `a` alone is folded into its batch axis;
  anything else is one call per example."""
  vmappable = custom_batching.custom_vmap(call)

  @vmappable.def_vmap
  def _rule(axis_size, in_batched, a, b):
    if fold_images and in_batched == [True, False]:
      y = vmappable(a.reshape(-1, *a.shape[2:]), b)
      return y.reshape(axis_size, -1, *y.shape[1:]), True
    a, b = (v if batched else jnp.broadcast_to(v, (axis_size, *v.shape)) for v, batched in zip((a, b), in_batched))
    return jax.lax.map(lambda ab: vmappable(*ab), (a, b)), True

  return vmappable


@functools.cache
def _vmappable_forward(pads, dilation, flip, by_winograd):
  return _with_vmap_rule(lambda x, kernel: _partitioned_forward(x, kernel, pads, dilation, flip, by_winograd),
                         fold_images=True)


@functools.cache
def _vmappable_weight_grad(kernel_shape, pads, dilation):
  # Under vmap the weight gradient is per example: folding the examples into one batch would sum them.
  return _with_vmap_rule(lambda x, dy: _partitioned_weight_grad(x, dy, (kernel_shape, pads, dilation)),
                         fold_images=False)


@functools.cache
def _vmappable_depthwise_forward(strides, pads, dilation):
  return _with_vmap_rule(lambda x, kernel: _partitioned_depthwise_forward(x, kernel, (strides, pads, dilation)),
                         fold_images=True)


@functools.cache
def _vmappable_depthwise_input_grad(x_shape, strides, pads, dilation):
  return _with_vmap_rule(
      lambda dy, kernel: _partitioned_depthwise_input_grad(dy, kernel, (x_shape, strides, pads, dilation)),
      fold_images=True)


@functools.cache
def _vmappable_depthwise_weight_grad(kernel_shape, strides, pads, dilation):
  return _with_vmap_rule(
      lambda x, dy: _partitioned_depthwise_weight_grad(x, dy, (kernel_shape, strides, pads, dilation)),
      fold_images=False)


def conv_forward(x: jax.Array, kernel: jax.Array, pads, dilation, flip: bool = False,
                 by_winograd: bool = False) -> jax.Array:
  """The stride-1 convolution of x (n, h, w, cin) with kernel (kh, kw, cin, cout); pads ((top, bottom),
  (left, right)) may be negative (as lax's). flip: convolve with the kernel (kh, kw, cout, cin) turned by 180
  degrees and its channel axes swapped instead (the input gradient of a convolution, for x = its dy).
  by_winograd: by Winograd's F(2x2, 3x3) instead of the direct kernel (only where `supports_winograd` says so)."""
  return _vmappable_forward(tuple(map(tuple, pads)), tuple(dilation), bool(flip), bool(by_winograd))(x, kernel)


def conv_weight_grad(x: jax.Array, dy: jax.Array, kernel_shape, pads, dilation) -> jax.Array:
  """d(loss)/d(kernel) of conv_forward(x, kernel, pads, dilation), given dy = d(loss)/d(output)."""
  return _vmappable_weight_grad(tuple(kernel_shape), tuple(map(tuple, pads)), tuple(dilation))(x, dy)


def depthwise_weight_grad(x: jax.Array, dy: jax.Array, kernel_shape, strides, pads, dilation) -> jax.Array:
  """d(loss)/d(kernel) of the depthwise convolution of x (n, h, w, c) with a kernel of kernel_shape (kh, kw, 1, c)
  at `strides`, pads ((top, bottom), (left, right)) and `dilation`, given dy = d(loss)/d(output); float32."""
  return _vmappable_depthwise_weight_grad(tuple(kernel_shape), tuple(strides), tuple(map(tuple, pads)),
                                          tuple(dilation))(x, dy)


def depthwise_forward(x: jax.Array, kernel: jax.Array, strides, pads, dilation) -> jax.Array:
  """The depthwise convolution of x (n, h, w, c) with kernel (kh, kw, 1, c) at `strides`, pads ((top, bottom),
  (left, right); >= 0) and `dilation`; float32."""
  return _vmappable_depthwise_forward(tuple(strides), tuple(map(tuple, pads)), tuple(dilation))(x, kernel)


def depthwise_input_grad(dy: jax.Array, kernel: jax.Array, x_shape, strides, pads, dilation) -> jax.Array:
  """d(loss)/d(x) of depthwise_forward(x, kernel, strides, pads, dilation) for an x of x_shape, given dy; float32."""
  return _vmappable_depthwise_input_grad(tuple(x_shape), tuple(strides), tuple(map(tuple, pads)),
                                         tuple(dilation))(dy, kernel)
