"""Throughput of fcnjax's data pipeline alone, and how long a training loop waits for it.

  python -m benchmarks.data_loader                             # 200 Pet-like JPEGs, crop 320, workers 0, 1, 2
  python -m benchmarks.data_loader --loop_model none           # the pipeline only
  python -m benchmarks.data_loader --num_images 40 --batches 4 --loop_model none   # a quick check of the script

The script writes a folder in the raw Oxford-IIIT Pet layout (images/*.jpg of 500x375 by default, the usual Pet
size; annotations/trimaps/*.png; annotations/trainval.txt and test.txt) to a temporary directory, and reads it with
fcnjax.data.build_train_data(source='folder', layout='pet') and the Pet augmentation of experiments/pet_fcn8s.py:
random scale in [0.5, 2], random 320x320 crop, horizontal flip, ImageNet normalisation.

1. Pipeline: images/s per worker count (data.workers; 0 = in this process with data.read_threads threads), over
   --batches batches in the steady state: the first batch (worker start-up included; reported apart) and the
   batches the prefetch buffers filled up with meanwhile are not timed. Worker counts take turns over --rounds
   rounds.
2. Loop: a short training run of --loop_model on these batches, like fcnjax.train's loop, except that each step is
   waited for. Per step, `wait` is the time in next(batches) plus the host-to-device copy while the device has
   nothing to do, `step` the time of the step itself. Because the step is waited for, wait is an upper bound on the
   device's idle time (train.py dispatches the next step before reading the previous one's metrics). The same steps
   on one batch held in memory give the step time without the pipeline: on a CPU both share the cores, so the
   difference is what loading costs the step.
"""
from __future__ import annotations

import argparse
import functools
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

if __package__ in (None, ""):  # run as a file (python benchmarks/data_loader.py): make `benchmarks` importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402 pylint: disable=g-import-not-at-top


