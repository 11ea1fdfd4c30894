"""fcnjax.compilation_cache: where the entry points' persistent XLA cache goes, and which folders it refuses."""
import os
import stat

import jax
import pytest

from fcnjax import compilation_cache


@pytest.fixture
def jax_cache_settings():
  """Restores JAX's cache settings (the suite's session cache) after a test changes them."""
  saved = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  yield
  jax.config.update("jax_compilation_cache_dir", saved[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])


def test_the_default_folder_is_private_and_beside_the_kernel_cache(tmp_path, monkeypatch, jax_cache_settings):
  monkeypatch.setenv("FCNJAX_CACHE_DIR", str(tmp_path / "cache"))
  jax.config.update("jax_compilation_cache_dir", None)
  path = compilation_cache.enable()
  assert path == tmp_path / "cache" / "xla"
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
  assert jax.config.jax_compilation_cache_dir == str(path)


def test_jax_own_setting_wins_and_empty_turns_it_off(tmp_path, jax_cache_settings):
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "set_by_env"))
  assert compilation_cache.enable() == tmp_path / "set_by_env"
  assert compilation_cache.enable("") is None
  assert jax.config.jax_compilation_cache_dir is None


def test_a_folder_others_can_write_is_not_used(tmp_path, jax_cache_settings):
  shared = tmp_path / "shared"
  shared.mkdir()
  os.chmod(shared, 0o777)
  jax.config.update("jax_compilation_cache_dir", None)
  with pytest.warns(UserWarning, match="writable by group and others"):
    assert compilation_cache.enable(shared) is None
  assert jax.config.jax_compilation_cache_dir is None
