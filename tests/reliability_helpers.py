"""What the tests share: the tiny experiment config, the environment of a test's subprocess, and
`python -m fcnjax.train` run as a real subprocess (so that bad input, signals and kills meet the program a user
runs).

This file is also the experiment config those subprocesses load: `--config tests/reliability_helpers.py` calls
get_config() below, so it must import nothing from the test suite at module level.

Subprocesses share one persistent XLA compilation cache per pytest session: the tiny U-Net's init takes most of a
run's time to compile on a CPU, and every run after the first loads it from the cache instead.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

from fcnjax.config import base_config

HERE = pathlib.Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
CONFIG = str(HERE / "reliability_helpers.py")
TIMEOUT = 240  # seconds for one subprocess; a hang fails the test instead of stalling CI
# The tests' XLA programs, in-process (conftest.py) and in every subprocess, are compiled at LLVM's level 1 instead
# of the default 2: the same values (XLA's CPU backend keeps fast-math off; tests/test_unet.py checks bit-equality
# for the initialiser), and ~18% less time to compile a train step (voc_fcn_resnet50's one-step run, 62 -> 51 s, 2-core
# AMD EPYC Zen 2, AVX2), which is most of the suite's time. Users' runs compile at the default level.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=1"


def tiny_config(num_steps: int = 8, **train_overrides):
  """A U-Net small enough to train for a few steps in seconds on a CPU, on 64 synthetic 32x32 images."""
  config = base_config(model=dict(name="unet", num_classes=4, base_width=4, depth=2))
  config.data.source = "synthetic"
  config.data.num_classes = 4
  config.data.image_size = 32
  config.data.synthetic_train_examples = 64
  config.data.synthetic_val_examples = 16
  config.loss.name = "cross_entropy"
  config.optim.optimizer = "adam"
  config.optim.learning_rate = 3e-3
  config.optim.schedule = "constant"
  config.train.batch_size = 8
  config.train.num_steps = num_steps
  config.train.log_every = 1
  config.train.progress = False
  config.eval.batch_size = 8
  for key, value in train_overrides.items():
    config.train[key] = value
  return config


def get_config():
  """tiny_config as a config file, with a checkpoint at every step (so that kills often land in the middle of a
  checkpoint write), an evaluation every 4 steps and one data thread."""
  config = tiny_config(eval_every=4, checkpoint_every=1, keep_checkpoints=2)
  config.data.read_threads = 1
  return config


def env(num_devices: int = 1, **extra: str) -> dict[str, str]:
  """This process's environment for a subprocess on `num_devices` CPU devices that imports fcnjax and the tests'
  modules (the session's XLA compilation cache comes with os.environ, see conftest.py)."""
  environ = dict(os.environ)
  environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices} {TEST_XLA_FLAGS}"
  environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(HERE), environ.get("PYTHONPATH", "")])
  environ["JAX_PLATFORMS"] = "cpu"
  environ.update(extra)
  return environ


def command(entry_point: str, *args: str, inject: str | None = None) -> list[str]:
  """`python -m fcnjax.<entry_point> ARGS`; with `inject`, the same entry point run after install_fault(inject)
  (below) has patched a fault into the process."""
  if inject is None:
    return [sys.executable, "-m", f"fcnjax.{entry_point}", *args]
  script = ("import sys, reliability_helpers as h; h.install_fault(sys.argv.pop(1)); "
            f"from fcnjax import cli, {entry_point}; cli.run({entry_point}.main)")
  return [sys.executable, "-c", script, inject, *args]


def train_command(workdir, *overrides: str, inject: str | None = None) -> list[str]:
  """`python -m fcnjax.train --config <tiny> --workdir W --config.k=v ...`, see command()."""
  return command("train", f"--config={CONFIG}", f"--workdir={workdir}", *overrides, inject=inject)


