"""Decoding worker pools that leave Ctrl-C to the parent.

A terminal sends SIGINT to the whole process group, so without care every worker of a pool prints its own
KeyboardInterrupt traceback (or dies mid-shard) when the user presses Ctrl-C. The parent alone should answer it:
one line, then the pool is terminated, and whatever was half-written is cleaned up by the next run.
"""

from __future__ import annotations

import multiprocessing
import signal
from multiprocessing import resource_tracker
from typing import Any


def _ignore_sigint() -> None:
  # A Ctrl-C that reached the worker while it started is pending (blocked, see spawn_pool): ignoring discards it.
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def spawn_pool(processes: int) -> Any:
  """A spawn Pool whose workers never answer SIGINT: they start with it blocked (a signal mask is inherited by the
  process and kept across exec), so a Ctrl-C while a worker is still importing stays pending and prints nothing,
  and the initializer then ignores it for good. The parent only blocks it in the calling thread while the pool
  starts: a Ctrl-C in that window is delivered once the pool exists (or at once to another thread, whose
  handler wakes the main thread), never lost, as ignoring it there (SIG_IGN, which the workers would inherit)
  lost it. Spawn, not fork: the parent may hold threads (PyAV, JAX in a notebook) that fork would copy broken."""
  context = multiprocessing.get_context("spawn")
  if not hasattr(signal, "pthread_sigmask"):  # not POSIX: the initializer alone
    return context.Pool(processes, initializer=_ignore_sigint)
  # The pool's locks start multiprocessing's resource tracker on first use, and starting it UNBLOCKS SIGINT in the
  # calling thread (the tracker blocks SIGINT and SIGTERM around its own spawn, then unblocks both), which
  # silently undid the block below: the workers spawned after it started with SIGINT deliverable, and a Ctrl-C
  # while one was still importing printed its KeyboardInterrupt traceback. Started here, before the block.
  resource_tracker.ensure_running()
  previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
  try:
    return context.Pool(processes, initializer=_ignore_sigint)
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, previous)
