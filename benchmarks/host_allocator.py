"""Steps with glibc's default allocator, with fcnjax.host_allocator.keep_freed_memory() and with transparent huge
pages (glibc's tunable HUGE_PAGES_TUNABLE, which a process reads as it starts), per model and framework.

  python -m benchmarks.host_allocator                                   # fcn_resnet50 and unet, train and inference
  python -m benchmarks.host_allocator --models fcn_resnet101,fcn8s --modes train --steps 12
  python -m benchmarks.host_allocator --settings "glibc default,huge pages" --compilation_cache /tmp/cache

The allocator is set once per process, before any thread allocates, so every (model, mode, framework, setting) runs
in a process of its own: fcnjax's jitted step (compare_torch's runners, batch 2, 224x224) or PyTorch eager's, on the
same threads. Each fcnjax run compiles its step, or with --compilation_cache loads it from the executable cache there as
a repeated command does (how fast a step then runs differs with the allocator setting). Reported per run: the
median seconds of a step after `--warmup` steps, the slowest step (a heap that grows faults its new pages in), page
faults per step (getrusage's minor faults), the process's peak RSS, and its first step (fcnjax: from nothing compiled
or loaded to the end of the first step, as compare_torch times it; torch: the first step alone).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from benchmarks import compare_torch, harness
from fcnjax import memory

# glibc's tunable (2.35 and later) that makes malloc ask the kernel to back its blocks of 2 MiB and more, and its
# heap, with transparent huge pages (madvise MADV_HUGEPAGE; the kernel must be in 'madvise' or 'always' mode).
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
# Each setting: (its name, whether the process calls keep_freed_memory(), whether it starts with huge pages).
SETTINGS = {"glibc default": (False, False), "keep_freed_memory": (True, False), "huge pages": (False, True),
            "keep_freed_memory + huge pages": (True, True)}
FRAMEWORKS = ("fcnjax", "torch")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--models", default="fcn_resnet50,unet", help=f"comma-separated subset of {compare_torch.ALL_MODELS}")
  p.add_argument("--modes", default="train,infer", help="comma-separated subset of train,infer")
  p.add_argument("--frameworks", default=",".join(FRAMEWORKS), help=f"comma-separated subset of {FRAMEWORKS}")
  p.add_argument("--settings", default="glibc default,keep_freed_memory",
                 help=f"comma-separated subset of {tuple(SETTINGS)}")
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=3, help="untimed steps first (the heap grows in the first ones)")
  p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all allowed cores)")
  p.add_argument("--compilation_cache", default="",
                 help="fcnjax's runs load their step from JAX's persistent cache in this folder, as a repeated "
                      "command does (a first run per model and mode fills it); default: each run compiles its own")
  p.add_argument("--run", default="", help=argparse.SUPPRESS)  # internal: one run, 'model:mode:framework:setting'
  args = p.parse_args(argv)
  choices = {"--models": (args.models, compare_torch.ALL_MODELS), "--modes": (args.modes, compare_torch.MODES),
             "--frameworks": (args.frameworks, FRAMEWORKS), "--settings": (args.settings, tuple(SETTINGS))}
  for flag, (chosen, known) in choices.items():
    unknown = [name for name in chosen.split(",") if name not in known]
    if unknown:
      p.error(f"{flag}: unknown {unknown}; expected some of {known}")
  return args


def run_one(spec: str, args) -> dict:
  """One run in this process: the allocator set first, then the model built and stepped."""
  name, mode, framework, setting = spec.split(":")
  keep, huge = SETTINGS[setting]
  if keep:
    from fcnjax import host_allocator  # pylint: disable=g-import-not-at-top
    if not host_allocator.keep_freed_memory():
      raise SystemExit("keep_freed_memory() needs glibc")
  if huge != (HUGE_PAGES_TUNABLE in _tunables(os.environ)):
    raise SystemExit(f"{setting}: the process started with GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
  threads = harness.pin_threads(args.threads)
  cli_args = compare_torch.parse_args(["--models", name])
  images, masks = compare_torch.make_batch(cli_args)
  if framework == "torch":
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    runner = compare_torch.TorchRunner(compare_torch.torch_model(name, cli_args.num_classes), mode, images, masks,
                                       "cpu", "float32", compiled=False, channels_last=False)
  else:
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from fcnjax import compilation_cache, executable_cache  # pylint: disable=g-import-not-at-top
    cache = compilation_cache.enable(args.compilation_cache)  # '' leaves it off
    model = compare_torch.fcnjax_model(name, cli_args.num_classes, "float32")
    variables = jax.tree.map(np.asarray, jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(
        images[:1]))
    runner = compare_torch.fcnjax_runner(model, mode, variables, images, masks, analyse=False,
                                         executables=executable_cache.directory_for(cache))
  first_step_s = runner.info.first_step_s if framework == "fcnjax" else runner(1)
  for _ in range(args.warmup):
    runner(1)
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  seconds = [runner(1) for _ in range(args.steps)]
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
  return {"model": name, "mode": mode, "framework": framework, "setting": setting,
          "first step s": first_step_s, "step s": statistics.median(seconds), "slowest s": max(seconds),
          "faults/step": faults / args.steps, "peak RSS GB": memory.peak_rss_bytes() / 1e9}


def _tunables(environ) -> list[str]:
  return [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]


def huge_pages_environment(environ, on: bool) -> dict[str, str]:
  """A copy of `environ` for a process to start with, whose GLIBC_TUNABLES asks for transparent huge pages (on) or
  not (off); other tunables are kept."""
  tunables = [t for t in _tunables(environ) if not t.startswith("glibc.malloc.hugetlb=")] + [HUGE_PAGES_TUNABLE] * on
  environment = {k: v for k, v in environ.items() if k != "GLIBC_TUNABLES"}
  if tunables:
    environment["GLIBC_TUNABLES"] = ":".join(tunables)
  return environment


def _run_child(spec: str, args, steps: int, warmup: int) -> dict:
  command = [sys.executable, "-m", "benchmarks.host_allocator", f"--run={spec}", f"--steps={steps}",
             f"--warmup={warmup}", f"--threads={args.threads}", f"--compilation_cache={args.compilation_cache}"]
  huge = SETTINGS[spec.split(":")[3]][1]
  environment = huge_pages_environment(os.environ, huge)
  result = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
  if result.returncode:
    raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.run:
    print(json.dumps(run_one(args.run, args)))
    return
  rows = []
  for name in args.models.split(","):
    for mode in args.modes.split(","):
      for framework in args.frameworks.split(","):
        if args.compilation_cache and framework == "fcnjax":
          _run_child(f"{name}:{mode}:{framework}:glibc default", args, steps=1, warmup=0)  # fills the cache
        for setting in args.settings.split(","):
          start = time.perf_counter()
          row = _run_child(f"{name}:{mode}:{framework}:{setting}", args, args.steps, args.warmup)
          rows.append(row)
          print(f"{name} {mode} {framework}, {row['setting']}: {row['step s']:.3f} s/step "
                f"({time.perf_counter() - start:.0f} s)", flush=True)
  formatted = [{**r, "first step s": f"{r['first step s']:.2f}", "step s": f"{r['step s']:.3f}",
                 "slowest s": f"{r['slowest s']:.2f}",
                "faults/step": f"{r['faults/step']:,.0f}", "peak RSS GB": f"{r['peak RSS GB']:.2f}"} for r in rows]
  print(harness.markdown_table(formatted, ["model", "mode", "framework", "setting", "first step s", "step s",
                                           "slowest s", "faults/step", "peak RSS GB"]))
  print(f"{os.cpu_count()} CPUs; {args.warmup} warm-up + {args.steps} timed steps, batch 2, 224x224, float32; fcnjax's "
        f"steps {'from the persistent cache' if args.compilation_cache else 'compiled in the process'}")


if __name__ == "__main__":
  main()
