"""benchmarks/gpu.py, the one command for GPU measurements, in its shrunk CPU form (--smoke), so that it cannot rot
between the runs on machines with a GPU."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from benchmarks import gpu

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_gpu_script(*flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "benchmarks.gpu", *flags], cwd=ROOT, capture_output=True, text=True,
                        check=False, timeout=900)


def _check_smoke(out: pathlib.Path, done: subprocess.CompletedProcess, precisions, sizes) -> None:
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert "tests collected" in done.stdout  # the parity tests, collected
  runs = sorted(out.glob("unet_*.json"))
  assert [p.stem for p in runs] == sorted(f"unet_{precision}_{size}" for precision in precisions for size in sizes)
  for path in runs:
    result = json.loads(path.read_text())
    precision, size = path.stem.split("_")[1:]
    assert result["args"]["size"] == int(size)
    assert result["args"]["dtype"] == ("bfloat16" if precision == "bfloat16" else "float32")
    assert result["environment"]["precision"] == {"float32": "highest", "tf32": "tf32"}.get(precision, "default")
    assert {(r["mode"], r["framework"]) for r in result["results"]} == {
        (mode, framework) for mode in ("train", "infer") for framework in ("fcnjax", "torch")}
    # Past the first size, the batch is the largest whose train step XLA plans within the smoke's budget (the bytes
    # of batch 2): found by fcnjax.memory's search, not given.
    assert result["args"]["batch"] == gpu.SMALL_BATCH if int(size) == sizes[0] else gpu.SMOKE["batch"]
  table = (out / "summary.md").read_text().splitlines()
  assert len(table) == 2 + len(runs) * 2, table  # header, rule, a row per run and mode
  assert all(row.count("|") == table[0].count("|") for row in table)


def test_smoke_at_one_size_runs_the_parity_collection_and_compare_torch(tmp_path):
  done = run_gpu_script("--smoke", "--precisions", "tf32", "--sizes", "32", "--out", str(tmp_path))
  _check_smoke(tmp_path, done, ["tf32"], [32])


@pytest.mark.slow
def test_smoke_searches_the_largest_batch_and_tabulates_every_run(tmp_path):
  done = run_gpu_script("--smoke", "--precisions", "float32", "--out", str(tmp_path))
  _check_smoke(tmp_path, done, ["float32"], gpu.SMOKE["sizes"])


def test_without_a_gpu_it_says_so_in_one_line():
  done = run_gpu_script("--models", "unet", "--no_parity", "--out", "/nonexistent/never/written")
  assert done.returncode == 1
  assert done.stderr.strip().splitlines() == [
      "benchmarks.gpu: JAX runs on cpu, not a GPU; --smoke runs the CPU form"], done.stderr


def test_unknown_models_and_precisions_are_refused():
  with pytest.raises(SystemExit):
    gpu.parse_args(["--models", "unet,segformer"])
  with pytest.raises(SystemExit):
    gpu.parse_args(["--precisions", "fp8"])
  assert gpu.parse_args(["--models", "all"]).models == list(gpu.compare_torch.ALL_MODELS)
