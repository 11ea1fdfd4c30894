"""Data parallelism through jax.sharding: one mesh axis 'data' over every device of every host.

Parameters and optimiser state are replicated; each batch is sharded on its leading axis. jit partitions the step
from these shardings, so the same code runs on 1 CPU, 8 fake CPU devices, one GPU host or many hosts.
"""
from __future__ import annotations

import os
import re
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


# How long a process may go without a heartbeat before the coordination service declares it lost and ends the others
# (JAX's default, 100 s); FCNJAX_PEER_TIMEOUT_S sets another.
PEER_TIMEOUT_S = 100
# Exit status of a process that stops because another one was lost: EX_TEMPFAIL, "try again" (the run resumes).
EXIT_PEER_LOST = 75


def peer_timeout_s() -> int:
  value = os.environ.get("FCNJAX_PEER_TIMEOUT_S", str(PEER_TIMEOUT_S))
  if not value.isdigit() or int(value) < 1:
    raise ValueError(f"FCNJAX_PEER_TIMEOUT_S={value!r}; expected a whole number of seconds >= 1")
  return int(value)


def initialize_distributed() -> None:
  """Calls jax.distributed.initialize when launched as one of several processes.

  On TPU pods, SLURM and Open MPI, JAX finds the coordinator by itself; elsewhere set JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES and JAX_PROCESS_ID (see the README). A single process needs nothing.

  A process that shows no sign of life for peer_timeout_s() (killed, its host gone) is taken for lost: the others
  stop with one line naming it (_watch_peers), and a collective that fails because of it does the same
  (is_peer_lost, used by cli.run).
  """
  env = os.environ
  # The service's own timeout is longer than the watch's: when it expires JAX's client aborts the process.
  timeouts = dict(heartbeat_timeout_seconds=peer_timeout_s() + SERVICE_TIMEOUT_MARGIN_S)
  if "JAX_COORDINATOR_ADDRESS" in env:
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(env["JAX_NUM_PROCESSES"]),
                               process_id=int(env["JAX_PROCESS_ID"]), **timeouts)
  elif any(k in env for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")):
    if int(env.get("SLURM_NTASKS", env.get("OMPI_COMM_WORLD_SIZE", "2"))) > 1:
      jax.distributed.initialize(**timeouts)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  if jax.process_count() > 1:
    _watch_peers(peer_timeout_s())
    if jax.process_index() != 0:
      _stop_cleanly_when_the_service_is_lost()


# The coordination service declares a silent process dead this much later than the watch of _watch_peers does.
SERVICE_TIMEOUT_MARGIN_S = 30
_WATCH_INTERVAL_S = 1.0


def _watch_peers(timeout_s: float) -> None:
  """Ends this process with one line when another one shows no sign of life for `timeout_s`, whatever this one is
  doing (a collective, a barrier, a checkpoint save, the start-up, its shutdown).

  Each process counts up its own key in the coordination service's key-value store every second and reads the
  others'. JAX's own heartbeat timeout ends the survivors too, but by aborting them from its client (SIGABRT and a
  page of logs): its missed-heartbeat callback cannot be set from Python (jaxlib 0.10.2 has no conversion for the
  status it passes, std::bad_cast). A process that exits normally marks itself done first, so that a peer still
  finishing (process 0 writing plots) does not take it for lost, then waits for the others' marks, and then stops
  the watch before the interpreter finalises: a daemon thread that is inside a call to JAX's client then is ended by
  the interpreter with a forced unwind through C++ frames, and std::terminate aborts the finished process.
  """
  import atexit  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  me, count = jax.process_index(), jax.process_count()
  exiting, stopped = threading.Event(), threading.Event()

  def mark_done():  # runs before JAX's own exit handler (registered earlier), which stops the service
    exiting.set()
    try:
      client.key_value_set(f"fcnjax/done/{me}", "1", allow_overwrite=True)
      # JAX's exit handler then waits for every process at the service's shutdown barrier, holding the GIL: the
      # watch could not end this process there. So wait here, watched, until every other process is done too.
      while not all(_try_get(client, f"fcnjax/done/{peer}") for peer in range(count) if peer != me):
        time.sleep(_WATCH_INTERVAL_S / 4)
    except Exception:  # pylint: disable=broad-except
      pass  # the service is gone with process 0: no one is left to tell or wait for
    finally:
      stopped.set()
      watcher.join()  # at most one call to the client: it fails at once when the service is gone

  atexit.register(mark_done)

  def watch():
    beat, seen = 0, {}
    while not stopped.is_set():  # also while this process waits for its peers to be done
      now = time.monotonic()
      try:
        beat += 1
        client.key_value_set(f"fcnjax/alive/{me}", str(beat), allow_overwrite=True)
        for peer in range(count):
          if peer == me:
            continue
          value = _try_get(client, f"fcnjax/alive/{peer}")
          if _try_get(client, f"fcnjax/done/{peer}"):
            seen[peer] = (value, float("inf"))
          elif peer not in seen or seen[peer][0] != value:
            seen[peer] = (value, now)
          elif now - seen[peer][1] > timeout_s:
            _stop(f"process {peer} of {count} was lost (no sign of life for {timeout_s:.0f} s, "
                  "FCNJAX_PEER_TIMEOUT_S)")
      except Exception as e:  # pylint: disable=broad-except
        if exiting.is_set():  # process 0 exits last of all, taking the service with it
          return
        # The service is out of reach: process 0, which runs it, is gone (JAX's client aborts this process too).
        _stop(f"process 0 of {count}, which runs the coordination service, was lost "
              f"({' '.join(str(e).split())[:120]})")
      stopped.wait(_WATCH_INTERVAL_S)

  watcher = threading.Thread(target=watch, name="fcnjax-peer-watch", daemon=True)
  watcher.start()


# The SIGABRT handler of _stop_cleanly_when_the_service_is_lost, kept alive as long as it is installed.
_ABORT_HANDLER: list = []


def _stop_cleanly_when_the_service_is_lost() -> None:
  """Turns JAX's abort of this process, when the coordination service is gone, into the run's one line and
  EXIT_PEER_LOST.

  The service runs in process 0. When process 0 is lost, JAX's client in every other process ends it at once from
  its error-polling thread: a fatal log line and abort(), which Python's fault handler turns into pages of
  tracebacks (exit -6); the client's handler cannot be replaced from Python (see _watch_peers). This SIGABRT
  handler, installed through the C library, checks whether the service's address still accepts a connection: if it
  does not, it prints the PeerLostError line and exits 75; any other abort goes on as before (the fault handler's
  tracebacks, then the abort).
  """
  import ctypes  # pylint: disable=g-import-not-at-top
  import faulthandler  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  host, _, port = distributed.global_state.coordinator_address.rpartition(":")
  who = f"process 0 of {jax.process_count()}, which runs the coordination service, was lost"
  line = f"PeerLostError: {_lost_message(who)}\n".encode()

  def on_abort(signum):
    del signum
    try:
      socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
    except OSError:  # refused or unreachable: the service is gone
      sys.stdout.flush()
      os.write(2, line)
      os._exit(EXIT_PEER_LOST)  # pylint: disable=protected-access
    # Another cause: SIGABRT's default action first (an abort() from this handler would call it again, and again,
    # until the stack overflows), then the fault handler's tracebacks and the abort.
    libc.signal(signal.SIGABRT, handler_type(0))  # SIG_DFL
    faulthandler.enable()
    os.abort()

  libc = ctypes.CDLL(None, use_errno=True)
  handler_type = ctypes.CFUNCTYPE(None, ctypes.c_int)
  libc.signal.argtypes = [ctypes.c_int, handler_type]
  libc.signal.restype = ctypes.c_void_p
  handler = handler_type(on_abort)
  _ABORT_HANDLER[:] = [handler]
  libc.signal(signal.SIGABRT, handler)


def _try_get(client, key: str) -> str | None:
  try:
    return client.key_value_try_get(key)
  except Exception as e:  # pylint: disable=broad-except
    if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
      return None
    raise


def _lost_message(who: str) -> str:
  """What every surviving process says when `who` (which process, and why it is taken for lost) is gone."""
  return (f"{who}; process {jax.process_index()} stops too. The last finished checkpoint is intact: start every "
          "process again with the same command to resume from it.")


def _stop(who: str) -> None:
  import sys  # pylint: disable=g-import-not-at-top
  print(f"PeerLostError: {_lost_message(who)}", file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(EXIT_PEER_LOST)  # pylint: disable=protected-access


# What a collective or a barrier of the coordination service raises when another process is gone: gloo's TCP
# connection to it breaks (CPU), the service reports its missing heartbeats, or the service itself is gone with
# process 0.
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "heartbeat timeout",
              "Failed to send RPC to coordination service",
              "stopped sending heartbeats", "task is set to ERROR", "Gloo context initialization failed")
_TASK = re.compile(r"\b[Tt]ask[ :](\d+)\b|/task:(\d+)")


class PeerLostError(RuntimeError):
  """Another process of the run is gone; this one stops too, and the run resumes from its last finished checkpoint."""


def is_peer_lost(error: BaseException) -> bool:
  """True for an error that means another process of a multi-process run is gone."""
  # is_initialized first: jax.process_count() would start the backend for an error raised before it was needed.
  if not jax.distributed.is_initialized() or jax.process_count() == 1:
    return False
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, PeerLostError) or any(text in str(error) for text in _PEER_LOST):
      return True
    error = error.__cause__ or error.__context__
  return False


