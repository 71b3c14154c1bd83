"""Starting JAX's distributed runtime for every way a multi-process job is launched.

Every command that runs a model calls `initialize()` before it touches a device. It starts
`jax.distributed` exactly when this process is one of several:

  plain launch    JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i (any multi-node GPU job
                  without a scheduler jax knows; `python -m clipvip_jax.launch_local` sets these)
  SLURM           srun with more than one task (SLURM_NTASKS > 1)
  Open MPI        mpirun -n N (OMPI_COMM_WORLD_SIZE > 1)
  Cloud TPU       a pod slice of several hosts (TPU_WORKER_HOSTNAMES lists several, or jax's own TPU detection)
  Kubernetes      an indexed Job / JobSet (jax's own K8s detection; needs the `kubernetes` package)

For the scheduler cases jax's cluster detection fills in the coordinator, the process count and the id; an
explicit JAX_NUM_PROCESSES / JAX_PROCESS_ID overrides it. JAX_NUM_PROCESSES=1 (or no multi-process launch at all)
starts nothing. CPU processes exchange collectives over gloo, which jax selects by itself.

A lost process. When one process dies (SIGKILL, OOM, a failed host), the coordination service tells the others
and jax's client terminates them from a C++ thread with a fatal log line and a native stack trace; Python cannot
catch that, and a callback to replace it cannot be installed from Python in jax 0.10. So `initialize()` routes
this process's stderr through a small filter process (`_stderr_filter`): it passes every line through unchanged
until the runtime reports the fatal error, then swallows the runtime's log and stack trace and prints one sentence
naming the lost process(es) and what to do. The process still ends with a non-zero status (SIGABRT, 134).
The heartbeat timeout (`JAX_HEARTBEAT_TIMEOUT_SECONDS`, default 60) bounds how long a silently vanished host goes
unnoticed; a crashed process's closed connection is noticed at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Mapping

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_HEARTBEAT = "JAX_HEARTBEAT_TIMEOUT_SECONDS"
DEFAULT_HEARTBEAT_SECONDS = 60


class LaunchError(ValueError):
  """The environment describes a multi-process launch that cannot be started (one sentence, names the variable)."""


def _int_env(env: Mapping[str, str], name: str) -> int | None:
  value = env.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise LaunchError(f"{name}={value!r} is not an integer") from None


def _scheduler_process_count(env: Mapping[str, str]) -> int:
  """How many processes the scheduler environment says this job has (1 when none is detected)."""
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    count = _int_env(env, name)
    if count is not None and count > 1:
      return count
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts:
    return len(hosts.split(","))
  # Kubernetes and Cloud TPU VMs without the hostnames variable: let jax's own detection decide.
  try:
    from jax._src.clusters import cluster  # pylint: disable=import-outside-toplevel
    for cls in cluster.ClusterEnv._cluster_types:  # pylint: disable=protected-access
      if cls.__name__ in ("Mpi4pyCluster", "OmpiCluster", "SlurmCluster"):
        continue  # mpi4py merely installed is no launch; the other two are read above
      if cls.is_env_present():
        return max(int(cls.get_process_count()), 1)
  except Exception:  # noqa: BLE001 — private API; absent or failing detection means no scheduler
    return 1
  return 1


def wanted(env: Mapping[str, str] | None = None) -> bool:
  """Whether this process is one of several (so jax.distributed must be started)."""
  env = os.environ if env is None else env
  explicit = _int_env(env, ENV_NUM_PROCESSES)
  if explicit is not None:
    if explicit < 1:
      raise LaunchError(f"{ENV_NUM_PROCESSES}={explicit} must be >= 1")
    return explicit > 1
  if env.get(ENV_COORDINATOR) and _int_env(env, ENV_PROCESS_ID) is not None:
    raise LaunchError(f"{ENV_COORDINATOR} and {ENV_PROCESS_ID} are set but {ENV_NUM_PROCESSES} is not: "
                      "a plain multi-process launch needs all three")
  return _scheduler_process_count(env) > 1


def initialize(label: str | None = None) -> None:
  """Starts jax.distributed when this process is one of several; a no-op otherwise or when already started.

  label: what this process does, used in the sentence printed when another process is lost ("train WORKDIR").
  Raises LaunchError (one sentence) for an inconsistent environment.
  """
  import jax  # pylint: disable=import-outside-toplevel

  if jax.distributed.is_initialized() or not wanted():
    return
  env = os.environ
  num_processes = _int_env(env, ENV_NUM_PROCESSES)
  process_id = _int_env(env, ENV_PROCESS_ID)
  coordinator = env.get(ENV_COORDINATOR) or None
  if num_processes is not None and process_id is None and coordinator:
    raise LaunchError(f"{ENV_NUM_PROCESSES}={num_processes} is set but {ENV_PROCESS_ID} is not")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise LaunchError(f"{ENV_PROCESS_ID}={process_id} is outside 0..{num_processes - 1}")
  heartbeat = _int_env(env, ENV_HEARTBEAT) or DEFAULT_HEARTBEAT_SECONDS
  explicit = None not in (coordinator, num_processes, process_id)
  global _label
  _label = label or " ".join(sys.argv[:1])
  _start_stderr_filter(_label, process_id)
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                             cluster_detection_method="deactivate" if explicit else None,
                             heartbeat_timeout_seconds=heartbeat)
  _set_filter_process_id(jax.process_index(), jax.process_count())
  _exit_promptly_on_uncaught_errors()


def _exit_promptly_on_uncaught_errors() -> None:
  """An uncaught exception in one process: print it, then leave at once. A normal interpreter exit would first
  wait in jax's shutdown barrier for processes that are still working (up to its 5-minute timeout); leaving now
  lets the others learn at once that this process is gone."""
  previous = sys.excepthook

  def hook(kind, value, traceback):
    if is_lost_peer(value):
      exit_lost_peer(value)
    previous(kind, value, traceback)
    finish(1)

  sys.excepthook = hook


_PEER_LOST_MARKS = ("Gloo", "Connection closed by peer", "Connection reset by peer", "coordination service",
                    "UNAVAILABLE", "Socket closed")


def is_lost_peer(error: BaseException) -> bool:
  """Whether `error` is a collective or runtime call that failed because another process of a multi-process run
  is gone (a gloo/NCCL peer closed its connection, the coordination service is unreachable)."""
  import jax  # pylint: disable=import-outside-toplevel

  if not jax.distributed.is_initialized() or jax.process_count() < 2:
    return False
  if not isinstance(error, (jax.errors.JaxRuntimeError, RuntimeError)):
    return False
  text = str(error)
  return any(mark in text for mark in _PEER_LOST_MARKS)


def exit_lost_peer(error: BaseException, label: str | None = None) -> None:
  """Ends this process now with one sentence for an `is_lost_peer` error: no traceback from inside the
  collective, and no cleanup that would wait on the lost process (exit status 1)."""
  import jax  # pylint: disable=import-outside-toplevel

  first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
  text = (f"clipvip_jax: {label or _label}: process {jax.process_index()} of {jax.process_count()} stops because "
          f"another process of the job was lost (a collective failed: {first}); the JAX distributed runtime "
          "cannot continue without every process. Relaunch all processes to resume (training continues from its "
          "last complete checkpoint).")
  if _filter is not None:
    sys.stderr.write(f"{FILTER_CONTROL}say {text}\n")  # printed once, and the runtime's later noise dropped
  else:
    sys.stderr.write(text + "\n")
  finish(1)


def finish(code: int) -> int:
  """The exit status of a command: a failing process of a multi-process run exits here and now (see above);
  otherwise `code` is returned for sys.exit."""
  import jax  # pylint: disable=import-outside-toplevel

  if code and jax.distributed.is_initialized():
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except (OSError, ValueError):
        pass
    os._exit(code if 0 < code < 256 else 1)
  return code


_filter: subprocess.Popen | None = None
_label = "run"


def _start_stderr_filter(label: str, process_id: int | None) -> None:
  """Sends fd 2 through `_stderr_filter` (see the module docstring). Skipped when CLIPVIP_RAW_STDERR is set."""
  global _filter
  if _filter is not None or os.environ.get("CLIPVIP_RAW_STDERR"):
    return
  try:
    sys.stderr.flush()
    real_stderr = os.dup(2)
    read_end, write_end = os.pipe()
    _filter = subprocess.Popen(
        [sys.executable, "-m", "clipvip_jax.runtime.stderr_filter", label, str(-1 if process_id is None else process_id)],
        stdin=read_end, stdout=real_stderr, stderr=real_stderr, close_fds=True, start_new_session=True)
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    os.close(real_stderr)
  except OSError:  # no filter: the runtime's own fatal message still ends the process
    _filter = None


def _set_filter_process_id(index: int, count: int) -> None:
  """Tells the filter which process this is once jax knows (scheduler launches learn it only at initialize)."""
  if _filter is not None:
    sys.stderr.write(f"{FILTER_CONTROL}process {index} {count}\n")
    sys.stderr.flush()


FILTER_CONTROL = "\x00clipvip-stderr-filter:"


def describe() -> str:
  """'process i of n' of this process (after initialize), for messages."""
  import jax  # pylint: disable=import-outside-toplevel

  return f"process {jax.process_index()} of {jax.process_count()}"
