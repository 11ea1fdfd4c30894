"""JAX's persistent compilation cache for the command-line entry points: the second run of a command loads the
compiled steps of the first instead of compiling them again (compilation is most of the time to the first step).

The cache holds executables, which the process runs: like the C++ kernels' cache it must be a folder only this user
can write (fcnjax.ops.native.untrusted_reason); an unsafe folder is not used (a warning says why).
"""
from __future__ import annotations

import os
import pathlib
import warnings

import jax

from fcnjax.ops import native

# Compilations shorter than this are not written (JAX's default): small jitted helpers would fill the folder.
MIN_COMPILE_SECONDS = 1.0


def default_dir() -> pathlib.Path:
  """`xla/` beside the C++ kernels' cache: $FCNJAX_CACHE_DIR or ~/.cache/fcnjax."""
  return native.cache_dir() / "xla"


def enable(directory: str | os.PathLike | None = None) -> pathlib.Path | None:
  """Turns the persistent cache on in `directory` (None: JAX's own setting, e.g. $JAX_COMPILATION_CACHE_DIR, else
  default_dir(); "": off, whatever JAX's own setting); returns the folder used, or None when the cache stays off.
  Call it before the first compilation: JAX reads the setting once."""
  if directory is not None and not str(directory):
    jax.config.update("jax_compilation_cache_dir", None)
    return None
  if directory is None and jax.config.jax_compilation_cache_dir:
    return pathlib.Path(jax.config.jax_compilation_cache_dir)
  path = private_folder(pathlib.Path(directory) if directory is not None else default_dir(), "compilation cache",
                        " (point --compilation_cache at a folder only you can write, or give it as '' to turn the "
                        "cache off)")
  if path is None:
    return None
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  return path


def private_folder(path: pathlib.Path, what: str, hint: str = "") -> pathlib.Path | None:
  """`path`, made (mode 0700) where missing, when it is safe to load executables from: None, with a warning naming
  `what` and the folder, when it cannot be made or another user could write it (fcnjax.ops.native.untrusted_reason;
  `hint` ends that warning)."""
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)
  except OSError as e:
    warnings.warn(f"fcnjax: no {what} in {path}: {e}")
    return None
  reason = native.untrusted_reason(path)
  if reason is not None:
    warnings.warn(f"fcnjax: not using the {what} {path}: {reason}{hint}")
    return None
  return path
