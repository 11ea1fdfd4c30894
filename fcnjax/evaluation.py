"""Evaluation: the jitted, data-parallel eval step over a dataset (used by training and by `fcnjax.evaluate`),
per-image evaluation with whole-image or overlap-tile inference, and prediction PNGs of validation images.

Scores are taken at each mask's original resolution: logits are resized bilinearly (as torchvision's reference
scripts do) before the argmax.
"""
from __future__ import annotations

import functools
import os
import time

import jax
import numpy as np
from absl import logging

from fcnjax import data, executable_cache, metrics, parallel, steps, visualize
from fcnjax.data import folder, sources, validate
from fcnjax.segmenter import Segmenter


def make_eval_step(model, info: data.DatasetInfo, mesh, executables=None) -> executable_cache.CachedJit:
  """jitted (replicated variables, sharded global batch) -> confusion matrix (num_scored_classes(info) square),
  replicated; kept in the folder `executables` if given (fcnjax.executable_cache)."""
  classes = num_scored_classes(info)
  return executable_cache.CachedJit(
      functools.partial(steps.eval_step, apply_fn=model.apply, num_classes=classes, ignore_index=info.ignore_index),
      f"fcnjax.steps.eval_step classes={classes} ignore_index={info.ignore_index} "
      f"model={executable_cache.describe_module(model)}", executables, out_shardings=parallel.replicated(mesh))


def num_scored_classes(info: data.DatasetInfo) -> int:
  """Binary data (one sigmoid logit) is scored as two classes, background and foreground."""
  return max(info.num_classes, 2)


def compile_eval_step(eval_step, variables, eval_data, batch_sharding) -> None:
  """Compiles the eval step for the eval set's batch shape now (a no-op for an empty set)."""
  example_batch = next(iter(eval_data), None)
  if example_batch is not None:
    eval_step.compile(variables, parallel.global_shapes(example_batch, batch_sharding))


def confusion_over(eval_step, variables, eval_data, batch_sharding, num_classes: int) -> np.ndarray:
  """The confusion matrix summed over the whole eval set (on device), returned on the host."""
  confusion = None
  for batch in eval_data:
    batch_confusion = eval_step(variables, parallel.to_global(batch, batch_sharding))
    confusion = batch_confusion if confusion is None else confusion + batch_confusion
  if confusion is None:
    return np.zeros((num_classes, num_classes), np.int64)
  return np.asarray(jax.device_get(confusion), np.int64)


def evaluate_batched(config, model, variables, executables=None) -> np.ndarray:
  """Confusion matrix of the validation split with the eval step that training uses, over every device (its
  executable kept in the folder `executables` if given)."""
  info = data.dataset_info(config.data)
  mesh = parallel.make_mesh()
  batch_sharding = parallel.batch_sharded(mesh)
  eval_data = data.build_eval_data(config.data, split="validation", batch_size=config.eval.batch_size,
                                   process_index=jax.process_index(), process_count=jax.process_count())
  eval_step = make_eval_step(model, info, mesh, executables)
  # As in training: every process ready before the first collective (replicate checks the variables agree), and
  # compiled before the first all-device one (see parallel.wait_for_all_processes).
  parallel.wait_for_all_processes("loaded")
  variables = parallel.replicate(variables, mesh)
  start = time.perf_counter()
  compile_eval_step(eval_step, variables, eval_data, batch_sharding)
  logging.info("eval step compiled in %.1f s", time.perf_counter() - start)
  parallel.wait_for_all_processes("compiled")
  return confusion_over(eval_step, variables, eval_data, batch_sharding, num_scored_classes(info))


