"""The training loop: `train_and_evaluate(config, workdir)`, which `python -m fcnjax.train` calls.

Data flows one way: config -> data -> model -> jitted steps -> this loop -> checkpoints and metrics. The same
workdir resumes from its latest checkpoint, and the loop runs data-parallel over every device of every process.
The loop itself is plain Python: a train step per iteration, then the periodic actions (log, evaluate, checkpoint)
that are due.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from fcnjax import checkpoint, data, evaluation, losses, metrics, models, optim, parallel, plots, reporting, steps
from fcnjax import diskspace
from fcnjax.ops import native
from fcnjax.segmenter import Segmenter


class NonFiniteLossError(FloatingPointError):
  """The loss or gradients became NaN/Inf; the last good checkpoint is left untouched."""


class OutOfDeviceMemoryError(RuntimeError):
  """XLA could not allocate device memory (RESOURCE_EXHAUSTED); the message says which settings to lower."""


def _explain_out_of_memory(train_fn):
  """XLA's RESOURCE_EXHAUSTED names a byte count, not a setting: say which settings of the run to lower."""

  @functools.wraps(train_fn)
  def wrapper(config: ml_collections.ConfigDict, workdir: str, *args):
    try:
      return train_fn(config, workdir, *args)
    except RuntimeError as e:  # jax.errors.JaxRuntimeError (XlaRuntimeError in older jax) is a RuntimeError
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      per_device = config.train.batch_size / jax.device_count()
      raise OutOfDeviceMemoryError(
          f"out of device memory running {config.model.name} with train.batch_size={config.train.batch_size} "
          f"({per_device:g} per device on {jax.device_count()} devices), model.dtype={config.model.dtype}, "
          f"eval.batch_size={config.eval.batch_size}. Try a smaller --config.train.batch_size (or "
          "--config.eval.batch_size if it failed while evaluating), or --config.model.dtype=bfloat16 for "
          "mixed precision; `python -m benchmarks.memory --budget_gb=<GB>` finds the largest batch that fits. "
          f"XLA said: {str(e).splitlines()[0][:300]}") from e

  return wrapper


def _explain_disk_full(train_fn):
  """A full disk reaches the loop as OSError(ENOSPC) or as tensorstore's RESOURCE_EXHAUSTED text, raised from
  orbax's background writes or a metrics file: say it as one line naming the workdir's filesystem, its free space
  and the checkpoint that a rerun resumes from."""

  @functools.wraps(train_fn)
  def wrapper(config: ml_collections.ConfigDict, workdir: str, *args):
    try:
      return train_fn(config, workdir, *args)
    except Exception as e:  # pylint: disable=broad-except
      if isinstance(e, diskspace.DiskFullError) or not diskspace.is_disk_full(e):
        raise
      raise diskspace.training_disk_full_error(e, workdir) from e

  return wrapper


class _StopRequest:
  """Set by SIGTERM / SIGINT so the loop can save a checkpoint at a step boundary before exiting."""

  def __init__(self):
    self.signal_name = None

  def __call__(self, signum, frame):
    del frame
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C stops at once.
    self.signal_name = signal.Signals(signum).name

  def install(self):
    previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}
    return lambda: [signal.signal(s, h) for s, h in previous.items()]


class DeferredFiniteCheck:
  """Checks each step's loss and gradients for NaN/Inf one step late, so that reading the flag never waits for the
  step just dispatched (the device stays busy); `flush()` checks the step held back, before anything is logged,
  evaluated or saved. A non-finite step raises NonFiniteLossError, or with on_nonfinite='skip' is counted."""

  def __init__(self, on_nonfinite: str):
    self.on_nonfinite = on_nonfinite
    self.skipped_steps = 0
    self._pending = None

  def push(self, step: int, step_metrics: dict) -> None:
    self.flush()
    self._pending = (step, step_metrics)

  def flush(self) -> None:
    if self._pending is None:
      return
    step, step_metrics = self._pending
    self._pending = None
    if bool(jax.device_get(step_metrics["finite"])):
      return
    loss = float(jax.device_get(step_metrics["loss"]))
    if self.on_nonfinite == "skip":
      logging.warning("step %d: non-finite loss/gradients (loss=%s); step skipped", step + 1, loss)
      self.skipped_steps += 1
      return
    raise NonFiniteLossError(
        f"step {step + 1}: loss is {loss} (or a gradient is NaN/Inf); stopped without saving, the last good "
        "checkpoint is kept. Lower optim.learning_rate, set optim.grad_clip_norm, or "
        "--config.train.on_nonfinite=skip.")