def run_train(workdir, *overrides: str, inject: str | None = None, num_devices: int = 1, timeout: float = TIMEOUT,
              extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(train_command(workdir, *overrides, inject=inject), env=env(num_devices, **(extra_env or {})),
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def run_together(*commands: tuple[list[str], dict[str, str]], timeout: float = TIMEOUT
                 ) -> list[subprocess.CompletedProcess]:
  """Runs independent (argv, env) commands at the same time (CI has 2 cores) and returns their results in order.

  Output goes to files, not pipes: processes that wait on each other (the hosts of one run) must never block on a
  full pipe that nobody reads yet.
  """
  files = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in commands]
  processes = [subprocess.Popen(argv, env=environ, cwd=REPO_ROOT, stdout=out, stderr=err, text=True)
               for (argv, environ), (out, err) in zip(commands, files)]
  deadline = time.monotonic() + timeout
  timed_out = False
  try:
    for process in processes:
      process.wait(timeout=max(1.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    timed_out = True
  finally:
    for process in processes:  # one that hangs (e.g. waiting for a dead peer) is not left behind
      if process.poll() is None:
        process.kill()
        process.wait()
  results = []
  for (argv, _), process, (out, err) in zip(commands, processes, files):
    out.seek(0)
    err.seek(0)
    results.append(subprocess.CompletedProcess(argv, process.returncode, out.read(), err.read()))
    out.close()
    err.close()
  if timed_out:  # say what every process was doing: the one that hung is often waiting for one that failed
    raise AssertionError(f"not all done after {timeout:.0f} s:\n" + "\n".join(
        f"--- command {i} (exit {r.returncode}): {r.args[-1]}\n{r.stderr[-2500:]}" for i, r in enumerate(results)))
  return results


def start_train(workdir, *overrides: str, inject: str | None = None, num_devices: int = 1,
                extra_env: dict[str, str] | None = None, log=None) -> subprocess.Popen:
  out = log if log is not None else subprocess.DEVNULL
  return subprocess.Popen(train_command(workdir, *overrides, inject=inject), env=env(num_devices, **(extra_env or {})),
                          cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, process: subprocess.Popen | None = None, timeout: float = TIMEOUT, poll: float = 0.005):
  """Polls until predicate() is truthy; fails if `process` exits first or time runs out."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    value = predicate()
    if value:
      return value
    if process is not None and process.poll() is not None:
      raise AssertionError(f"process exited with {process.returncode} before the awaited event")
    time.sleep(poll)
  raise AssertionError("timed out waiting for the training process")


def metrics(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  lines = path.read_text().splitlines()
  # A line being appended while we read is incomplete: ignore a trailing partial line.
  return [json.loads(line) for line in lines if line.strip().endswith("}")]


def train_records(workdir) -> list[dict]:
  return [r for r in metrics(workdir) if r["kind"] == "train"]


def step_dirs(directory) -> dict[str, list[str]]:
  """{'complete': step directories orbax treats as finished, 'partial': its temporary (unfinished) ones}."""
  directory = pathlib.Path(directory)
  names = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
  return {"complete": sorted((n for n in names if n.isdigit()), key=int),
          "partial": [n for n in names if ".orbax-checkpoint-tmp" in n]}


def tree_digest(directory) -> dict[str, str]:
  """sha256 of every file under `directory`, by relative path: proves a failed run left a workdir untouched."""
  directory = pathlib.Path(directory)
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()}


def read_state(directory, step: int) -> dict:
  """The saved train state and model record of one step, read-only (a read-only manager cleans nothing up, so the
  directory is inspected exactly as a kill left it), onto this process's one device whatever devices wrote it."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from fcnjax import checkpoint  # pylint: disable=g-import-not-at-top
  manager = ocp.CheckpointManager(
      os.path.abspath(directory), options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={"state": ocp.StandardCheckpointHandler(), "model": ocp.JsonCheckpointHandler()})
  try:
    target = checkpoint.on_one_device(manager.item_metadata(step)["state"])
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                               model=ocp.args.JsonRestore()))
  finally:
    manager.close()
  return {"state": restored["state"], "model": restored["model"]}


def params_of(directory, step: int):
  return read_state(directory, step)["state"]["params"]


def max_abs_diff(a, b) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)))


def all_finite(tree) -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


# Faults installed in a training subprocess before fcnjax.train runs (train_command(inject=...)).

