"""Orbax checkpoints: the last k for resuming, the best k by validation mIoU, each saved atomically.

Orbax writes a step into a temporary directory and renames it when complete, so a process killed mid-write leaves
no half-written step that a restart would read: the restart resumes from the last complete one. Old steps are
renamed into TO_DELETE before their files are removed (orbax would delete them in place, and a kill halfway through
left a step directory that looks complete but is not); a step directory is thus either complete or absent.
Each step holds the train state and a JSON record of the model it belongs to, checked before restoring.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class CheckpointMismatchError(ValueError):
  """A checkpoint in the workdir belongs to another model or another number of classes."""


# Steps past their retention are renamed here (atomic), then removed by purge_deleted_steps.
TO_DELETE = "_to_delete"
# How often a reader lists a checkpoint directory again when a step vanished while it was being listed.
READ_ATTEMPTS = 5


def _manager(directory: str, keep: int, best: bool, writable: bool) -> ocp.CheckpointManager:
  # Only the training run cleans up: a reader (predict, evaluate) opened while it trains would otherwise delete the
  # temporary step it is writing, and the run would fail at its next save.
  if writable:
    purge_deleted_steps(directory)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=writable, cleanup_tmp_directories=writable,
      todelete_subdir=TO_DELETE if writable else None,
      best_fn=(lambda m: m["miou"]) if best else None, best_mode="max",
      keep_checkpoints_without_metrics=not best,
      # Orbax names its cross-process barriers after the step ("async_write_complete.4"): without a prefix per
      # manager, saving step 4 to best/ and checkpoints/ at once crosses their barriers, and process 0 may
      # finalise one before the other processes have written it ("ArrayMetadata Store contains metadata from
      # just one process").
      multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix="best" if best else "latest"))
  # A reader lists the step directories, then reads each one's metadata; the training run may retire a step in
  # between (orbax's retention), and orbax then raises FileNotFoundError for it, or NotADirectoryError when the step
  # goes between its exists() and is_dir() checks (seen in a suite run). Listing again sees the new state.
  attempts = 1 if writable else READ_ATTEMPTS
  for attempt in range(attempts):
    try:
      # Handlers named up front: a fresh manager (a restarted run) can then read each item's metadata and shapes.
      handlers = {"state": ocp.StandardCheckpointHandler(), "model": ocp.JsonCheckpointHandler()}
      return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)
    except (FileNotFoundError, NotADirectoryError):
      if attempt == attempts - 1:
        raise
      time.sleep(0.05 * (attempt + 1))


def purge_deleted_steps(directory: str) -> None:
  """Removes the steps orbax retired into `directory`/TO_DELETE (process 0 only, as orbax deletes on one host).

  Only its entries are removed, never TO_DELETE itself, into which another process's orbax may be renaming a step.
  """
  retired = os.path.join(directory, TO_DELETE)
  if jax.process_index() != 0 or not os.path.isdir(retired):
    return
  for name in os.listdir(retired):
    shutil.rmtree(os.path.join(retired, name), ignore_errors=True)


class Checkpoints:
  """`workdir/checkpoints` (last `keep` steps, for resume) and `workdir/best` (best `keep_best` by mIoU).

  Opened for reading unless `writable` (the training run): reading changes nothing on disk.
  """

  def __init__(self, workdir: str, keep: int = 3, keep_best: int = 1, writable: bool = False):
    self.writable = writable
    self.latest = _manager(os.path.join(workdir, "checkpoints"), keep, best=False, writable=writable)
    self.best = _manager(os.path.join(workdir, "best"), keep_best, best=True, writable=writable) if keep_best else None

  def save(self, step: int, state: Any, model_record: dict, force: bool = False) -> None:
    self._check_writable()
    # A step saved already is the same state (resume is exact): a stop request at a checkpoint step, or a step
    # replayed after a kill that came between this step's best and latest saves. Orbax would raise for it.
    if step in self.latest.all_steps():
      return
    self.latest.wait_until_finished()  # orbax waits for the previous save anyway; its retired steps can go now
    purge_deleted_steps(str(self.latest.directory))
    self.latest.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   model=ocp.args.JsonSave(model_record)), force=force)

  def save_best(self, step: int, state: Any, model_record: dict, miou: float) -> None:
    self._check_writable()
    if self.best is not None and step not in self.best.all_steps():
      self.best.wait_until_finished()
      purge_deleted_steps(str(self.best.directory))
      self.best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   model=ocp.args.JsonSave(model_record)),
                     metrics={"miou": float(miou)}, force=True)

  def _check_writable(self) -> None:
    if not self.writable:
      raise PermissionError(f"{self.latest.directory}: opened for reading; Checkpoints(..., writable=True) saves")

  def latest_step(self) -> int | None:
    return self.latest.latest_step()

  def restore(self, state: Any, model_record: dict, step: int | None = None, which: str = "latest") -> Any:
    """Restores into the structure (and shardings) of `state`; refuses a checkpoint of another model."""
    manager = self.best if which == "best" else self.latest
    if manager is None:
      raise FileNotFoundError("this run keeps no best checkpoints (train.keep_best=0)")
    if step is None:
      step = manager.best_step() if which == "best" else manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    saved_record = manager.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))["model"]
    check_model_record(saved_record, model_record, f"{manager.directory}/{step}")
    check_shapes(manager.item_metadata(step)["state"], state, f"{manager.directory}/{step}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    logging.info("restored step %d from %s", step, manager.directory)
    return restored["state"]

  def restore_variables(self, model_record: dict, which: str = "best") -> tuple[dict, int]:
    """Model variables ({'params', 'batch_stats'}) of the best (or, with none, the latest) checkpoint."""
    manager = self.best if which == "best" and self.best is not None and self.best.latest_step() else self.latest
    step = manager.best_step() if manager is self.best else manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {manager.directory}: train first, or check --workdir")
    saved_record = manager.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))["model"]
    check_model_record(saved_record, model_record, f"{manager.directory}/{step}")
    target = on_one_device(manager.item_metadata(step)["state"])
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    variables = {"params": state["params"]}
    if state.get("batch_stats"):
      variables["batch_stats"] = state["batch_stats"]
    return variables, step

  def wait(self) -> None:
    for manager in (self.latest, self.best):
      if manager is not None:
        manager.wait_until_finished()
        if self.writable:
          purge_deleted_steps(str(manager.directory))

  def close(self) -> None:
    """Closes both managers, raising the first failure after both are closed. After a failed save (a full disk),
    orbax's other writes of that save may still be running: they are waited for here, or they would fail at
    interpreter exit with a traceback of their own ('cannot schedule new futures after shutdown')."""
    errors = []
    for manager in (self.latest, self.best):
      if manager is not None:
        try:
          manager.close()
        except Exception as e:  # pylint: disable=broad-except
          errors.append(e)
    join_background_writes()
    if errors:
      raise errors[0]


# Bounds the wait for the writes of a failed save: each is a write to the local or network disk of one step.
BACKGROUND_WRITE_TIMEOUT_S = 120


def join_background_writes(timeout: float = BACKGROUND_WRITE_TIMEOUT_S) -> None:
  """Waits for orbax's background save threads still running; their failures are orbax's to log, not raised here."""
  from orbax.checkpoint._src.futures import future  # pylint: disable=g-import-not-at-top
  save_thread = future._SignalingThread  # pylint: disable=protected-access
  deadline = time.monotonic() + timeout
  for thread in threading.enumerate():
    if isinstance(thread, save_thread) and thread is not threading.current_thread():
      # threading.Thread's join: orbax's own re-raises the thread's failure, which the save has reported already.
      threading.Thread.join(thread, max(0.0, deadline - time.monotonic()))


def on_one_device(saved_metadata: Any) -> Any:
  """The saved arrays' shapes, placed on this process's first device: without a target, orbax restores onto the
  devices the checkpoint was written from and refuses other ones (a run trained on 8 GPUs, evaluated on 1)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                      getattr(saved_metadata, "tree", saved_metadata))


