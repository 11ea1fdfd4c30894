"""Many hosts, simulated on one machine: the training command run as 2 processes (2 CPU devices each) joined by
jax.distributed through a localhost coordinator, against 1 process with 4 devices.

Each process reads only its own half of every global batch, so the two runs see the same global batches and must
reach the same losses; only process 0 writes metrics; both processes write their part of each checkpoint.
"""
import json
import re
import shutil
import signal
import socket
import time

import numpy as np
import pytest

import reliability_helpers as h
from conftest import record_parity
from fcnjax import checkpoint, parallel

pytestmark = pytest.mark.slow  # training command-line runs

NUM_STEPS = 4
RUN = (f"--config.train.num_steps={NUM_STEPS}",)
SLOW_START = 40  # seconds


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _host(coordinator: str, process_id: int) -> dict[str, str]:
  """What makes a process one of 2 hosts (fcnjax.parallel.initialize_distributed reads it)."""
  return dict(JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process_id))


def test_two_processes_train_like_one(tmp_path):
  """Process 1 starts its model SLOW_START seconds after process 0 (a host slower to load or compile): on CPU,
  gloo gives up after 30 s on a peer that is late for a first collective, so the run must wait elsewhere."""
  one, two = tmp_path / "one_process", tmp_path / "two_processes"
  coordinator = f"127.0.0.1:{_free_port()}"
  hosts = [(h.train_command(two, *RUN, inject=f"slow_start:{SLOW_START}" if i else None),
            h.env(2, **_host(coordinator, i))) for i in range(2)]
  # The one-process reference runs meanwhile, on the core that the late process leaves idle.
  single, *processes = h.run_together((h.train_command(one, *RUN), h.env(4)), *hosts)
  assert single.returncode == 0, single.stderr[-3000:]
  for i, result in enumerate(processes):
    assert result.returncode == 0, f"process {i}:\n{result.stderr[-3000:]}"

  # Process 0 alone writes metrics: one record per step, as in the single-process run.
  losses_one = [r["loss"] for r in h.train_records(one)]
  losses_two = [r["loss"] for r in h.train_records(two)]
  assert [r["step"] for r in h.train_records(two)] == list(range(1, NUM_STEPS + 1))
  assert [r["kind"] for r in h.metrics(two)] == [r["kind"] for r in h.metrics(one)]
  # Gradients are summed over 4 devices either way, in another order across processes: float32 rounding only.
  record_parity("train: loss curve on 2 processes x 2 devices vs 1 x 4",
                float(np.max(np.abs(np.subtract(losses_two, losses_one)))), float(np.max(np.abs(losses_one))))
  np.testing.assert_allclose(losses_two, losses_one, rtol=1e-5)
  eval_one, eval_two = ([r for r in h.metrics(w) if r["kind"] == "eval"][-1] for w in (one, two))
  assert eval_two["miou"] == pytest.approx(eval_one["miou"], abs=1e-6)

  # The checkpoint was written by both processes (orbax's per-process OCDBT shards), and this one-device process
  # reads it as evaluate/predict do (checkpoints of 4 devices onto 1), finding the single-process run's parameters.
  state_dir = two / "checkpoints" / str(NUM_STEPS) / "state"
  assert (state_dir / "ocdbt.process_0").is_dir() and (state_dir / "ocdbt.process_1").is_dir()
  read = {}
  for name, workdir in (("one", one), ("two", two)):
    ckpts = checkpoint.Checkpoints(str(workdir))
    try:
      read[name], step = ckpts.restore_variables(checkpoint.model_record(h.get_config()), which="latest")
    finally:
      ckpts.close()
    assert step == NUM_STEPS
  diff = h.max_abs_diff(read["one"], read["two"])
  assert diff <= 1e-5, diff


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  """A preempted host gets SIGTERM, its peers do not: every process must save the same step and exit 143 (one that
  stopped alone would leave the other blocked in the next step's collectives)."""
  workdir = tmp_path / "run"
  coordinator = f"127.0.0.1:{_free_port()}"
  logs = [tmp_path / f"process{i}.log" for i in range(2)]
  processes = []
  try:
    for i, log in enumerate(logs):
      with open(log, "w") as out:
        processes.append(h.start_train(workdir, "--config.train.num_steps=40", log=out, num_devices=2,
                                       extra_env=_host(coordinator, i)))
    h.wait_for(lambda: len(h.train_records(workdir)) >= 2, processes[0])
    processes[1].send_signal(signal.SIGTERM)
    returncodes = [p.wait(timeout=120) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()
  outputs = [log.read_text() for log in logs]
  assert returncodes == [143, 143], [o[-2000:] for o in outputs]
  saved = [int(re.search(r"SIGTERM: saved a checkpoint at step (\d+)", o).group(1)) for o in outputs]
  assert saved[0] == saved[1] == h.train_records(workdir)[-1]["step"] < 40, saved
  assert int(h.step_dirs(workdir / "checkpoints")["complete"][-1]) == saved[0]



def _evaluate_command(workdir, *flags: str, inject: str | None = None) -> list[str]:
  return h.command("evaluate", f"--workdir={workdir}", "--checkpoint=latest", *flags, inject=inject)


def test_evaluate_on_two_processes_scores_like_one(tmp_path):
  """13 validation images in global batches of 4: the last batch holds one image and three padding copies, which on
  2 processes fall one on process 0 and two on process 1. The batched path (each process reads its half of each
  batch) and the per-image path (--tile: each process scores every image) must both give 1 process's metrics.

  The 2 processes' peer watches poll without pause, so that each process ends with its watch inside a call to JAX's
  client unless the watch is stopped before the interpreter finalises (else: std::terminate, exit -6)."""
  one, two = tmp_path / "one_process", tmp_path / "two_processes"
  result = h.run_train(one, "--config.train.num_steps=2", "--config.data.synthetic_val_examples=13",
                       "--config.eval.batch_size=4")
  assert result.returncode == 0, result.stderr[-3000:]
  shutil.copytree(one, two)  # each evaluation writes WORKDIR/evaluation.json
  trained = [r for r in h.metrics(one) if r["kind"] == "eval"][-1]
  scores = {}
  for mode, flags in (("batched", ()), ("per-image", ("--tile=16",))):
    coordinator = f"127.0.0.1:{_free_port()}"
    single, *processes = h.run_together(
        (_evaluate_command(one, *flags), h.env(1)),
        *[(_evaluate_command(two, *flags, inject="busy_peer_watch:0.0001"), h.env(2, **_host(coordinator, i)))
          for i in range(2)])
    for name, run in (("1 process", single), ("process 0", processes[0]), ("process 1", processes[1])):
      assert run.returncode == 0, f"{mode}, {name}:\n{run.stderr[-3000:]}"
    assert "mean IoU" in processes[0].stdout and "mean IoU" not in processes[1].stdout  # process 0 alone reports
    records = [json.loads((workdir / "evaluation.json").read_text()) for workdir in (one, two)]
    # Integer pixel counts summed in another order: the same confusion matrix, hence the same floats.
    assert records[1] == records[0], (mode, records)
    scores[mode] = records[0]
  # The batched path is the one training evaluates with, on the same images and checkpoint.
  assert scores["batched"]["miou"] == pytest.approx(trained["miou"], abs=1e-6)
  assert scores["per-image"]["tile"] == 16


PEER_TIMEOUT_S = 20


def _lines_without_gloo(output: str) -> list[str]:
  """The output's lines less gloo's '[Gloo] Rank r is connected to n peer ranks. Expected number of connected peer
  ranks is : n', which gloo prints at each context set-up. It writes the message in pieces, so two processes setting
  up at once interleave the pieces (and their numbers) anywhere: each piece is taken out, then the lines left with
  only numbers."""
  text = re.sub(r"\[Gloo\] Rank | is connected to | peer ranks\. |Expected number of connected peer ranks is : ", " ",
                output)
  return [line for line in text.splitlines() if line.strip() and not re.fullmatch(r"[\d\s]+", line)]


# A run of 8 steps with a checkpoint every 2 and an evaluation every 4, on 2 processes.
PHASES_RUN = ("--config.train.num_steps=8", "--config.train.checkpoint_every=2", "--config.train.eval_every=4")
# Each interrupted run: (the process killed, the process made to hang, where it hangs, the survivor's phase then).
# The fourth loses process 0, which runs jax.distributed's coordination service: JAX's client in process 1 logs that
# and aborts, and fcnjax.parallel turns the abort into the run's line, unless a broken collective says it first.
PHASES = [(1, 1, "hang_at_batch:3,", "a train step"),
          (1, 0, "hang_before_rename:checkpoints/6,", "a checkpoint save in flight"),
          (1, 1, "hang_at_eval_batch:1,", "an evaluation"),
          (0, 0, "hang_at_batch:1,", "a train step, process 0 lost"),
          (1, 1, "hang_after_training:", "the shutdown")]
_PROGRESS = re.compile(r"step \d+: mIoU ")
_SUMMARY = re.compile(r"^\{\n(?:  .*\n)*\}\n", re.MULTILINE)


def _run_killed(workdir, tmp_path, victim: int, phase: str, ready, watched: int, run_args=(), injections=(None, None),
                poll: float = 0.005) -> tuple[str, float]:
  """The 2-process run (`injections`: each process's fault or None); kill -9 of process `victim` once ready() holds
  (watching process `watched` meanwhile). Asserts that the survivor exits 75 (EXIT_PEER_LOST); returns its output
  and how long it took to exit after the kill."""
  logs = [tmp_path / f"{phase}, process {i}.log" for i in range(2)]
  coordinator = f"127.0.0.1:{_free_port()}"
  processes = []
  try:
    for i, log in enumerate(logs):
      env = dict(_host(coordinator, i), FCNJAX_PEER_TIMEOUT_S=str(PEER_TIMEOUT_S))
      with open(log, "w") as out:
        processes.append(h.start_train(workdir, *run_args, log=out, num_devices=2, inject=injections[i],
                                       extra_env=env))
    h.wait_for(ready, processes[watched], poll=poll)
    processes[victim].kill()
    killed = time.monotonic()
    returncode = processes[1 - victim].wait(timeout=PEER_TIMEOUT_S + 60)
    took = time.monotonic() - killed
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()
  output = logs[1 - victim].read_text()
  assert returncode == parallel.EXIT_PEER_LOST, f"{phase}: exit {returncode}\n{output[-3000:]}"
  return output, took


def _run_killed_in_phase(workdir, tmp_path, victim: int, hanging: int, fault: str, phase: str) -> tuple[str, float]:
  """The run of PHASES_RUN with `fault` in process `hanging`; kill -9 of process `victim` once that one hangs."""
  hangs = tmp_path / f"hangs in {phase}"
  injections = [f"{fault}{hangs}" if i == hanging else None for i in range(2)]
  return _run_killed(workdir, tmp_path, victim, phase, hangs.exists, hanging, PHASES_RUN, injections)


def test_a_process_lost_in_each_phase_ends_the_other_and_the_reruns_finish_as_one_run(tmp_path):
  """kill -9 of process 1 while it hangs in a train step, while process 0 has a checkpoint save in flight (it hangs
  before committing step 6) and while process 1 hangs in an evaluation, then of process 0 in a train step, and of
  process 1 once the run is over, before it exits, each time followed by the same command on both processes. Each
  time the survivor exits 75 (EXIT_PEER_LOST) with one line naming the lost process and saying how to resume, within
  the peer timeout (sooner when its collective's connection breaks first, which gloo does not always notice, or when
  process 0 is lost); no unfinished step is taken for a finished one; the run that finally finishes has the
  parameters of a 2-process run that was never interrupted."""
  workdir, reference = tmp_path / "interrupted", tmp_path / "uninterrupted"
  timings = {}
  uninterrupted = None
  with open(tmp_path / "uninterrupted.log", "w") as reference_log:
    try:
      for victim, hanging, fault, phase in PHASES:
        output, took = _run_killed_in_phase(workdir, tmp_path, victim, hanging, fault, phase)
        if uninterrupted is None:  # started once the first run has filled the compilation cache; CI has 2 cores
          coordinator = f"127.0.0.1:{_free_port()}"
          uninterrupted = [h.start_train(reference, *PHASES_RUN, log=reference_log, num_devices=2,
                                         extra_env=_host(coordinator, i)) for i in range(2)]
        # Less what a run prints as it goes: process 0's evaluation lines and, at its end, the summary (JSON).
        normal = _SUMMARY.sub("", output)
        lines = [line for line in _lines_without_gloo(normal) if not _PROGRESS.match(line)]
        if victim == 0 and "Traceback" not in output and "Fatal Python error" not in output:
          lines = lines[-1:]  # after what JAX's client logs as it loses the service (C++ log lines, its stack)
        assert len(lines) == 1, f"{phase}:\n{output[-3000:]}"
        assert re.match(f"PeerLostError: process {victim} of 2(, which runs the coordination service,)? was lost",
                        lines[0]), f"{phase}: {lines[0]}"
        assert "start every process again with the same command" in lines[0], lines[0]
        assert took < PEER_TIMEOUT_S + 10, (phase, took)
        timings[phase] = took
        checkpoints = h.step_dirs(workdir / "checkpoints")
        if phase != "the shutdown":
          assert all(int(step) < 8 for step in checkpoints["complete"]), (phase, checkpoints)
        if "save" in phase:  # step 6 was written but not committed: it must not count as finished
          assert checkpoints["complete"][-1] == "4" and any(n.startswith("6.") for n in checkpoints["partial"])
      print("survivor exited after the kill:", {phase: f"{took:.1f} s" for phase, took in timings.items()})

      coordinator = f"127.0.0.1:{_free_port()}"
      results = h.run_together(*[(h.train_command(workdir, *PHASES_RUN), h.env(2, **_host(coordinator, i)))
                                 for i in range(2)])
      for i, result in enumerate(results):
        assert result.returncode == 0, f"process {i}:\n{result.stderr[-3000:]}"
      assert [p.wait(timeout=h.TIMEOUT) for p in uninterrupted] == [0, 0], \
          (tmp_path / "uninterrupted.log").read_text()[-3000:]
    finally:
      for p in uninterrupted or ():
        if p.poll() is None:
          p.kill()
          p.wait()
  assert h.step_dirs(workdir / "checkpoints")["partial"] == []  # the unfinished step removed by a restart
  diff = h.max_abs_diff(h.params_of(reference / "checkpoints", 8), h.params_of(workdir / "checkpoints", 8))
  assert diff <= 1e-6, f"resumed run differs from the uninterrupted run by {diff}"


def test_a_process_killed_at_start_up_ends_the_other_within_the_peer_timeout(tmp_path):
  """kill -9 of process 1 once process 0 has joined the run (its workdir made), while both load data, compile and wait
  at the start-up barriers: no collective fails, so process 0 learns of the loss from the peer watch, after
  FCNJAX_PEER_TIMEOUT_S without a sign of life, and exits 75 with one line naming process 1."""
  workdir = tmp_path / "run"
  output, took = _run_killed(workdir, tmp_path, 1, "start-up", workdir.is_dir, watched=0, poll=0.05)
  lines = _lines_without_gloo(output)
  assert len(lines) == 1, output[-3000:]
  assert lines[0].startswith("PeerLostError: process 1 of 2 was lost (no sign of life for"), lines[0]
  assert PEER_TIMEOUT_S - 2 < took < PEER_TIMEOUT_S + 15, took
  print(f"process 0 exited {took:.1f} s after process 1 was killed")