def install_fault(spec: str) -> None:
  """'NAME:ARG', one of
    nan_at_step:K          NaN in the images of this process's K-th training batch
    oom_at_step:K          XLA's RESOURCE_EXHAUSTED error raised at this process's K-th training batch
    kill_in_delete:N       SIGKILL right after the N-th file deleted from a committed step of checkpoints/ (the
                           removal of a step past keep_checkpoints, half done)
    kill_before_rename:D[,W]  SIGKILL when orbax is about to rename a finished temporary step into D (a path
                           relative to the workdir, e.g. checkpoints/4), once W (e.g. best/4) exists if given: the
                           step is fully written, commit_success.txt included, but not committed
    slow_start:S           S seconds of sleep before the model is initialised: a host that compiles or loads its
                           data that much later than its peers
    delete_after_batch:K,P  delete file P once this process has taken its K-th training batch: data that changes
                           under the running job
    hang_at_batch:K,P      at this process's K-th training batch, create file P and sleep for an hour: a host that
                           stops answering mid-run (its peers wait in that step's collectives), at a point that a
                           test sees
    hang_at_eval_batch:K,P the same at its K-th evaluation batch (its peers wait in the evaluation's collectives)
    hang_before_rename:D,P the same when orbax is about to rename a finished temporary step into D (e.g.
                           checkpoints/6): a save in flight, never committed
    hang_after_training:P  the same once the run is over and its checkpoints closed, before the process exits
    busy_peer_watch:S      fcnjax.parallel's peer watch polls every S seconds instead of every second: with S
                           tiny it is nearly always inside a call to JAX's client, also when the process exits
    enospc_in_save:D       the save of step directory D (relative to the workdir, e.g. checkpoints/5) fails with
                           OSError(ENOSPC) half-way through writing its model record, as on a full disk
  """
  name, _, arg = spec.partition(":")
  faults = {"nan_at_step": _nan_at_step, "oom_at_step": _oom_at_step, "kill_in_delete": _kill_in_delete,
            "kill_before_rename": _kill_before_rename, "slow_start": _slow_start, "enospc_in_save": _enospc_in_save,
            "delete_after_batch": _delete_after_batch, "hang_at_batch": _hang_at_batch,
            "hang_at_eval_batch": _hang_at_eval_batch, "hang_before_rename": _hang_before_rename,
            "hang_after_training": _hang_after_training, "busy_peer_watch": _busy_peer_watch}
  faults[name](arg)


def _slow_start(seconds: str) -> None:
  from fcnjax import steps  # pylint: disable=g-import-not-at-top
  original = steps.init_variables

  def init_variables(*args, **kwargs):
    time.sleep(float(seconds))
    return original(*args, **kwargs)

  steps.init_variables = init_variables


def _batches_counter(transform, kind: str = "train"):
  """Wraps parallel.to_global so that `transform(call_number, batch)` sees every training batch (eval batches carry
  'valid' and pass through untouched); with kind='eval', every evaluation batch instead."""
  from fcnjax import parallel  # pylint: disable=g-import-not-at-top
  original, calls = parallel.to_global, [0]

  def to_global(batch, sharding):
    if ("valid" in batch) == (kind == "eval"):
      calls[0] += 1
      batch = transform(calls[0], batch)
    return original(batch, sharding)

  parallel.to_global = to_global


def _nan_at_step(step: str) -> None:
  step = int(step)
  import numpy as np  # pylint: disable=g-import-not-at-top

  def poison(call, batch):
    # A resumed run starts counting at its first step, so the fault fires once per process, at its step-th batch.
    if call == step:
      batch = dict(batch, image=np.full_like(batch["image"], np.nan))
    return batch

  _batches_counter(poison)


def _oom_at_step(step: str) -> None:
  step = int(step)
  import jax  # pylint: disable=g-import-not-at-top

  def fail(call, batch):
    if call == step:
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123456789 bytes.")
    return batch

  _batches_counter(fail)


