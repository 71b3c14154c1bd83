"""One trainer per workdir: WORKDIR/run.lock names the run that holds it.

  lock = WorkdirLock(workdir)
  lock.acquire(report=log.warning)   # WorkdirLockedError naming host and pid when another live run holds it
  ...
  lock.release()

The lock file is created with O_EXCL (atomic on local disks and NFSv3+) and holds JSON: host, pid, the process's
start time (from /proc, so that a recycled pid is not mistaken for the holder), the start of the run and the
command line. A second trainer on the same workdir fails with one sentence naming the holder, before it writes
anything. A lock left by a process that died (same host, pid gone or started at another time) is taken over, with
a message. A process on another host cannot be asked: instead the holder touches its lock file every
HEARTBEAT_S seconds, and a lock from another host untouched for STALE_AFTER_S (a node that crashed, a job
requeued onto other nodes) is taken over with a message; a fresher one is an error naming host and pid.

Several JAX processes (one run on many hosts) share one workdir: only process 0 takes the lock, the others trust
it. Process 0's outcome is broadcast, so that every process of a second run fails together instead of the others
waiting forever in the next collective.
"""

from __future__ import annotations

import atexit
import json
import os
import pathlib
import socket
import sys
import threading
import time
from typing import Callable

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0  # the holder refreshes the lock file's time this often
STALE_AFTER_S = 600.0  # a lock of another host untouched this long is a dead run's (20 heartbeats; clock skew)


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir's lock; the message names it (host, pid, start) and the lock file."""


def _start_time(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None where /proc is absent."""
  try:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return None
  return stat.rsplit(")", 1)[1].split()[19]  # fields after "(comm)": state is field 3, starttime field 22


def _alive(pid: int, start: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by someone else
    pass
  now_start = _start_time(pid)
  return start is None or now_start is None or now_start == start


def _describe(holder: dict) -> str:
  started = holder.get("started")
  when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
  return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {when})"


class WorkdirLock:
  """The lock of one workdir, held by this process between acquire() and release()."""

  def __init__(self, workdir: str | os.PathLike, *, lock_name: str = LOCK_NAME, label: str | None = None,
               holder: str = "the training run", option: str = "--workdir"):
    """lock_name: the lock file in `workdir`; label, holder, option: how messages name the locked folder, the run
    that holds it and the option that picks another (encode locks its --out: clipvip_jax.retrieval.indexer)."""
    self.path = pathlib.Path(workdir).absolute() / lock_name
    self.label = label or f"workdir {self.path.parent}"
    self.holder, self.option = holder, option
    self.held = False
    self._stop = threading.Event()

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        os.utime(self.path)
      except OSError:  # removed by hand, or the mount is gone: the run goes on, the next start decides
        pass

  def _age(self) -> float | None:
    try:
      return time.time() - self.path.stat().st_mtime
    except OSError:
      return None

  def _record(self) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _start_time(os.getpid()),
            "started": time.time(), "command": " ".join(sys.argv)[:500]}

  def _create(self) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(json.dumps(self._record()) + "\n")
    return True

  def _holder(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}  # written halfway (the writer died between create and write): no one to ask, treat as stale

  def _acquire_here(self, report: Callable[[str], None]) -> None:
    for _ in range(3):  # lost races with another starting run: retry with what it wrote
      if self._create():
        self.held = True
        self._stop.clear()
        threading.Thread(target=self._heartbeat, name="workdir-lock-heartbeat", daemon=True).start()
        atexit.register(self.release)
        return
      holder = self._holder()
      if holder is None:
        continue  # released between our attempts
      same_host = holder.get("host") == socket.gethostname()
      pid = holder.get("pid")
      if holder and same_host and pid == os.getpid():
        stale_reason = "an earlier run in this process"
      elif not holder:
        if (self._age() or 0.0) < 5.0:  # maybe another run between creating its lock and writing it: ask again
          time.sleep(1.0)
          continue
        stale_reason = "an unreadable lock file"
      elif same_host and isinstance(pid, int) and not _alive(pid, holder.get("pid_start")):
        stale_reason = f"{_describe(holder)}, which is no longer running"
      elif same_host:
        raise WorkdirLockedError(f"{self.label} is in use by {self.holder} of {_describe(holder)} "
                                 f"(lock file {self.path}); wait for it to finish or stop it, or use another "
                                 f"{self.option}")
      elif (age := self._age()) is not None and age > STALE_AFTER_S:
        stale_reason = f"{_describe(holder)}, whose lock was last refreshed {age / 60:.0f} minutes ago"
      else:
        raise WorkdirLockedError(
            f"{self.label} is in use by {self.holder} of {_describe(holder)} (lock file "
            f"{self.path}, refreshed {age or 0:.0f} s ago; a lock of another host counts as abandoned after "
            f"{STALE_AFTER_S / 60:.0f} minutes without a refresh); stop that run or use another {self.option}")
      # Take over: move the stale file aside under a unique name first, so that of two runs taking over at once
      # only one removes it, and the other finds the winner's lock on its next attempt.
      aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
      try:
        os.replace(self.path, aside)
      except FileNotFoundError:
        continue
      try:
        moved = json.loads(aside.read_text())
      except (OSError, ValueError):
        moved = {}
      if moved and moved != holder:  # another run took over first and this moved its fresh lock: put it back
        try:
          os.link(aside, self.path)
        except OSError:
          pass
        aside.unlink(missing_ok=True)
        continue
      aside.unlink(missing_ok=True)
      if pid != os.getpid():  # an earlier train() of this process that ended in an error: nothing to say
        report(f"took over the lock of {self.label} from {stale_reason}")
    raise WorkdirLockedError(f"{self.label}: could not take its lock file {self.path} (other runs "
                             "keep starting on it)")

  def live_holder(self) -> str | None:
    """Who holds the lock now ("pid N on host H (since T)"), or None when no live run does (no lock file, or the
    lock of a process that died or of another host untouched for STALE_AFTER_S). Takes nothing."""
    holder = self._holder()
    if not holder:
      return None
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname():
      return _describe(holder) if isinstance(pid, int) and _alive(pid, holder.get("pid_start")) else None
    age = self._age()
    return _describe(holder) if age is not None and age <= STALE_AFTER_S else None

  def acquire(self, report: Callable[[str], None] = print) -> "WorkdirLock":
    """Takes the lock on process 0 (the others wait for its outcome); raises WorkdirLockedError on every process
    when another live run holds it."""
    import jax
    error = None
    if jax.process_index() == 0:
      try:
        self._acquire_here(report)
      except WorkdirLockedError as e:
        error = e
    if jax.process_count() > 1:
      import numpy as np
      from jax.experimental import multihost_utils
      failed = int(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
      if failed and error is None:
        error = WorkdirLockedError(f"{self.label} is in use by another {self.holder.removeprefix('the ')} "
                                   "(process 0 names it)")
    if error is not None:
      raise error
    return self

  def release(self) -> None:
    """Removes the lock file if this process still holds it (a no-op otherwise; safe to call twice)."""
    if not self.held:
      return
    self.held = False
    self._stop.set()
    holder = self._holder()
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
      self.path.unlink(missing_ok=True)

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