def peer_lost_error(error: BaseException) -> PeerLostError:
  """The one-line PeerLostError for an error that is_peer_lost: which process, and how to resume."""
  text = str(error)
  lost = sorted({int(a or b) for a, b in _TASK.findall(text)} - {jax.process_index()})
  if not lost and jax.process_count() == 2:  # gloo names the peer's address, not its process; of 2 it is the other
    lost = [1 - jax.process_index()]
  if lost:
    who = f"process {', '.join(map(str, lost))} of {jax.process_count()} was lost"
  else:
    who = f"another of the {jax.process_count()} processes was lost ({' '.join(text.split())[:160]})"
  return PeerLostError(_lost_message(who))


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch_size: int, what: str = "train.batch_size") -> None:
  devices, processes = jax.device_count(), jax.process_count()
  if global_batch_size % devices:
    raise ValueError(f"{what}={global_batch_size} must be divisible by the number of devices ({devices}); "
                     f"use a multiple of {devices}")
  if global_batch_size % processes:
    raise ValueError(f"{what}={global_batch_size} must be divisible by the number of processes ({processes})")


def max_over_processes(value: int) -> int:
  """The largest of every process's `value`, on every process; each process must call it at the same point.

  A blocking all-gather over hosts: the training loop calls it once per step only when there are several processes.
  """
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int32))))