def check_model_record(saved: dict, expected: dict, where: str) -> None:
  differences = [f"{k}: checkpoint has {saved.get(k)!r}, config has {expected.get(k)!r}"
                 for k in sorted(set(saved) | set(expected)) if saved.get(k) != expected.get(k)]
  if differences:
    raise CheckpointMismatchError(
        f"checkpoint {where} belongs to another model:\n  " + "\n  ".join(differences) +
        "\nUse another --workdir, or the config this checkpoint was trained with.")


def _path_name(path) -> str:
  """'params/Conv_0/kernel' for a path through dicts, dataclass fields or sequences alike."""
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
  return "/".join(parts)


def flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  tree = getattr(tree, "tree", tree)  # orbax wraps checkpoint metadata trees
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_name(path): tuple(getattr(leaf, "shape", ())) for path, leaf in leaves}


def check_shapes(saved_metadata: Any, state: Any, where: str) -> None:
  """Names every array whose shape differs between the checkpoint and the state to restore into."""
  saved, wanted = flat_shapes(saved_metadata), flat_shapes(state)
  wrong = [f"{k}: checkpoint {saved[k]}, model {wanted[k]}" for k in sorted(saved.keys() & wanted.keys())
           if saved[k] != wanted[k]]
  missing = sorted(wanted.keys() - saved.keys())
  if wrong or missing:
    lines = [f"checkpoint {where} does not fit the model:"]
    if wrong:
      lines.append(f"  shape differs ({len(wrong)}): " + "; ".join(wrong[:10]))
    if missing:
      lines.append(f"  not in checkpoint ({len(missing)}): " + ", ".join(missing[:10]))
    raise CheckpointMismatchError("\n".join(lines))


def model_record(config) -> dict:
  """What identifies the model a checkpoint belongs to: its name, classes and architecture options."""
  record = {k: v for k, v in config.model.to_dict().items() if k not in ("pretrained", "pretrained_scope", "dtype")}
  # Through JSON, as saved: tuples become lists, so a restored record compares equal to a fresh one.
  return json.loads(json.dumps(record))