def _kill_in_delete(after_files: str) -> None:
  """Counts file deletions inside committed step directories of checkpoints/ (an old step being removed, in place
  or after being moved aside; temporary steps do not count) and SIGKILLs the process after the after_files-th."""
  after_files = int(after_files)
  original, count = os.unlink, [0]

  def unlink(path, *args, **kwargs):
    result = original(path, *args, **kwargs)
    dir_fd = kwargs.get("dir_fd")
    where = pathlib.Path(os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else os.fspath(path))
    if "checkpoints" in where.parts:
      below = where.parts[len(where.parts) - where.parts[::-1].index("checkpoints"):]
      if any(part.isdigit() for part in below):
        count[0] += 1
        if count[0] == after_files:
          os.kill(os.getpid(), signal.SIGKILL)
    return result

  os.unlink = unlink
  os.remove = unlink


def _kill_before_rename(arg: str) -> None:
  from orbax.checkpoint._src.path import async_path  # pylint: disable=g-import-not-at-top
  target, _, wait_for = arg.partition(",")
  original = async_path.rename

  async def rename(src, dst):
    dst_path = pathlib.Path(os.fspath(dst))
    if dst_path.parts[-len(pathlib.Path(target).parts):] == pathlib.Path(target).parts:
      workdir = dst_path.parents[len(pathlib.Path(target).parts) - 1]
      deadline = time.monotonic() + 60
      while wait_for and not (workdir / wait_for).is_dir() and time.monotonic() < deadline:
        time.sleep(0.01)
      os.kill(os.getpid(), signal.SIGKILL)
    return await original(src, dst)

  async_path.rename = rename


def _delete_after_batch(arg: str) -> None:
  after, _, path = arg.partition(",")

  def delete(call, batch):
    if call == int(after):
      os.remove(path)
    return batch

  _batches_counter(delete)


def _hang(path: str) -> None:
  pathlib.Path(path).touch()
  time.sleep(3600)


def _hang_at_batch(arg: str, kind: str = "train") -> None:
  after, _, path = arg.partition(",")

  def hang(call, batch):
    if call == int(after):
      _hang(path)
    return batch

  _batches_counter(hang, kind)


def _hang_at_eval_batch(arg: str) -> None:
  _hang_at_batch(arg, kind="eval")


def _hang_before_rename(arg: str) -> None:
  from orbax.checkpoint._src.path import async_path  # pylint: disable=g-import-not-at-top
  target, _, path = arg.partition(",")
  original = async_path.rename

  async def rename(src, dst):
    if pathlib.Path(os.fspath(dst)).parts[-len(pathlib.Path(target).parts):] == pathlib.Path(target).parts:
      _hang(path)
    return await original(src, dst)

  async_path.rename = rename


def _hang_after_training(path: str) -> None:
  from fcnjax import training  # pylint: disable=g-import-not-at-top
  original = training._close_all  # pylint: disable=protected-access

  def close_all(*closers, quiet=False):
    original(*closers, quiet=quiet)
    if not quiet:  # the closing of a run that went to its end
      _hang(path)

  training._close_all = close_all  # pylint: disable=protected-access


def _busy_peer_watch(seconds: str) -> None:
  from fcnjax import parallel  # pylint: disable=g-import-not-at-top
  parallel._WATCH_INTERVAL_S = float(seconds)  # pylint: disable=protected-access


def _enospc_in_save(target: str) -> None:
  import errno  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.handlers import json_checkpoint_handler  # pylint: disable=g-import-not-at-top
  handler = json_checkpoint_handler.JsonCheckpointHandler
  original = handler._save_fn  # pylint: disable=protected-access
  folder, step = pathlib.Path(target).parent.name, pathlib.Path(target).name

  async def save_fn(self, x, directory):
    parts = pathlib.Path(os.fspath(directory)).parts
    if folder in parts and parts[parts.index(folder) + 1].split(".")[0] == step:
      path = pathlib.Path(os.fspath(directory)) / self._filename  # pylint: disable=protected-access
      text = json.dumps(x)
      with open(path, "w") as f:
        f.write(text[:len(text) // 2])
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return await original(self, x, directory)

  handler._save_fn = save_fn  # pylint: disable=protected-access
