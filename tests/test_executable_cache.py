"""fcnjax.executable_cache: a compiled step is written once, loaded by a later CachedJit (another run) without
tracing, with the same values and donation; what changes the key; bad files and folders; the entry points."""
import functools
import os
import stat
import time
from typing import Callable

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import run_python
from fcnjax import executable_cache, losses, models, optim, steps
from fcnjax.ops import native

TINY_UNET = {"name": "unet", "num_classes": 3, "base_width": 4, "depth": 2}


@pytest.fixture(scope="module")
def train_setup():
  """A tiny U-Net's train step and its arguments: a TrainState (whose optimiser's functions cannot be pickled) and
  a batch."""
  model = models.build_model(TINY_UNET)
  variables = jax.tree.map(np.asarray, steps.init_variables(model, jax.random.PRNGKey(0), (32, 32, 3)))
  config = optim.default_config()
  config.optimizer, config.schedule, config.learning_rate = "adam", "constant", 1e-3
  tx = optim.make_optimizer(config, 10, variables["params"])
  rng = np.random.default_rng(0)
  batch = {"image": rng.standard_normal((2, 32, 32, 3)).astype(np.float32),
           "mask": rng.integers(0, 3, (2, 32, 32)).astype(np.int32)}
  step = functools.partial(steps.train_step, loss_config=losses.default_config(), learning_rate_fn=lambda _: 1e-3)

  def new_state():  # fresh device arrays each time: the steps donate them
    return jax.device_put(steps.create_train_state(model, tx, variables, np.asarray(jax.random.PRNGKey(1))))

  return step, new_state, batch


def _files(directory):
  return sorted(directory.glob(f"*{executable_cache.FILE_SUFFIX}"))


def test_a_later_instance_loads_the_step_without_tracing_it(train_setup, tmp_path):
  step, new_state, batch = train_setup
  traces = []

  def counted_step(state, batch):
    traces.append(1)
    return step(state, batch)

  first = executable_cache.CachedJit(counted_step, "tiny unet", tmp_path, donate_argnums=0)
  assert first.compile(new_state(), batch).loaded is False
  assert len(_files(tmp_path)) == 1 and len(traces) == 1
  state, metrics = first(new_state(), batch)
  state, metrics = first(state, batch)

  again = executable_cache.CachedJit(counted_step, "tiny unet", tmp_path, donate_argnums=0)
  old = new_state()
  assert set(again.compile(old, batch).stage_seconds) == {"key", "load"}
  loaded_state, loaded_metrics = again(old, batch)
  loaded_state, loaded_metrics = again(loaded_state, batch)
  assert len(traces) == 1, "the step was traced again instead of loaded"
  assert again.compiled_signatures() == 1 and len(_files(tmp_path)) == 1
  assert type(loaded_state) is type(state) and loaded_state.tx is state.tx
  assert sorted(loaded_metrics) == sorted(metrics)
  for ours, theirs in zip(jax.tree.leaves((loaded_state, loaded_metrics)), jax.tree.leaves((state, metrics))):
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(old.params)), "the loaded step did not donate the state"


@pytest.mark.parametrize("first_folder", ["first", None])
def test_a_step_that_jax_could_load_from_its_own_cache_is_compiled_afresh(train_setup, tmp_path, first_folder):
  """XLA:CPU cannot serialize again an executable that JAX loaded from its persistent cache (which conftest.py turns
  on for the test run): after the same program was compiled under another key or without a folder, a folder's file
  must still hold a whole executable, one that runs."""
  step, new_state, batch = train_setup
  description = f"after {first_folder}"
  first = executable_cache.CachedJit(step, description, first_folder and tmp_path / first_folder, donate_argnums=0)
  expected_state, _ = first(new_state(), batch)
  executable_cache.CachedJit(step, description, tmp_path / "second", donate_argnums=0).compile(new_state(), batch)
  loaded = executable_cache.CachedJit(step, description, tmp_path / "second", donate_argnums=0)
  assert loaded.compile(new_state(), batch).loaded
  state, _ = loaded(new_state(), batch)
  for ours, theirs in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected_state.params)):
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_without_a_folder_nothing_is_written_and_values_match_jit(train_setup, tmp_path):
  step, new_state, batch = train_setup
  cached = executable_cache.CachedJit(step, "tiny unet", None, donate_argnums=0)
  state, metrics = cached(new_state(), batch)
  expected_state, expected_metrics = jax.jit(step)(new_state(), batch)
  np.testing.assert_array_equal(np.asarray(metrics["loss"]), np.asarray(expected_metrics["loss"]))
  for ours, theirs in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected_state.params)):
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
  assert not list(tmp_path.iterdir())


