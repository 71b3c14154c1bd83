"""Runs any command of this project as N local JAX processes: multi-host code on one machine.

  python -m clipvip_jax.launch_local --processes 2 --devices-per-process 4 -- \
      python -m clipvip_jax.train --config configs/demo.py --workdir runs/demo2

Each process gets JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port), JAX_NUM_PROCESSES, JAX_PROCESS_ID, CPU as
its platform and K simulated devices (XLA_FLAGS=--xla_force_host_platform_device_count=K); collectives between
the processes run over gloo. So the mesh spans N x K devices exactly as on N hosts of K accelerators.

Output: every line of a process's stdout and stderr is printed with its id, "[1] ...". Signals: SIGINT (Ctrl-C)
and SIGTERM are forwarded to every process (each runs in its own session, so a terminal's Ctrl-C reaches it once,
through here). Failure: as soon as one process exits with a non-zero status, the others are killed (a job whose
process died cannot continue; the survivors would only wait for the runtime to notice) and launch_local exits
with that status. A leading `python` in the command is replaced by this interpreter.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

from clipvip_jax.runtime import distributed

PROG = "python -m clipvip_jax.launch_local"


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], index: int, count: int, devices: int, port: int) -> dict[str, str]:
  env = dict(base)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  env[distributed.ENV_COORDINATOR] = f"127.0.0.1:{port}"
  env[distributed.ENV_NUM_PROCESSES] = str(count)
  env[distributed.ENV_PROCESS_ID] = str(index)
  env["PYTHONUNBUFFERED"] = "1"  # lines in the order they happen, not when a buffer fills
  return env


def _pump(index: int, stream, out, lock: threading.Lock) -> None:
  prefix = f"[{index}] ".encode()
  for line in iter(stream.readline, b""):
    with lock:
      out.write(prefix + line if line.endswith(b"\n") else prefix + line + b"\n")
      out.flush()
  stream.close()


def _status_words(code: int) -> str:
  if code < 0:
    try:
      return f"killed by {signal.Signals(-code).name}"
    except ValueError:
      return f"killed by signal {-code}"
  return f"exit status {code}"


def run(command: Sequence[str], processes: int, devices: int, port: int | None = None,
        out=None) -> int:
  """Runs `command` as `processes` local JAX processes; returns 0 or the first failing process's status."""
  out = out or sys.stdout.buffer
  command = list(command)
  if command and os.path.basename(command[0]) in ("python", "python3"):
    command[0] = sys.executable
  port = port or free_port()
  lock = threading.Lock()
  children: list[subprocess.Popen] = []
  pumps: list[threading.Thread] = []
  for index in range(processes):
    child = subprocess.Popen(command, env=process_env(dict(os.environ), index, processes, devices, port),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    children.append(child)
    pump = threading.Thread(target=_pump, args=(index, child.stdout, out, lock), daemon=True)
    pump.start()
    pumps.append(pump)

  def forward(signum, frame):  # pylint: disable=unused-argument
    for child in children:
      if child.poll() is None:
        try:
          os.kill(child.pid, signum)
        except ProcessLookupError:
          pass

  previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
  status = 0
  try:
    running = set(range(processes))
    while running:
      for index in sorted(running):
        code = children[index].poll()
        if code is None:
          continue
        running.discard(index)
        if code != 0 and status == 0:
          status = code if code > 0 else 128 - code
          others = [i for i in running]
          with lock:
            out.write(f"[launch_local] process {index} ended ({_status_words(code)}); "
                      f"ending process(es) {', '.join(map(str, others)) or 'none'}\n".encode())
            out.flush()
          for other in others:
            _kill_group(children[other])
      time.sleep(0.05)
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
    for child in children:
      if child.poll() is None:
        _kill_group(child)
        child.wait()
    for pump in pumps:
      pump.join(timeout=5)
  return status


def _kill_group(child: subprocess.Popen) -> None:
  """SIGKILL to the process and everything it started (its Grain workers), which share its session."""
  try:
    os.killpg(child.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    try:
      child.kill()
    except ProcessLookupError:
      pass


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" not in argv:
    print(f"{PROG}: error: put the command after `--`, e.g. {PROG} --processes 2 --devices-per-process 4 -- "
          "python -m clipvip_jax.train --config configs/demo.py --workdir runs/x", file=sys.stderr)
    return 2
  split = argv.index("--")
  parser = argparse.ArgumentParser(prog=PROG, description="Run a command as N local JAX processes (CPU, gloo).")
  parser.add_argument("--processes", type=int, required=True, help="number of JAX processes (N)")
  parser.add_argument("--devices-per-process", type=int, default=1, help="simulated CPU devices per process (K)")
  parser.add_argument("--port", type=int, help="coordinator port on 127.0.0.1 (default: a free one)")
  args = parser.parse_args(argv[:split])
  command = argv[split + 1:]
  if not command:
    print(f"{PROG}: error: no command after `--`", file=sys.stderr)
    return 2
  if args.processes < 1 or args.devices_per_process < 1:
    print(f"{PROG}: error: --processes and --devices-per-process must be >= 1", file=sys.stderr)
    return 2
  return run(command, args.processes, args.devices_per_process, args.port)
