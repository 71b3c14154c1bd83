"""The stderr filter of a multi-process run: one sentence instead of the runtime's fatal log when a peer is lost.

Started by `clipvip_jax.runtime.distributed.initialize` as `python -m clipvip_jax.runtime.stderr_filter LABEL PROCESS_ID`, with
the run's stderr on its stdin. Every line passes through unchanged, at once, until the JAX coordination client
logs that the distributed runtime failed (another process died or the coordinator is gone). From then on the
runtime's log lines, continuation lines and native stack trace are held back; when the fatal line arrives (or
the run's stderr closes) the filter prints one sentence naming the lost process(es) and drops the rest. If no
fatal line follows within a few seconds, the held lines are printed after all and filtering resumes.

It ignores SIGINT/SIGTERM (it runs in its own session, and ends when the run's stderr closes), so a Ctrl-C that
reaches the run never cuts its error output.
"""

from __future__ import annotations

import os
import re
import select
import signal
import sys

CONTROL = b"\x00clipvip-stderr-filter:"
# glog's prefix: severity letter, MMDD, time, thread id, file:line]
_GLOG = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ (?P<file>[\w.]+):\d+\] ")
_RUNTIME_FAILED = (b"Polled an error from coordination service", b"Terminating process because the JAX distributed",
                   b"Use error polling to propagate the following error to all tasks",
                   b"preemption notice from coordination service", b"Failed to cancel preemption barrier")
_FATAL = (b"Terminating process because the JAX distributed", b"*** Check failure stack trace", b"terminate called")
HOLD_SECONDS = 5.0


def lost_processes(text: str) -> str:
  """What the runtime's messages say was lost, as words for the sentence."""
  unhealthy = re.search(r"unhealthy \(stopped sending heartbeats\):\s*([\d,\s/:a-z_]+?)(?:\n\s*\n|The tasks|$)",
                        text, re.S)
  if unhealthy:
    ids = sorted({int(x) for x in re.findall(r"(?:task:)?(\d+)", unhealthy.group(1))})
    if ids:
      names = ", ".join(str(i) for i in ids)
      return (f"process{'es' if len(ids) > 1 else ''} {names} stopped responding (crashed, killed, or its host "
              "failed)")
  if "leader task" in text or "Failed to send RPC to coordination service" in text or "Socket closed" in text:
    return "the coordinator (process 0) is gone (crashed, killed, or its host failed)"
  tasks = sorted({int(x) for x in re.findall(r"task:(\d+)", text)})
  if tasks:
    return f"process(es) {', '.join(map(str, tasks))} reported a fatal error"
  return "another process of the job was lost"


def sentence(label: str, process: str, held: bytes) -> bytes:
  lost = lost_processes(held.decode("utf-8", "replace"))
  return (f"clipvip_jax: {label}: {process} stops because {lost}; the JAX distributed runtime cannot continue "
          "without every process. Relaunch all processes to resume (training continues from its last complete "
          "checkpoint).\n").encode()


def run(label: str, process_id: int, stdin, stdout) -> None:
  process = f"process {process_id}" if process_id >= 0 else "this process"
  buffer = b""
  held: list[bytes] | None = None  # lines held back since the runtime reported a failure
  held_since = 0.0
  done = False  # the sentence is out: drop everything else
  fd = stdin.fileno()
  import time  # pylint: disable=import-outside-toplevel

  def emit(data: bytes) -> None:
    try:
      stdout.write(data)
      stdout.flush()
    except (BrokenPipeError, OSError):
      pass

  while True:
    timeout = None if held is None or done else max(held_since + HOLD_SECONDS - time.monotonic(), 0.0)
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:  # held lines were not followed by a fatal error: print them after all
      emit(b"".join(held or []))
      held = None
      continue
    chunk = os.read(fd, 65536)
    if not chunk:
      break
    buffer += chunk
    *lines, buffer = buffer.split(b"\n")
    for raw in lines:
      line = raw + b"\n"
      if line.startswith(CONTROL):
        fields = line[len(CONTROL):].split()
        if len(fields) == 3 and fields[0] == b"process":
          process = f"process {int(fields[1])} of {int(fields[2])}"
        elif fields and fields[0] == b"say" and not done:  # the run's own sentence: print it, drop the rest
          emit(line[len(CONTROL) + 4:])
          done = True
        continue
      if done:
        continue
      if held is None and _GLOG.match(line) and any(m in line for m in _RUNTIME_FAILED):
        held, held_since = [], time.monotonic()
      if held is None:
        emit(line)
        continue
      held.append(line)
      if any(m in line for m in _FATAL):
        emit(sentence(label, process, b"".join(held)))
        done = True
  if buffer and not done:
    if held is not None:
      held.append(buffer)
    else:
      emit(buffer)
  if held is not None and not done:
    emit(sentence(label, process, b"".join(held)) if any(
        m in b"".join(held) for m in _RUNTIME_FAILED) else b"".join(held))


def main() -> None:
  for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
  label = sys.argv[1] if len(sys.argv) > 1 else "run"
  process_id = int(sys.argv[2]) if len(sys.argv) > 2 else -1
  run(label, process_id, sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
  main()