@dataclasses.dataclass
class Periodic:
  """An action run after every `every` steps and after the last one."""
  name: str
  every: int
  run: Callable[[int, Any], None]

  def due(self, step: int, total_steps: int) -> bool:
    return step % self.every == 0 or step == total_steps


def check_config(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> None:
  """Refuses a model head or loss that does not fit the data before anything is compiled."""
  expected = 1 if info.binary else info.num_classes
  if config.model.num_classes != expected:
    raise ValueError(f"model.num_classes={config.model.num_classes} but the data has {info.num_classes} classes "
                     f"({'binary: use 1 output with a sigmoid loss' if info.binary else ', '.join(info.class_names)})")
  if not losses.fits(config.loss.name, info.binary):
    refused = losses.MULTICLASS_ONLY if info.binary else losses.BINARY_ONLY
    raise ValueError(f"loss.name={config.loss.name!r} does not fit {'binary' if info.binary else 'multi-class'} "
                     f"data; use a loss without {' or '.join(refused)} (terms: {', '.join(losses.TERMS)})")


def total_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  if config.train.num_steps:
    return int(config.train.num_steps)
  return int(config.train.num_epochs * steps_per_epoch)


def initial_variables(config: ml_collections.ConfigDict, model, rng: jax.Array, image_shape, executables=None) -> dict:
  variables = steps.init_variables(model, rng, image_shape, executables)
  if config.model.pretrained:
    from fcnjax import pretrained  # pylint: disable=g-import-not-at-top
    loaded = pretrained.load_variables(config.model.pretrained)
    variables, report = pretrained.merge_pretrained(variables, loaded, scope=config.model.pretrained_scope)
    logging.info("pretrained %s: %d arrays loaded, %d left at init, %d unused", config.model.pretrained,
                 len(report["loaded"]), len(report["left_at_init"]), len(report["unused"]))
  return variables


def _mean_metrics(history: list[dict]) -> dict:
  fetched = jax.device_get(history)
  return {k: float(np.mean([h[k] for h in fetched])) for k in fetched[0] if k != "finite"}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       executables: str | os.PathLike | None = None) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the final evaluation summary. With `executables`, a folder,
  the compiled train and eval steps are kept there and loaded by the next run of the same config
  (fcnjax.executable_cache)."""
  with native.kernels_enabled(config.native_kernels):
    return _train_and_evaluate(config, workdir, executables)


@_explain_out_of_memory
@_explain_disk_full
def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, executables) -> dict[str, Any]:
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  mesh = parallel.make_mesh()
  batch_sharding, replicated = parallel.batch_sharded(mesh), parallel.replicated(mesh)
  parallel.check_batch_size(config.train.batch_size)
  parallel.check_batch_size(config.eval.batch_size, "eval.batch_size")
  if config.eval.tile < 0:
    raise ValueError(f"eval.tile={config.eval.tile} must be >= 0 (0 validates whole images)")

  info = data.dataset_info(config.data)
  check_config(config, info)
  train_data = data.build_train_data(config.data, batch_size=config.train.batch_size, seed=config.seed,
                                     process_index=jax.process_index(), process_count=jax.process_count())
  eval_data = data.build_eval_data(config.data, split="validation", batch_size=config.eval.batch_size,
                                   process_index=jax.process_index(), process_count=jax.process_count())
  total_steps = total_train_steps(config, train_data.steps_per_epoch)

  model = models.build_model(config.model)
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  example_batch = next(iter(train_data.iterator(0)))
  variables = initial_variables(config, model, init_rng, example_batch["image"].shape[1:], executables)
  tx = optim.make_optimizer(config.optim, total_steps, variables["params"])
  # Placing the state on every device checks that all processes hold the same one: the run's first collective.
  parallel.wait_for_all_processes("initialised")
  state = parallel.replicate(steps.create_train_state(model, tx, variables, state_rng), mesh)

  record = checkpoint.model_record(config)
  ckpts = checkpoint.Checkpoints(workdir, keep=config.train.keep_checkpoints, keep_best=config.train.keep_best,
                                 writable=True)
  if ckpts.latest_step() is not None:
    state = ckpts.restore(state, record)
  start_step = int(jax.device_get(state.step))
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  train_step = steps.jit_train_step(config, total_steps, replicated, executables)
  eval_step = evaluation.make_eval_step(model, info, mesh, executables)
  # Tiled validation predicts on the host, image by image, as fcnjax.evaluate --tile does; every process scores
  # the whole split, so all agree on the best checkpoint.
  tiled = (Segmenter(model, None, config.data, tile=config.eval.tile, executables=executables)
           if config.eval.tile else None)
  # Compiled before the barrier: a host that compiles more slowly than its peers then waits there, not in its
  # first collective (see parallel.wait_for_all_processes).
  start = time.perf_counter()
  loaded = train_step.compile(state, parallel.global_shapes(example_batch, batch_sharding)).loaded
  if tiled is None:
    evaluation.compile_eval_step(eval_step, _variables_of(state), eval_data, batch_sharding)
  logging.info("train and eval steps %s in %.1f s", "loaded" if loaded else "compiled", time.perf_counter() - start)
  parallel.wait_for_all_processes("compiled")

  writer = reporting.MetricWriter(workdir, enabled=is_main)
  progress = _progress_bar(config, total_steps, start_step, enabled=is_main)
  finite_check = DeferredFiniteCheck(config.train.on_nonfinite)
  summary: dict[str, Any] = {}
  history: list[dict] = []
  tick = [time.perf_counter(), start_step]

  def log(step: int, state) -> None:
    del state
    train_metrics = _mean_metrics(history)
    history.clear()
    elapsed = time.perf_counter() - tick[0]
    train_metrics["images_per_second"] = (step - tick[1]) * config.train.batch_size / max(elapsed, 1e-9)
    train_metrics["skipped_steps"] = finite_check.skipped_steps
    train_metrics["skipped_files"] = len(getattr(train_data, "skipped_files", ()))
    writer.write("train", step, train_metrics)
    progress.set_postfix(loss=f"{train_metrics['loss']:.4f}", img_s=f"{train_metrics['images_per_second']:.1f}",
                         refresh=False)
    tick[:] = [time.perf_counter(), step]

  def evaluate(step: int, state) -> None:
    challenge = {}
    if tiled is None:
      confusion = evaluation.confusion_over(eval_step, _variables_of(state), eval_data, batch_sharding,
                                            evaluation.num_scored_classes(info))
    else:
      tiled.variables = jax.device_get(_variables_of(state))
      # The split as loaded (and its files checked) once for the run; the loop's bar shows the progress.
      confusion, challenge = evaluation.evaluate_per_image(tiled, info, eval_data.examples, progress=False)
    summary.update(metrics.summarize(confusion, info.class_names if info.num_classes > 1 else None), **challenge)
    writer.write("eval", step, {k: v for k, v in summary.items() if not isinstance(v, str)})
    progress.write(f"step {step}: mIoU {summary['miou']:.4f}  pixel accuracy {summary['pixel_accuracy']:.4f}"
                   f"  mean Dice {summary['mean_dice']:.4f}"
                   + "".join(f"  {name.replace('_', ' ')} {value:.4f}" for name, value in challenge.items()))
    ckpts.save_best(step, state, record, summary["miou"])

  def save(step: int, state) -> None:
    ckpts.save(step, state, record)

  eval_every = config.train.eval_every or train_data.steps_per_epoch
  periodic = [Periodic("log", config.train.log_every, log), Periodic("evaluate", eval_every, evaluate),
              Periodic("checkpoint", config.train.checkpoint_every or eval_every, save)]
  end_step = total_steps
  if config.train.max_steps_per_run:
    end_step = min(total_steps, start_step + config.train.max_steps_per_run)
  logging.info("training %s from step %d to %d (%d per epoch), %d devices", config.model.name, start_step,
               total_steps, train_data.steps_per_epoch, jax.device_count())
  stop = _StopRequest()
  restore_signals = stop.install()
  try:
    batches = train_data.iterator(start_step)
    for step in range(start_step, end_step):
      state, step_metrics = train_step(state, parallel.to_global(next(batches), batch_sharding))
      finite_check.push(step, step_metrics)
      history.append(step_metrics)
      done = step + 1
      progress.update(1)
      for action in periodic:
        if action.due(done, total_steps):
          finite_check.flush()
          action.run(done, state)
      signal_name = _agreed_signal(stop.signal_name)
      if signal_name is not None or done == end_step < total_steps:
        finite_check.flush()
        ckpts.save(done, state, record, force=True)
        ckpts.wait()
        reason = signal_name or "train.max_steps_per_run"
        progress.write(f"{reason}: saved a checkpoint at step {done} in {workdir}; run the same command to resume")
        summary.update(interrupted_at=done, signal=reason)
        break
  except BaseException as e:
    if parallel.is_peer_lost(e):
      raise  # closing waits on the lost process (orbax's barriers); the last finished checkpoint is what resumes
    # The loop's error is the one to report: a save still in flight may fail too (the same full disk), and the
    # writers must still close, or tensorboardX's exit hook retries the flush and prints its own traceback.
    _close_all(progress.close, ckpts.wait, ckpts.close, writer.close, restore_signals, quiet=True)
    raise
  _close_all(progress.close, ckpts.wait, ckpts.close, writer.close, restore_signals)
  if is_main and "interrupted_at" not in summary:
    _finish(config, workdir, state)
  return summary


def _close_all(*closers: Callable[[], Any], quiet: bool = False) -> None:
  """Calls every closer even when one fails; then raises the first failure, or with `quiet` only logs it."""
  first = None
  for close in closers:
    try:
      close()
    except Exception as e:  # pylint: disable=broad-except
      if quiet:
        logging.info("while stopping after an error: %s", e)
      first = first or e
  if first is not None and not quiet:
    raise first


def _variables_of(state) -> dict:
  return steps.model_variables(state.params, state.batch_stats)


def _agreed_signal(signal_name: str | None) -> str | None:
  """The stop signal of any process, on every process: a signal may reach only some of them (one preempted host),
  and a process that stopped alone would leave the others waiting in the next step's collectives for ever."""
  number = parallel.max_over_processes(signal.Signals[signal_name].value if signal_name else 0)
  return signal.Signals(number).name if number else None


def _progress_bar(config, total_steps: int, start_step: int, enabled: bool):
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, smoothing=0.1,
              disable=not (enabled and config.train.progress), desc=config.model.name)


def _finish(config, workdir: str, state) -> None:
  """Training curves and, where the config asks for them, prediction PNGs of validation images."""
  plots.plot_training_curves(workdir)
  if config.train.num_predictions:
    variables = jax.device_get(_variables_of(state))
    segmenter = Segmenter(models.build_model(config.model), variables, config.data)
    evaluation.write_validation_predictions(segmenter, os.path.join(workdir, "predictions"),
                                            config.train.num_predictions)