# How long a process waits at a start-up barrier for the slowest one (its data, model init and compilation).
STARTUP_TIMEOUT_S = 30 * 60


def wait_for_all_processes(name: str, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
  """Returns once every process has called it with `name` (each name once per run); nothing with one process.

  Called just before a group of devices is first used by a collective. On CPU, JAX's cross-process collectives
  (gloo) connect the devices of each group at its first collective and give up after a fixed 30 s if a peer has
  not arrived yet; one host that loads or compiles more slowly than that fails the run. This barrier goes through
  the coordination service of jax.distributed instead (orbax's thread-safe barrier), which waits as long as asked.
  """
  if jax.process_count() == 1:
    return
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ocp.multihost.get_barrier_sync_fn()(key=f"fcnjax:{name}", timeout_ms=int(timeout_s * 1000))


def to_global(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's share of a batch into global arrays sharded over the mesh."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def global_shapes(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.ShapeDtypeStruct]:
  """The shapes to_global gives this batch (every process's share stacked), for compiling ahead without data."""
  return {k: jax.ShapeDtypeStruct((v.shape[0] * jax.process_count(), *v.shape[1:]), v.dtype, sharding=sharding)
          for k, v in local_batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  """`tree` on every device of the mesh. With several processes it goes through the host: JAX refuses to copy an
  array committed to one process's device (a restored checkpoint) onto other processes' devices on CPU and GPU
  ("does not support cross-host device transfers"), while from host values it places each process's own copy and
  checks that every process passed the same values."""
  if jax.process_count() > 1:
    tree = jax.device_get(tree)
  return jax.device_put(tree, replicated(mesh))
