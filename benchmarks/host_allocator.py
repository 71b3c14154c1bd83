"""Our CPU training step under each host allocator: step time and minor page faults per step.

  nice python -m benchmarks.host_allocator [--variant B/32] [--batch 2] [--steps 5] [--rounds 2] [--input-thread]

XLA:CPU allocates a step's temporaries afresh at every call; what that costs depends on the process's malloc
(clipvip_jax/runtime/host_allocator.py). Each row runs the trainer's own compiled step (benchmarks/ours.py, the
repository's default config.model) in a fresh child process started with that allocator: glibc as it is,
glibc with benchmarks.common.MALLOC_KEEP, and every one of tcmalloc, jemalloc (as installed, and with the
never-purge setting the commands give it) and mimalloc found on this machine. A child times `--steps` steps after
one warm-up step and counts the minor page faults of each (getrusage). Rows run in turn, `--rounds` times over
(so that a drift of the machine's load does not fall on one row); the figure is the median over all the steps of
a row. `--input-thread` adds a thread that allocates and fills 12-frame uint8 clips while the steps run, as the
trainer's input pipeline does (glibc's single arena under MALLOC_KEEP serialises the two).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from benchmarks import common
from clipvip_jax.runtime import host_allocator

_PATTERNS = {"tcmalloc": "libtcmalloc_minimal.so*", "jemalloc": "libjemalloc.so*", "mimalloc": "libmimalloc.so*"}


def allocators() -> dict[str, dict[str, str]]:
  """Row name -> the environment of its child process."""
  glibc = common.glibc_env()
  rows = {"glibc": glibc, "glibc keep (MALLOC_KEEP)": common.glibc_env(keep=True)}
  for name, pattern in _PATTERNS.items():
    library = host_allocator.find(patterns=(pattern,))
    if library is None:
      continue
    rows[name] = {**glibc, "LD_PRELOAD": " ".join(filter(None, [library, glibc["LD_PRELOAD"]]))}
    if name == "jemalloc":
      rows["jemalloc " + host_allocator.JEMALLOC_CONF] = {**rows[name], "MALLOC_CONF": host_allocator.JEMALLOC_CONF}
  return rows


def child(args: argparse.Namespace) -> dict:
  """One row: build the step, time `args.steps` steps (after one warm-up), count page faults per step."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from benchmarks import ours as ours_lib  # pylint: disable=import-outside-toplevel
  from clipvip_jax.train import model_init  # pylint: disable=import-outside-toplevel

  section = ours_lib.model_section(args.variant, frames=args.frames)
  cfg = model_init.model_config(section).clip
  batch = ours_lib.synthetic_batch(args.batch, args.frames, args.image_size, args.text_len, cfg.text.vocab_size)
  ours = ours_lib.build(section, batch, devices=jax.devices()[:1])
  device_batch = ours.put(batch)
  stop = threading.Event()

  def input_thread() -> None:  # the trainer's loader stands in: fresh uint8 clips, filled and stacked
    rng = np.random.default_rng(0)
    while not stop.is_set():
      frames = [np.frombuffer(rng.bytes(args.image_size ** 2 * 3), np.uint8) for _ in range(args.frames)]
      np.stack(frames).astype(np.float32)
      time.sleep(0.005)

  if args.input_thread:
    threading.Thread(target=input_thread, daemon=True).start()
  jax.block_until_ready(ours.step(device_batch))
  times, faults = [], []
  for _ in range(args.steps):
    before, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    jax.block_until_ready(ours.step(device_batch))
    times.append(time.perf_counter() - t0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  stop.set()
  return {"times": times, "faults": faults, "temp_bytes": ours.memory.temp_size_in_bytes}


def main(argv: list[str] | None = None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variant", default="B/32")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--frames", type=int, default=12)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--text-len", type=int, default=50)
  p.add_argument("--steps", type=int, default=5, help="timed steps per row and round")
  p.add_argument("--rounds", type=int, default=2, help="times every row runs (in turn)")
  p.add_argument("--input-thread", action="store_true", help="a thread allocating clips beside the steps")
  p.add_argument("--only", default="", help="comma-separated row names (default: every allocator found)")
  p.add_argument("--child", default="", help=argparse.SUPPRESS)  # internal: run one row, write JSON here
  args = p.parse_args(argv)
  if args.child:
    with open(args.child, "w", encoding="utf-8") as f:
      json.dump(child(args), f)
    return []

  for line in common.machine_lines():
    print(line)
  rows = allocators()
  if args.only:
    rows = {k: v for k, v in rows.items() if k in args.only.split(",")}
  print(f"{args.variant}, batch {args.batch}, {args.frames} frames of {args.image_size}, default config.model; "
        f"{args.steps} steps x {args.rounds} rounds per row; input thread: {'yes' if args.input_thread else 'no'}",
        flush=True)
  results: dict[str, dict] = {name: {"times": [], "faults": []} for name in rows}
  own = list(argv if argv is not None else sys.argv[1:])
  for _ in range(args.rounds):
    for name, env in rows.items():
      out = os.path.join(tempfile.gettempdir(), f"host_allocator_row_{os.getpid()}.json")
      subprocess.run([sys.executable, "-m", "benchmarks.host_allocator", *own, "--child", out], env=env, check=True)
      with open(out, encoding="utf-8") as f:
        r = json.load(f)
      os.remove(out)
      results[name]["times"] += r["times"]
      results[name]["faults"] += r["faults"]
      results[name]["temp_bytes"] = r["temp_bytes"]
  base = statistics.median(results["glibc"]["times"]) if "glibc" in results else None
  table = []
  for name, r in results.items():
    med = statistics.median(r["times"])
    table.append([name, f"{med:.3f}", f"{100 * (max(r['times']) - min(r['times'])) / med:.0f}%",
                  f"{statistics.median(r['faults']):,.0f}", f"{base / med:.2f}x" if base else "",
                  common.fmt_bytes(r["temp_bytes"])])
  print(common.markdown_table(["host allocator", "step s (median)", "spread", "minor faults per step",
                               "speed vs glibc", "XLA temp"], table))
  print(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
  return [{"allocator": name, **r} for name, r in results.items()]


if __name__ == "__main__":
  main()