def _key(description="f", shape=(2, 3), dtype=np.float32):
  return executable_cache.cache_key(description, ({"x": jax.ShapeDtypeStruct(shape, dtype)},), (), None)


def test_the_key_changes_with_what_defines_the_program(monkeypatch):
  base = _key()
  assert _key() == base
  assert _key(description="g") != base
  assert _key(shape=(2, 4)) != base
  assert _key(dtype=np.int32) != base
  renamed = executable_cache.cache_key("f", ({"y": jax.ShapeDtypeStruct((2, 3), np.float32)},), (), None)
  assert renamed != base
  assert executable_cache.cache_key("f", ({"x": jax.ShapeDtypeStruct((2, 3), np.float32)},), (0,), None) != base
  with native.kernels_enabled(False):
    assert _key() != base
  monkeypatch.setenv("FCNJAX_WINOGRAD", "0")
  assert _key() != base
  monkeypatch.delenv("FCNJAX_WINOGRAD")
  monkeypatch.setattr(executable_cache, "source_digest", lambda: "another source")
  assert _key() != base


def test_a_model_description_has_no_addresses():
  model = models.build_model(TINY_UNET)
  described = executable_cache.describe_module(model)
  assert described.startswith("fcnjax.models.unet.UNet") and "base_width = 4" in described

  def clipped(x, limit):
    return np.minimum(x, limit)

  class WithActivation(nn.Module):
    activation: Callable = functools.partial(clipped, limit=6)

  held = repr(WithActivation())
  assert " at 0x" in held
  assert " at 0x" not in executable_cache.describe_module(WithActivation())


def test_an_unreadable_file_is_compiled_again_and_rewritten(tmp_path):
  fn = executable_cache.CachedJit(lambda x: {"double": 2 * x}, "double", tmp_path)
  x = np.arange(6, dtype=np.float32)
  fn(x)
  (path,) = _files(tmp_path)
  path.write_bytes(b"not a pickle")
  again = executable_cache.CachedJit(lambda x: {"double": 2 * x}, "double", tmp_path)
  with pytest.warns(UserWarning, match=f"{path}: cannot load"):
    np.testing.assert_array_equal(np.asarray(again(x)["double"]), 2 * x)
  third = executable_cache.CachedJit(lambda x: {"double": 2 * x}, "double", tmp_path)
  assert third.compile(x).loaded is True


def test_an_untrusted_folder_is_not_used(tmp_path):
  shared = tmp_path / "shared"
  shared.mkdir()
  os.chmod(shared, 0o777 | stat.S_ISVTX)
  with pytest.warns(UserWarning, match="not using the executable cache"):
    fn = executable_cache.CachedJit(lambda x: x + 1, "plus one", shared)
  assert fn.directory is None
  np.testing.assert_array_equal(np.asarray(fn(np.zeros(3, np.float32))), np.ones(3))
  assert not list(shared.iterdir())


def test_the_least_recently_used_files_go_beyond_max_files(tmp_path, monkeypatch):
  monkeypatch.setattr(executable_cache, "MAX_FILES", 2)
  fn = executable_cache.CachedJit(lambda x: x * 3, "triple", tmp_path)
  for n in (1, 2, 3):
    fn(np.zeros(n, np.float32))
    time.sleep(0.02)  # distinct modification times
  assert len(_files(tmp_path)) == 2
  assert executable_cache.CachedJit(lambda x: x * 3, "triple", tmp_path).compile(np.zeros(3, np.float32)).loaded
  assert not executable_cache.CachedJit(lambda x: x * 3, "triple", tmp_path).compile(np.zeros(1, np.float32)).loaded


@pytest.mark.slow
def test_a_repeated_train_command_loads_its_steps_and_trains_the_same(tmp_path):
  """The train CLI twice on one cache folder: the second run writes no new executable, loads the train and eval
  steps (their files' times move), and its results are those of a run without any cache."""
  cache = tmp_path / "cache"
  executables = cache / "executables"

  def train(workdir, compilation_cache):
    result = run_python("-m", "fcnjax.train", "--config=tests/reliability_helpers.py", f"--workdir={workdir}",
                        f"--compilation_cache={compilation_cache}", "--config.train.num_steps=4")
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout[result.stdout.index("{"):]

  first = train(tmp_path / "first", cache)
  files = _files(executables)
  assert len(files) >= 2, "the train and eval steps were not written"
  for path in files:
    os.utime(path, (0, 0))  # a load sets its time to now
  second = train(tmp_path / "second", cache)
  assert _files(executables) == files
  assert all(path.stat().st_mtime > 0 for path in files), "a step was compiled, not loaded"
  assert first == second == train(tmp_path / "uncached", "")