def folder_examples(images_dir: str, masks_dir: str, data_config) -> folder.FolderPairs:
  """Every image in `images_dir` with its mask in `masks_dir` (same stem, or STEM_mask), read with the data
  config's label settings and checked as a training folder is (each bad file named). No split: all of them."""
  cfg = data.resolve(data_config)
  if not os.path.isdir(masks_dir):
    raise FileNotFoundError(f"{masks_dir}: no such folder (--masks)")
  pairs = [(image, data.find_mask(masks_dir, image)) for image in data.list_images(images_dir)]
  if not pairs:
    raise FileNotFoundError(f"{images_dir}: no images (--images)")
  spec = sources.label_spec(cfg)
  checked = validate.check_pairs(pairs, spec, on_bad_file=cfg.on_bad_file, what=f"{images_dir} with {masks_dir}")
  return folder.FolderPairs(checked.pairs, spec, checked=True, on_bad_file=cfg.on_bad_file)


def _readable_examples(examples, description: str, progress: bool = True):
  """The examples one by one under a progress bar, without those read in place of a file gone since the check
  (data.on_bad_file='skip'): each is scored under its own index."""
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  for i in tqdm(range(len(examples)), desc=description, unit="image", disable=not progress):
    example = examples[i]
    if example.get(folder.UNREADABLE, -1) < 0:
      yield example


def evaluate_per_image(segmenter: Segmenter, info: data.DatasetInfo, examples=None,
                       progress: bool = True) -> tuple[np.ndarray, dict]:
  """Per-image inference (whole or tiled) on the host over `examples` (the validation split by default): the
  confusion matrix and, for binary data, the challenge metrics (pixel error, foreground IoU / Dice, Rand error) over
  the whole stack. `progress` shows a progress bar over the images."""
  if examples is None:
    examples = sources.load_split(segmenter.data_config, "validation").examples
  num_classes = num_scored_classes(info)
  confusion = np.zeros((num_classes, num_classes), np.int64)
  predictions, truths = [], []
  for example in _readable_examples(examples, "evaluate", progress):
    prediction = segmenter.labels(example["image"])
    confusion += np.asarray(metrics.confusion_matrix(prediction[None], example["mask"][None].astype(np.int32),
                                                     num_classes, info.ignore_index), np.int64)
    if info.binary:
      predictions.append(prediction)
      truths.append(example["mask"])
  challenge = metrics.challenge_metrics(np.stack(predictions), np.stack(truths)) if info.binary else {}
  return confusion, challenge


def calibrate_threshold(segmenter: Segmenter, split: str = "train") -> tuple[float, float]:
  """(threshold, pixel error at it) on the `split` images of the segmenter's data config, predicted as the
  segmenter predicts (whole or tiled, TTA): the logit threshold of a one-logit binary model with the fewest wrong
  pixels there (metrics.best_binary_threshold). It holds one logit per pixel of the split in memory."""
  examples = sources.load_split(segmenter.data_config, split).examples
  logits, masks = [], []
  for example in _readable_examples(examples, f"threshold on {split}"):
    image_logits = segmenter.logits(example["image"])
    if image_logits.shape[-1] != 1:
      raise ValueError(f"calibrate_threshold: the model has {image_logits.shape[-1]} classes; a threshold is for "
                       "one-logit binary models")
    logits.append(image_logits.reshape(-1))
    masks.append(example["mask"].reshape(-1))
  if not logits:
    raise ValueError(f"calibrate_threshold: the {split} split of {segmenter.data_config.root or 'the data'} is empty")
  return metrics.best_binary_threshold(np.concatenate(logits), np.concatenate(masks),
                                       segmenter.data_config.ignore_index)


def write_validation_predictions(segmenter: Segmenter, out_dir: str, count: int) -> int:
  """PNGs (mask, overlay, image | prediction | ground truth) of the first `count` validation examples."""
  split = sources.load_split(segmenter.data_config, "validation")
  written = 0
  for i in range(min(count, len(split.examples))):
    example = split.examples[i]
    if example.get(folder.UNREADABLE, -1) >= 0:
      continue  # another image, read in place of a file gone since the check (data.on_bad_file='skip')
    name = split.examples.name(i) if hasattr(split.examples, "name") else f"{i:04d}"
    visualize.write_prediction(out_dir, os.path.splitext(os.path.basename(str(name)))[0], example["image"],
                               segmenter.labels(example["image"]), example["mask"],
                               segmenter.data_config.ignore_index)
    written += 1
  return written