def write_pet_folder(root: str, num_images: int, width: int, height: int, seed: int = 0) -> None:
  """num_images JPEG photos (smooth colour fields with texture) and trimaps (an elliptical pet with a border)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "images"))
  os.makedirs(os.path.join(root, "annotations", "trimaps"))
  yy, xx = np.mgrid[0:height, 0:width]
  names = []
  for i in range(num_images):
    name = f"Pet_{i:04d}"
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
    image += rng.normal(0, 12, image.shape)  # texture, so that JPEG decoding does the work of a real photo
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(os.path.join(root, "images", f"{name}.jpg"),
                                                                    quality=90)
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    ry, rx = rng.uniform(0.2, 0.4) * height, rng.uniform(0.2, 0.4) * width
    r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    trimap = np.where(r < 0.85, 1, np.where(r < 1.15, 3, 2)).astype(np.uint8)  # 1 pet, 3 border, 2 background
    Image.fromarray(trimap).save(os.path.join(root, "annotations", "trimaps", f"{name}.png"))
    names.append(name)
  split = max(1, num_images // 10)
  for list_name, subset in (("trainval.txt", names[split:]), ("test.txt", names[:split])):
    with open(os.path.join(root, "annotations", list_name), "w") as f:
      f.writelines(f"{n} 1 1 1\n" for n in subset)


def data_config(args, workers: int):
  from fcnjax import data  # pylint: disable=g-import-not-at-top
  cfg = data.default_config()
  cfg.source = "folder"
  cfg.root = args.root
  cfg.layout = "pet"
  cfg.pet_border = "class"
  cfg.crop_size = args.crop
  cfg.scale_range = tuple(args.scale)
  cfg.hflip = True
  cfg.validate = False  # the check pass decodes every file once; it is not part of the steady-state rate
  cfg.workers = workers
  cfg.read_threads = args.read_threads
  return cfg


def _close(iterator) -> None:
  close = getattr(iterator, "close", None)
  if close is not None:
    close()
  del iterator
  gc.collect()


def time_pipeline(args, workers: int) -> tuple[float, float]:
  """(seconds to the first batch, images/s over args.batches batches in the steady state).

  While the first batch is awaited (worker start-up), the prefetch buffers fill; the batches they hold are drained
  untimed, so that the timed batches are produced while they are asked for.
  """
  from fcnjax import data  # pylint: disable=g-import-not-at-top
  cfg = data_config(args, workers)
  train = data.build_train_data(cfg, batch_size=args.batch, seed=0)
  start = time.perf_counter()
  iterator = train.iterator(0)
  next(iterator)
  first = time.perf_counter() - start
  for _ in range(cfg.prefetch_batches + workers * cfg.worker_buffer_size + 2):
    next(iterator)
  start = time.perf_counter()
  for _ in range(args.batches):
    next(iterator)
  rate = args.batches * args.batch / (time.perf_counter() - start)
  _close(iterator)
  return first, rate


def pipeline_section(args, log) -> list[dict]:
  rates = {w: [] for w in args.workers}
  firsts = {w: [] for w in args.workers}
  for r in range(args.rounds):
    for w in (args.workers if r % 2 == 0 else args.workers[::-1]):
      first, rate = time_pipeline(args, w)
      firsts[w].append(first)
      rates[w].append(rate)
      log(f"  round {r + 1}: workers={w}: first batch {first:.2f} s, {rate:.1f} img/s")
  return [{"workers": w, "img_per_s": harness.Spread.of(rates[w]).__dict__,
           "first_batch_s": statistics.median(firsts[w])} for w in args.workers]


def loop_section(args, log) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from fcnjax import data, steps  # pylint: disable=g-import-not-at-top
  from benchmarks.compare_torch import FcnjaxTrain, fcnjax_model  # pylint: disable=g-import-not-at-top
  cfg = data_config(args, args.loop_workers)
  num_classes = data.dataset_info(cfg).num_classes
  train = data.build_train_data(cfg, batch_size=args.loop_batch, seed=0)
  iterator = train.iterator(0)
  held = next(iterator)
  model = fcnjax_model(args.loop_model, num_classes, "float32")
  variables = steps.init_variables(model, jax.random.PRNGKey(0), held["image"].shape[1:])
  log(f"loop: compiling {args.loop_model} for batch {held['image'].shape}")
  runner = FcnjaxTrain(model, variables, held["image"], held["mask"])
  runner(1)
  in_memory = [runner(1) for _ in range(args.loop_steps)]  # the pipeline's buffers are full by now: it idles
  waits, step_times = [], []
  for _ in range(args.loop_steps):
    start = time.perf_counter()
    batch = jax.device_put(next(iterator))
    jax.block_until_ready(batch)
    loaded = time.perf_counter()
    runner.batch = batch
    runner(1)
    waits.append(loaded - start)
    step_times.append(time.perf_counter() - loaded)
  _close(iterator)
  total = sum(waits) + sum(step_times)
  result = {"model": args.loop_model, "batch": args.loop_batch, "workers": args.loop_workers,
            "steps": args.loop_steps, "wait_s": harness.Spread.of(waits).__dict__,
            "step_s": harness.Spread.of(step_times).__dict__, "step_in_memory_s": harness.Spread.of(in_memory).__dict__,
            "idle_fraction": sum(waits) / total}
  log(f"loop: wait {statistics.median(waits):.3f} s, step {statistics.median(step_times):.2f} s "
      f"(in memory {statistics.median(in_memory):.2f} s), idle {100 * result['idle_fraction']:.1f}%")
  return result


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--num_images", type=int, default=200)
  p.add_argument("--image_size", default="500x375", help="width x height of the generated JPEGs")
  p.add_argument("--crop", type=int, default=320)
  p.add_argument("--scale", type=float, nargs=2, default=(0.5, 2.0))
  p.add_argument("--batch", type=int, default=8, help="batch size of the pipeline measurement")
  p.add_argument("--batches", type=int, default=15, help="timed batches per worker count and round")
  p.add_argument("--workers", default="0,1,2")
  p.add_argument("--read_threads", type=int, default=2, help="data.read_threads")
  p.add_argument("--rounds", type=int, default=2)
  # fcn_resnet50 has the fastest CPU train step per image of the three models: the hardest for the loader to feed.
  p.add_argument("--loop_model", default="fcn_resnet50", help="fcnjax model for the loop section, or 'none'")
  p.add_argument("--loop_batch", type=int, default=2)
  p.add_argument("--loop_steps", type=int, default=4)
  p.add_argument("--loop_workers", type=int, default=2)
  p.add_argument("--threads", type=int, default=0)
  p.add_argument("--root", default="", help="use (or keep) this folder instead of a temporary one")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  args.workers = [int(w) for w in args.workers.split(",") if w]
  width, height = (int(v) for v in args.image_size.lower().split("x"))
  threads = harness.pin_threads(args.threads)
  log = functools.partial(print, flush=True)
  temporary = not args.root
  if temporary:
    args.root = tempfile.mkdtemp(prefix="fcnjax_pet_")
  start = time.perf_counter()
  try:
    if not os.path.isdir(os.path.join(args.root, "images")):
      write_pet_folder(args.root, args.num_images, width, height)
      log(f"wrote {args.num_images} {width}x{height} JPEGs + trimaps to {args.root} "
          f"({time.perf_counter() - start:.0f} s)")
    pipeline = pipeline_section(args, log)
    loop = loop_section(args, log) if args.loop_model != "none" else None
  finally:
    if temporary:
      shutil.rmtree(args.root, ignore_errors=True)
  rows = [{"workers": r["workers"], "img/s median (min-max)": harness.Spread(**r["img_per_s"]).short("{:.1f}"),
           "first batch s": f"{r['first_batch_s']:.2f}"} for r in pipeline]
  log(f"\npipeline: {width}x{height} JPEGs, scale {tuple(args.scale)}, crop {args.crop}, flip, normalise; batch "
      f"{args.batch}, {args.read_threads} read threads, {threads} cores, {time.perf_counter() - start:.0f} s in all")
  log(harness.markdown_table(rows, ["workers", "img/s median (min-max)", "first batch s"]))
  if loop:
    log(f"\nloop ({loop['model']}, batch {loop['batch']}, workers {loop['workers']}): per step median wait "
        f"{loop['wait_s']['median']:.3f} s, step {loop['step_s']['median']:.2f} s, step on an in-memory batch "
        f"{loop['step_in_memory_s']['median']:.2f} s; device idle {100 * loop['idle_fraction']:.1f}% of the loop")
  if args.out:
    harness.write_json(args.out, {"args": vars(args), "pipeline": pipeline, "loop": loop})


if __name__ == "__main__":
  main()
