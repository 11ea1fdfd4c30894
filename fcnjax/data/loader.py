"""Deterministic, sharded batches with grain.

The training stream is one global sequence of examples: the source shuffled afresh each epoch and repeated
forever (grain's shuffle folds the epoch into its seed), each position augmented with an RNG drawn from
(seed, position). Global batch k is positions [k * B, (k + 1) * B). Process p of P reads only the sub-batch
[k * B + p * B/P, k * B + (p + 1) * B/P) -- done as "batch by B/P, then take every P-th sub-batch from p" -- so
batch k depends only on (seed, k), the union of the P shards of batch k is the 1-process batch k, and
`iterator(k)` resumes exactly (a slice of the batch sequence, nothing replayed).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator

import grain
import numpy as np
from absl import flags, logging

from fcnjax.data import folder, sources, transforms
from fcnjax.data.config import resolve
from fcnjax.data.validate import BadFile

Batch = dict[str, np.ndarray]


def _local_batch_size(batch_size: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f"global batch size {batch_size} must be a positive multiple of process_count={process_count}")
  return batch_size // process_count


def _to_iter(ds: grain.MapDataset, cfg) -> grain.IterDataset:
  """The map dataset as an iterator source: read_threads prepare batches ahead in this process, and with
  cfg.workers > 0 grain's worker processes each take every workers-th batch (order, hence output, unchanged)."""
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_batches))
  if cfg.workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain 0.2.18 reads an absl flag when starting workers next to jax's profiler and fails outside absl.app
      # (google/grain#1355, fixed upstream by reading the default); outside an app the defaults are what we want.
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.workers,
                                                     per_worker_buffer_size=cfg.worker_buffer_size))
  return it


class _ApplyTransform:
  """RandomMap over the global stream (a class, not a lambda: grain workers unpickle it in a fresh process)."""

  def __init__(self, transform):
    self.transform = transform

  def __call__(self, example, rng):
    return _keep_unreadable(example, lambda e: self.transform(e, rng))


def _keep_unreadable(example: dict, transform) -> Batch:
  """transform(example) with the example's UNREADABLE mark carried through (the transforms know only the arrays)."""
  example = dict(example)
  unreadable = example.pop(folder.UNREADABLE, None)
  out = transform(example)
  if unreadable is not None:
    out[folder.UNREADABLE] = unreadable
  return out


def _count_unreadable(batches: Iterator[Batch], examples, skipped_files: list[BadFile]) -> Iterator[Batch]:
  """The batches without their UNREADABLE marks; each file they name is added to skipped_files once."""
  seen = {bad.path for bad in skipped_files}
  for batch in batches:
    codes = batch.pop(folder.UNREADABLE, None)
    if codes is not None:
      for code in np.unique(codes[codes >= 0]):
        path = examples.unreadable_path(int(code))
        if path not in seen:
          seen.add(path)
          skipped_files.append(BadFile(path, "unreadable during the run (data.on_bad_file='skip')"))
    yield batch


