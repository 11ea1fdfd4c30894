"""What every command-line entry point (fcnjax.train, .evaluate, .predict) shares: how it starts and how it
reports a user's error, its default workdir, and the flags of the ones that run a trained model."""
from __future__ import annotations

import math
import os
import sys
from typing import Callable

import jax
from absl import app, flags, logging

from fcnjax import compilation_cache, diskspace, evaluation, executable_cache, host_allocator, inference, parallel

flags.DEFINE_string("compilation_cache", None, "Folder of JAX's persistent compilation cache (default: "
                    "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/fcnjax/xla or $FCNJAX_CACHE_DIR/xla), with the "
                    "compiled steps kept whole in its executables/ folder; '' turns both off.")
flags.DEFINE_bool("keep_freed_memory", False, "Keep the memory a step frees for the next step (glibc): CPU steps "
                  "fault no pages in, but the process keeps its peak memory, and small models' steps can be slower "
                  "(fcnjax.host_allocator; docs/performance.md).")

# Errors that a user's input causes (a missing file or folder, a bad file, a config or checkpoint that does not fit,
# a diverging or oversized run): their message says what to change, so the command prints it as one line.
USER_ERRORS = (OSError, ValueError, ArithmeticError, RuntimeError)


def run(main: Callable[[list[str]], None]) -> None:
  """app.run(main), with a user's error printed as one line `TypeName: message` (exit status 1). With --verbosity
  on the command line, the traceback is printed too. Compiled steps are cached across runs (--compilation_cache);
  --keep_freed_memory sets the C library's allocator first."""

  def guarded_main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Orbax and JAX log every checkpoint step at INFO: keep the console to the progress bar unless --verbosity.
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
      logging.get_absl_logger().addFilter(_without_reported_tracebacks)
    if flags.FLAGS.keep_freed_memory:
      host_allocator.keep_freed_memory()  # before JAX's backend starts its threads
    compilation_cache.enable(flags.FLAGS.compilation_cache)
    try:
      return main(argv)
    except USER_ERRORS as error:
      if flags.FLAGS["verbosity"].present:
        raise
      if parallel.is_peer_lost(error):
        # Exit at once: JAX's exit handler would wait for the lost process at the shutdown barrier, then log pages
        # of the coordination service's errors.
        print(f"PeerLostError: {parallel.peer_lost_error(error)}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(parallel.EXIT_PEER_LOST)  # pylint: disable=protected-access
      message = " ".join(str(error).split()) or repr(error)
      print(f"{type(error).__name__}: {message}", file=sys.stderr)
      raise SystemExit(1) from None

  app.run(guarded_main)


def _without_reported_tracebacks(record) -> bool:
  """False for a log record about a full disk or a lost process: orbax logs each failed background write or commit
  with its traceback, and the run then stops with diskspace.DiskFullError or the PeerLostError line, which say the
  same with where and what to do."""
  error = record.exc_info[1] if record.exc_info else None
  if error is not None and (diskspace.is_disk_full(error) or parallel.is_peer_lost(error)):
    return False
  return not diskspace.text_is_disk_full(record.getMessage())


def executables_dir():
  """Where the entry point keeps its compiled steps whole (fcnjax.executable_cache): executables/ in the persistent
  compilation cache's folder that run() enabled; None when that cache is off or --compilation_cache is ''."""
  if flags.FLAGS.compilation_cache == "":
    return None
  return executable_cache.directory_for(jax.config.jax_compilation_cache_dir)


def default_workdir(config_path: str) -> str:
  """runs/<config file name>, e.g. runs/quickstart for experiments/quickstart.py."""
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  return os.path.join("runs", name)


def define_run_inference_flags() -> None:
  """The flags of the entry points that run a trained model: which run and checkpoint, and how to infer."""
  flags.DEFINE_string("workdir", None, "Training workdir (its config.json and checkpoints).", required=True)
  flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint to use.")
  flags.DEFINE_integer("tile", 0, "Overlap-tile inference with tiles of this size (0: whole image).")
  flags.DEFINE_integer("tile_margin", -1, "Context discarded at each tile side (-1: tile // 8).")
  flags.DEFINE_bool("blend", False, "Blend half-overlapping tiles with a Gaussian window.")
  flags.DEFINE_enum("tta", "none", list(inference.TTA_MODES),
                    "Test-time augmentation: average over the image and its mirror (flip) or over the 8 symmetries "
                    "of the square (d4).")
  flags.DEFINE_string("threshold", "0", "One-logit (binary) models: the logit above which a pixel is foreground "
                      "(0: probability 0.5), or 'train': the threshold with the fewest wrong pixels on the run's "
                      "training images, predicted as --tile and --tta say.")


def segmenter_options() -> dict:
  """The Segmenter's options from the flags of define_run_inference_flags, and the compiled model's folder
  (--threshold=train leaves the threshold at 0 for choose_threshold)."""
  f = flags.FLAGS
  return dict(tile=f.tile, tile_margin=f.tile_margin, blend=f.blend, tta=f.tta, threshold=threshold_flag() or 0.0,
              executables=executables_dir())


def threshold_flag() -> float | None:
  """--threshold as a logit, or None for 'train'."""
  value = flags.FLAGS.threshold
  if value == "train":
    return None
  try:
    threshold = float(value)
  except ValueError:
    threshold = float("nan")
  if not math.isfinite(threshold):
    raise app.UsageError(f"--threshold={value}: expected a logit (a finite number) or 'train'")
  return threshold


def choose_threshold(segmenter) -> None:
  """With --threshold=train, sets the segmenter's threshold to the one chosen on the run's training images
  (fcnjax.evaluation.calibrate_threshold) and prints it."""
  if threshold_flag() is not None:
    return
  segmenter.threshold, error = evaluation.calibrate_threshold(segmenter)
  print(f"threshold {segmenter.threshold:+.4f} (logit), chosen on the training images: pixel error {error:.4f} there")
