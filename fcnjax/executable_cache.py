"""Compiled functions kept whole on disk under a key of what they are made from: a repeated command runs its steps
without tracing, lowering or compiling them.

JAX's persistent compilation cache (fcnjax.compilation_cache) keys an executable on the lowered program, so every
run still traces the Python function and lowers it: that is most of a warm first step above the step itself
(lraspp_mobilenet_v3_large: 1.9 of 3.1 s; docs/performance.md, "The first step"). `CachedJit` keys on what the
program is made from instead, and finds the executable before tracing anything:
- fcnjax's source (every .py and .cc file of the package) and the versions of jax, jaxlib, flax, optax and numpy;
- JAX's settings, the environment variables that choose kernels or XLA's options (XLA_FLAGS, FCNJAX_*), whether the
  C++ kernels are built and enabled, the portable forms, the CPU's features;
- the devices, and each argument's path in its pytree, shape, dtype, weak type and sharding;
- `description`: everything else the function closes over, which the caller states (the run's config).
Code outside fcnjax is not in the key: the cache is for fcnjax's own models and steps (the entry points use it),
not for a function whose code can change while fcnjax's does not.

A file holds a pickled executable (jax.experimental.serialize_executable, zlib-compressed), which loading runs as
machine code: the folder must be one that only this user can write (fcnjax.ops.native.untrusted_reason), or nothing
is read or written there. A file that cannot be read is compiled again and rewritten. A multi-process run compiles
as plain jit does (with JAX's persistent cache): each process would need its own file for its devices.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import pathlib
import pickle
import re
import time
import warnings
import zlib
from typing import Any, Callable

import jax
from absl import logging
from jax.experimental import serialize_executable

from fcnjax import compilation_cache
from fcnjax.ops import native, portable

# The name of the functions compiled to be written here (the HLO module is jit_<name>); see _kept_out_of_jax_cache.
KEPT_OUT_OF_JAX_CACHE = "fcnjax_executable_cache_step"
# Files beyond this many, the least recently used first, are deleted when one is written (the zoo's train and
# inference steps at batch 2, 224x224: 0.04-1.9 MB each).
MAX_FILES = 64
FILE_SUFFIX = ".executable"
FORMAT = 1
# zlib's fastest level: XLA:CPU's executables shrink about 5x (lraspp_mobilenet_v3_large's train step 4.8 -> 1.0 MB).
COMPRESSION_LEVEL = 1
_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "numpy")
_PACKAGE_DIR = pathlib.Path(__file__).parent


def directory_for(compilation_cache_dir: str | os.PathLike | None) -> pathlib.Path | None:
  """The executables' folder inside JAX's persistent cache folder (None: no cache, none here either)."""
  return pathlib.Path(compilation_cache_dir) / "executables" if compilation_cache_dir else None


def describe_module(module) -> str:
  """A Flax module's class and fields (its repr without the addresses of functions it holds): with fcnjax's source,
  what defines a model that fcnjax.models builds."""
  return f"{type(module).__module__}.{type(module).__qualname__} " + re.sub(r" at 0x[0-9a-f]+", "", repr(module))


@functools.cache
def source_digest() -> str:
  """sha256 of fcnjax's source files (path and contents), read once per process."""
  digest = hashlib.sha256()
  for path in sorted(_PACKAGE_DIR.rglob("*")):
    if path.suffix in (".py", ".cc") and path.is_file():
      digest.update(str(path.relative_to(_PACKAGE_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
  return digest.hexdigest()


def _versions() -> dict[str, str]:
  found = {}
  for name in _LIBRARIES:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = "none"
  return found


def _environment() -> dict[str, Any]:
  """What decides how fcnjax traces and XLA compiles, besides the function and its arguments."""
  settings = {name: repr(value) for name, value in sorted(jax.config.values.items())
              if "cache" not in name and "log" not in name}
  variables = {name: value for name, value in sorted(os.environ.items())
               if name.startswith(("FCNJAX_", "XLA_", "JAX_")) and "CACHE" not in name}
  native_kernels = native.available()  # also loads the kernels, which a loaded executable calls
  return {"source": source_digest(), "versions": _versions(), "jax_config": settings, "environment": variables,
          "native_kernels": native_kernels, "vector_lanes": native.vector_lanes() if native_kernels else 0,
          "portable": portable.enabled(), "cpu": native.cpu_features(),
          "devices": [(d.platform, d.device_kind, d.id, d.process_index) for d in jax.devices()]}


def _leaf_signature(leaf) -> tuple:
  """(abstract value, sharding) as jit sees an argument: a Python scalar as a weakly typed array, a numpy array or an
  uncommitted jax array without a sharding of its own (it goes to the default device). Every call computes it for
  every leaf: 0.2 ms for 600 leaves, where jax.typeof and str(dtype) per leaf took 3 ms."""
  if isinstance(leaf, jax.Array):
    return leaf.aval, leaf.sharding if leaf.committed else None
  return jax.typeof(leaf), getattr(leaf, "sharding", None)  # a ShapeDtypeStruct keeps its sharding


def cache_key(description: str, args: tuple, donated: tuple[int, ...], out_shardings) -> str:
  """The file name's hash: the environment, `description`, and each argument leaf's path, shape, dtype, weak type
  and sharding."""
  arguments = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(args)[0]:
    aval, sharding = _leaf_signature(leaf)
    arguments.append((jax.tree_util.keystr(path), aval.str_short(), aval.weak_type, repr(sharding)))
  parts = {"format": FORMAT, "environment": _environment(), "description": description, "arguments": arguments,
           "donated": list(donated), "out_shardings": repr(out_shardings)}
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=repr).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class _OutputLayout:
  """How the flat outputs go back into the function's pytree. An output that is a tuple is kept part by part: a part
  with the structure of argument i is ("argument", i, leaf count), as a train step's new state is, so its structure
  (whose static fields, such as an optimizer's functions, cannot be pickled) is taken from that argument when the
  file is loaded; any other part is ("tree", its structure with leaf numbers as leaves, leaf count)."""
  is_tuple: bool
  parts: tuple

  @classmethod
  def of(cls, outputs, args: tuple) -> "_OutputLayout":
    argument_structures = [jax.tree.structure(arg) for arg in args]

    def describe(part):
      structure = jax.tree.structure(part)
      if structure in argument_structures:
        return ("argument", argument_structures.index(structure), structure.num_leaves)
      return ("tree", jax.tree.unflatten(structure, range(structure.num_leaves)), structure.num_leaves)

    # A plain tuple only: a namedtuple's parts are kept with its own structure.
    if type(outputs) is tuple:  # pylint: disable=unidiomatic-typecheck
      return cls(True, tuple(describe(part) for part in outputs))
    return cls(False, (describe(outputs),))

  def unflatten(self, leaves, args: tuple):
    parts, start = [], 0
    for kind, what, count in self.parts:
      structure = jax.tree.structure(args[what]) if kind == "argument" else jax.tree.structure(what)
      parts.append(jax.tree.unflatten(structure, leaves[start:start + count]))
      start += count
    return tuple(parts) if self.is_tuple else parts[0]


@dataclasses.dataclass
class Executable:
  """One compiled signature of a CachedJit."""
  compiled: Any               # jax.stages.Compiled of the function on flat leaves, returning a list of leaves
  layout: _OutputLayout
  loaded: bool                # read from a file rather than compiled in this process
  # Seconds per stage: "key" and "load" when loaded; "key" (with a folder), "trace", "lower", "compile" otherwise.
  stage_seconds: dict[str, float]


class CachedJit:
  """`jax.jit(fn, out_shardings=..., donate_argnums=...)` compiled with `compiler_options`, whose executables are
  kept in `directory` (None: compiled in each process, nothing kept) under cache_key. Arguments take the shardings
  they carry (jax arrays placed on devices, ShapeDtypeStructs with a sharding, for `compile`)."""

  def __init__(self, fn: Callable, description: str, directory: str | os.PathLike | None, *,
               out_shardings: Any = None, donate_argnums: tuple[int, ...] | int = (),
               compiler_options: dict[str, Any] | None = None):
    self.fn = fn
    self.description = description
    self.compiler_options = dict(compiler_options or {})
    self.directory = _usable(directory) if jax.process_count() == 1 else None
    self.out_shardings = out_shardings
    self.donate_argnums = (donate_argnums,) if isinstance(donate_argnums, int) else tuple(donate_argnums)
    self._executables: dict[tuple, Executable] = {}

  def __call__(self, *args):
    leaves, structure = jax.tree.flatten(args)
    executable = self._executable_for(args, leaves, structure)
    return executable.layout.unflatten(executable.compiled(*leaves), args)

  def compiled_signatures(self) -> int:
    """How many argument signatures (structure, shapes, dtypes, shardings) this process has compiled or loaded."""
    return len(self._executables)

  def compile(self, *args) -> Executable:
    """Compiles (or loads) for arguments of these shapes and shardings ahead of the first call."""
    leaves, structure = jax.tree.flatten(args)
    return self._executable_for(args, leaves, structure)

  def _executable_for(self, args, leaves, structure) -> Executable:
    signature = (structure, tuple(_leaf_signature(leaf) for leaf in leaves))
    executable = self._executables.get(signature)
    if executable is None:
      executable = self._load_or_compile(args, leaves, structure)
      self._executables[signature] = executable
    return executable

  def _flat_leaf_indices(self, args) -> tuple[int, ...]:
    counts = [len(jax.tree.leaves(arg)) for arg in args]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return tuple(starts[i] + k for i in self.donate_argnums for k in range(counts[i]))

  def _load_or_compile(self, args, leaves, structure) -> Executable:
    donated = self._flat_leaf_indices(args)
    path, seconds, start = None, {}, time.perf_counter()
    if self.directory is not None:
      key = cache_key(f"{self.description} compiler_options={sorted(self.compiler_options.items())}", args, donated,
                      self.out_shardings)
      path = self.directory / f"{key}{FILE_SUFFIX}"
      seconds["key"] = time.perf_counter() - start
      loaded = _load(path, key, len(leaves))
      if loaded is not None:
        seconds["load"] = time.perf_counter() - start - seconds["key"]
        return Executable(loaded[0], loaded[1], loaded=True, stage_seconds=seconds)
    layouts = []

    def flat_fn(*flat_leaves):
      tree_args = jax.tree.unflatten(structure, flat_leaves)
      outputs = self.fn(*tree_args)
      layouts.append(_OutputLayout.of(outputs, tree_args))
      return jax.tree.leaves(outputs)

    if path is not None:  # the HLO module's name: one that JAX's cache never holds (_kept_out_of_jax_cache)
      flat_fn.__name__ = flat_fn.__qualname__ = KEPT_OUT_OF_JAX_CACHE
    jitted = jax.jit(flat_fn, out_shardings=self.out_shardings, donate_argnums=donated)
    start = time.perf_counter()
    traced = jitted.trace(*leaves)
    seconds["trace"] = time.perf_counter() - start
    lowered = traced.lower()
    seconds["lower"] = time.perf_counter() - start - seconds["trace"]
    if path is None:
      compiled = lowered.compile(self.compiler_options)
    else:
      with _kept_out_of_jax_cache():
        compiled = lowered.compile(self.compiler_options)
    seconds["compile"] = time.perf_counter() - start - seconds["trace"] - seconds["lower"]
    executable = Executable(compiled, layouts[-1], loaded=False, stage_seconds=seconds)
    if path is not None:
      _save(path, key, executable)
    return executable


@contextlib.contextmanager
def _kept_out_of_jax_cache():
  """Compiles in this block are not written to JAX's persistent cache. An executable that JAX loads from its cache
  cannot be serialized again on XLA:CPU (the copy lacks fused kernels: "NOT_FOUND: Function copy_bitcast_fusion.7
  not found" at its first run), so what this module writes must be compiled afresh. Its functions are compiled here
  under the name KEPT_OUT_OF_JAX_CACHE, so that no entry of JAX's cache is ever found for them: the same program
  compiled without a folder (another name) or under another key (a config that changes nothing in it) would have
  one. The file here makes the cache's entry redundant anyway."""
  saved = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", math.inf)
  try:
    yield
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", saved)


def _usable(directory) -> pathlib.Path | None:
  if directory is None or not str(directory):
    return None
  return compilation_cache.private_folder(pathlib.Path(directory), "executable cache")


def _load(path: pathlib.Path, key: str, leaf_count: int) -> tuple[Any, _OutputLayout] | None:
  """The compiled function in `path` and its output layout, or None (no file; a file that cannot be loaded is
  reported and left to be rewritten)."""
  try:
    stored = pickle.loads(zlib.decompress(path.read_bytes()))
    if stored.get("format") != FORMAT or stored.get("key") != key:
      raise ValueError("written for another key or format")
    devices = {d.id: d for d in jax.devices()}
    in_tree = jax.tree.structure((tuple(range(leaf_count)), {}))
    out_tree = jax.tree.structure([0] * sum(count for _, _, count in stored["layout"].parts))
    compiled = serialize_executable.deserialize_and_load(
        stored["executable"], in_tree, out_tree,
        execution_devices=[devices[i] for i in stored["device_ids"]])
  except FileNotFoundError:
    return None
  except Exception as e:  # pylint: disable=broad-except
    warnings.warn(f"fcnjax: {path}: cannot load this cached executable ({type(e).__name__}: {e}); compiling again")
    return None
  os.utime(path)  # its time is its place in the least-recently-used order
  logging.info("loaded the compiled function from %s", path)
  return compiled, stored["layout"]


def _save(path: pathlib.Path, key: str, executable: Executable) -> None:
  """Writes the file whole (a temporary file renamed) and deletes the least recently used beyond MAX_FILES; an
  executable that cannot be serialized, or a write that fails, leaves the cache as it was."""
  try:
    payload, _, _ = serialize_executable.serialize(executable.compiled)
    device_ids = [d.id for d in executable.compiled.runtime_executable().local_devices()]
    data = zlib.compress(pickle.dumps({"format": FORMAT, "key": key, "executable": payload,
                                       "layout": executable.layout, "device_ids": device_ids}), COMPRESSION_LEVEL)
  except Exception as e:  # pylint: disable=broad-except
    logging.info("not caching the compiled function: %s", e)
    return
  temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    temporary.write_bytes(data)
    os.replace(temporary, path)
  except OSError as e:
    temporary.unlink(missing_ok=True)
    warnings.warn(f"fcnjax: could not write the executable cache file {path}: {e}")
    return
  try:
    files = sorted(path.parent.glob(f"*{FILE_SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in files[MAX_FILES:]:
      stale.unlink(missing_ok=True)
  except OSError:  # another process removed one meanwhile: the next write trims again
    pass
