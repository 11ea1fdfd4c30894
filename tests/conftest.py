"""Shared test settings. The suite runs on one CPU device; multi-device checks start subprocesses with
XLA_FLAGS=--xla_force_host_platform_device_count=N so this process keeps its single device. XLA compiles at LLVM's
level 1 in tests (reliability_helpers.TEST_XLA_FLAGS)."""
import os
import pathlib
import subprocess
import sys

import pytest

import reliability_helpers

# Before JAX starts its CPU backend, which reads XLA_FLAGS once.
if reliability_helpers.TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {reliability_helpers.TEST_XLA_FLAGS}".strip()

REPO_ROOT = reliability_helpers.REPO_ROOT
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
CONVERTER = REPO_ROOT / "conversions" / "convert_torchvision.py"
subprocess_env = reliability_helpers.env


def pytest_collection_modifyitems(config, items):
  """Slow tests first (stable within each group): with -n 2 the long ones then start early, and the many short ones
  fill in at the end, instead of one worker finishing a long test alone."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def session_compile_cache(tmp_path_factory):
  """One persistent XLA compilation cache for this pytest session, in-process and for every subprocess.

  Many tests train the same tiny configs again (resume, interruption, several processes); compiling their steps
  once instead of in every run is most of the suite's time on a 2-core CI machine. The cache is per session
  (pytest's basetemp; with pytest-xdist the folder above the workers' own, so that they share it), so no test ever
  reads what another session compiled. Processes that share it read and write it at once, as the simulated hosts
  of a multi-process run do: JAX compiles again when an entry cannot be read.
  """
  import jax  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.getbasetemp()
  cache = str((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "xla-cache")
  os.environ.update({"JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                     "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield cache


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """../shared/data beside the repository (real ISBI 2012 EM slices and a liver CT pair, see its README); tests
  needing it skip when it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"{SHARED_DATA} not present")
  return SHARED_DATA


def load_converter():
  """conversions/convert_torchvision.py as a module (a script outside the package), for its main(argv)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("convert_torchvision", CONVERTER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_experiment(name: str):
  """get_config() of experiments/<name>.py."""
  from fcnjax.config import load_config_file  # pylint: disable=g-import-not-at-top
  return load_config_file(REPO_ROOT / "experiments" / f"{name}.py")


def run_python(*args, num_devices: int = 1, timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess:
  """`python ARGS...` from the repository root, on `num_devices` CPU devices, output captured."""
  return subprocess.run([sys.executable, *map(str, args)], env=subprocess_env(num_devices, **extra_env),
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def record_parity(what: str, max_abs_diff: float, scale: float) -> None:
  """Prints a parity figure and, when FCNJAX_PARITY_LOG names a file, appends it there as a JSON line
  (`FCNJAX_PARITY_LOG=parity.jsonl python -m pytest tests/` collects every figure the README reports)."""
  import json  # pylint: disable=g-import-not-at-top
  print(f"{what}: max|diff| = {max_abs_diff:.3g}, max|ref| = {scale:.3g}")
  path = os.environ.get("FCNJAX_PARITY_LOG")
  if path:
    with open(path, "a") as f:
      f.write(json.dumps({"what": what, "max_abs_diff": float(max_abs_diff), "scale": float(scale)}) + "\n")


@pytest.fixture
def native_kernels():
  """The native kernels, built: the test fails when a compiler is there and the build fails, and skips (saying so)
  only on a machine without any C++ compiler, where fcnjax runs XLA's forms."""
  from fcnjax.ops import native  # pylint: disable=g-import-not-at-top
  if native._compiler() is None:  # pylint: disable=protected-access
    pytest.skip("no C++ compiler ($CXX, c++, g++): fcnjax uses XLA's convolutions here")
  assert native.available(), "the native kernels did not build (see the warning)"