@dataclasses.dataclass
class TrainData:
  dataset: grain.MapDataset            # this process's batches, one per global step, infinite
  num_examples: int
  batch_size: int                      # global
  local_batch_size: int
  skipped_files: list[BadFile]         # at the check before the run, then each file found unreadable during it
  cfg: Any
  examples: Any = None

  @property
  def steps_per_epoch(self) -> int:
    return max(1, self.num_examples // self.batch_size)

  def iterator(self, start_step: int = 0) -> Iterator[Batch]:
    """This process's share of global batches start_step, start_step + 1, ...: {'image', 'mask'} (+ 'weight'
    with data.border_weight)."""
    if start_step < 0:
      raise ValueError(f"start_step={start_step} must be >= 0")
    return _count_unreadable(iter(_to_iter(self.dataset[start_step:], self.cfg)), self.examples, self.skipped_files)


def _train_crop(cfg, split: sources.Split) -> tuple[int, int]:
  if cfg.crop_size:
    return cfg.crop_size, cfg.crop_size
  if split.fixed_size is None:
    raise ValueError(f"data.crop_size=0 takes the native size of a fixed-size set, but source {cfg.source!r} has "
                     "images of different (or unknown) sizes; set data.crop_size")
  return split.fixed_size


def build_train_data(cfg, *, batch_size: int, seed: int, process_index: int = 0,
                     process_count: int = 1) -> TrainData:
  """The infinite, shuffled, augmented training stream; see the module docstring for its exact order."""
  cfg = resolve(cfg)
  local = _local_batch_size(batch_size, process_index, process_count)
  if not 0 <= seed < 2 ** 32:
    raise ValueError(f"seed={seed} must be in [0, 2**32) (grain's shuffle seed)")
  split = sources.load_split(cfg, "train")
  crop = _train_crop(cfg, split)
  if not 0 <= cfg.ignore_margin < min(crop) / 2:
    raise ValueError(f"data.ignore_margin={cfg.ignore_margin} must be at least 0 and leave some of the "
                     f"{crop[0]}x{crop[1]} training crop to train on")
  if cfg.rot90 and crop[0] != crop[1]:
    raise ValueError(f"data.rot90=True needs a square crop, got {crop[0]}x{crop[1]}; set data.crop_size")
  transform = transforms.TrainTransform(
      crop_size=crop, scale_range=tuple(cfg.scale_range), hflip=cfg.hflip, vflip=cfg.vflip, rot90=cfg.rot90,
      elastic=cfg.elastic, elastic_sigma=float(cfg.elastic_sigma), elastic_grid_points=int(cfg.elastic_grid_points),
      border_weight=cfg.border_weight, border_w0=float(cfg.border_w0), border_sigma=float(cfg.border_sigma),
      border_class_weights=tuple(float(w) for w in cfg.border_class_weights), ignore_margin=int(cfg.ignore_margin),
      mirror_padding=int(cfg.mirror_padding), mean=tuple(cfg.mean), std=tuple(cfg.std), ignore_index=cfg.ignore_index)
  ds = grain.MapDataset.source(split.examples).shuffle(seed=seed).repeat()
  ds = ds.random_map(_ApplyTransform(transform), seed=seed)
  ds = ds.batch(local, drop_remainder=True)[process_index::process_count]
  logging.info("train data: %d examples, global batch %d (%d on process %d of %d), %d skipped files",
               len(split.examples), batch_size, local, process_index, process_count, len(split.skipped_files))
  return TrainData(dataset=ds, num_examples=len(split.examples), batch_size=batch_size, local_batch_size=local,
                   skipped_files=split.skipped_files, cfg=cfg, examples=split.examples)


class _PaddedEval:
  """Eval examples followed by copies of example 0 marked invalid, up to a whole number of global batches."""

  def __init__(self, examples, length: int, transform: transforms.EvalTransform):
    self.examples, self.length, self.transform = examples, length, transform

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> Batch:
    valid = index < len(self.examples)
    example = self.examples[index if valid else 0]
    # An example read in place of an unreadable one is not scored: each image counts once, or not at all.
    replaced = int(example.get(folder.UNREADABLE, -1)) >= 0
    out = _keep_unreadable(example, lambda e: self.transform(e, valid=valid and not replaced))
    if not valid and folder.UNREADABLE in out:
      out[folder.UNREADABLE] = np.int32(-1)  # padding copies of example 0 are not a further file
    return out


@dataclasses.dataclass
class EvalData:
  dataset: grain.MapDataset            # this process's batches, finite
  num_examples: int                    # real examples, without padding
  num_batches: int                     # the same on every process
  eval_size: tuple[int, int] | None
  canvas: tuple[int, int]
  skipped_files: list[BadFile]
  cfg: Any
  examples: Any = None

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[Batch]:
    return _count_unreadable(iter(_to_iter(self.dataset, self.cfg)), self.examples, self.skipped_files)


def _eval_geometry(cfg, split: sources.Split) -> tuple[tuple[int, int] | None, tuple[int, int]]:
  """(image size or None for native, mask canvas)."""
  if cfg.eval_size:
    eval_size = (cfg.eval_size, cfg.eval_size)
  elif split.fixed_size is not None:
    eval_size = None
  else:
    raise ValueError(f"data.eval_size=0 keeps the native size of a fixed-size set, but source {cfg.source!r} has "
                     "images of different (or unknown) sizes; set data.eval_size")
  if cfg.eval_canvas:
    canvas = (cfg.eval_canvas, cfg.eval_canvas)
  elif split.max_size is not None:
    canvas = split.max_size
  else:
    # Sizes unknown without decoding every image (tfds): 512 holds Oxford-IIIT Pet's usual sizes (up to 500 on
    # the longer side); a larger mask is shrunk to fit, with a warning.
    canvas = (512, 512)
  return eval_size, canvas


def build_eval_data(cfg, *, split: str = "validation", batch_size: int, process_index: int = 0,
                    process_count: int = 1) -> EvalData:
  """Every example of `split` once, in order, padded to whole global batches ('valid' marks the real ones)."""
  cfg = resolve(cfg)
  local = _local_batch_size(batch_size, process_index, process_count)
  data = sources.load_split(cfg, split)
  eval_size, canvas = _eval_geometry(cfg, data)
  transform = transforms.EvalTransform(eval_size=eval_size, canvas=canvas, mean=tuple(cfg.mean), std=tuple(cfg.std),
                                       ignore_index=cfg.ignore_index)
  num_batches = math.ceil(len(data.examples) / batch_size)
  ds = grain.MapDataset.source(_PaddedEval(data.examples, num_batches * batch_size, transform))
  ds = ds.batch(local, drop_remainder=True)[process_index::process_count]
  return EvalData(dataset=ds, num_examples=len(data.examples), num_batches=num_batches, eval_size=eval_size,
                  canvas=canvas, skipped_files=data.skipped_files, cfg=cfg, examples=data.examples)
