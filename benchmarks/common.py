"""What every benchmark script shares: the machine/version header, timing and memory helpers, table printing.

Timing rules (why they look like this): the first calls of a jitted function compile and warm caches, so they
are excluded (`warmup`); JAX dispatches asynchronously, so a call is only finished after `block_until_ready`;
the machine may be shared, so the figure is the median of N calls, and when two implementations are compared
their calls are interleaved (A B A B ...) so that a change in background load hits both alike.
Memory: a call's figure is its transient peak resident set size above the RSS it started from: VmHWM of
/proc/self/status is reset before the call (writing 5 to /proc/self/clear_refs). glibc keeps freed memory of
medium-sized blocks in its arenas, so a warm process would show no rise at all; `memory_mode()` first makes every
block >= 1 MiB its own mapping that free() returns (mallopt M_MMAP_THRESHOLD), which costs page faults, so it is
used for separate, untimed calls only.

Host allocator: XLA:CPU allocates a step's temporaries (one buffer of several GiB) afresh at every call, and
glibc serves a block that large with its own mmap and returns it to the OS at free(), so every step first-touches
all of it again (about a million page faults and 15% of the CPU time of a B/32 step). `MALLOC_KEEP` (the glibc
tunables `GLIBC_TUNABLES` takes; read at process start) serves every block from one heap and never trims it:
freed memory stays with the process and the next step reuses it, with no page faults, but all threads share one
arena. tcmalloc, which the repository's commands preload where it is installed (clipvip_jax/runtime/host_allocator.py),
keeps freed memory too, without that lock. Either applies to the whole process, ours and the peer alike.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
import platform
import statistics
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from clipvip_jax.runtime import host_allocator


def usable_cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
  try:
    return __import__(module).__version__
  except Exception:  # noqa: BLE001 — a missing optional package is simply not listed
    return None


MALLOC_KEEP = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776:glibc.malloc.arena_max=1"


def malloc_keep_active() -> bool:
  return MALLOC_KEEP in os.environ.get("GLIBC_TUNABLES", "")


MALLOC_CHOICES = ("auto", "system", "keep")


def malloc_name() -> str:
  """The host allocator this process runs with: tcmalloc/jemalloc (preloaded), "glibc keep" or "glibc"."""
  library = host_allocator.preloaded()
  if library:
    return os.path.basename(library).split(".so")[0].removeprefix("lib")
  return "glibc keep" if malloc_keep_active() else "glibc"


def malloc_env(choice: str) -> dict[str, str] | None:
  """The environment of a child process that runs with host allocator `choice` (MALLOC_CHOICES): "auto" as the
  repository's commands choose (clipvip_jax/runtime/host_allocator.py), "system" glibc's malloc as started, "keep" glibc
  with MALLOC_KEEP. None when this process already runs with it."""
  if choice == "auto":
    return None if host_allocator.preloaded() else host_allocator.plan()
  if choice not in MALLOC_CHOICES:
    raise ValueError(f"host allocator {choice!r}: one of {MALLOC_CHOICES}")
  if not host_allocator.preloaded() and malloc_keep_active() == (choice == "keep"):
    return None
  return glibc_env(keep=choice == "keep")


def glibc_env(keep: bool = False) -> dict[str, str]:
  """This process's environment without a preloaded malloc (and the commands told to keep glibc's), with
  MALLOC_KEEP in GLIBC_TUNABLES when `keep`, without it otherwise."""
  env = dict(os.environ)
  env[host_allocator.ENV] = "system"
  env.pop(host_allocator.CHOSEN_ENV, None)
  preload = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p != host_allocator.preloaded()]
  env["LD_PRELOAD"] = " ".join(preload)
  tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t and t not in MALLOC_KEEP.split(":")]
  if keep:
    tunables.append(MALLOC_KEEP)
  env["GLIBC_TUNABLES"] = ":".join(tunables)
  return env


def machine_lines(extra_modules: Sequence[str] = ()) -> list[str]:
  """Header lines: CPU, cores, memory, load, library versions, XLA flags."""
  import jax  # pylint: disable=import-outside-toplevel
  mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  modules = ("jax", "jaxlib", "flax", "optax", "numpy", *extra_modules)
  versions = ", ".join(f"{m} {v}" for m in modules if (v := _version(m)))
  devices = jax.devices()
  return [f"machine: {cpu_model()} | {os.cpu_count()} CPUs ({usable_cores()} usable) | {mem_gb:.0f} GiB RAM | "
          f"{platform.system()} | load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
          f"devices: {len(devices)} x {devices[0].device_kind} ({devices[0].platform})",
          f"versions: python {platform.python_version()}, {versions}",
          f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '') or '(none)'}; "
          f"GLIBC_TUNABLES: {os.environ.get('GLIBC_TUNABLES', '') or '(none)'}; host allocator: {malloc_name()}"]


def block(x: Any) -> Any:
  """Waits for every jax array in `x` (torch results are already computed when returned)."""
  import jax  # pylint: disable=import-outside-toplevel
  return jax.block_until_ready(x)


# ------------------------------------------------------------------------------------------------ memory


def _status_kb(field: str) -> int | None:
  try:
    with open("/proc/self/status", encoding="utf-8") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def rss_bytes() -> int | None:
  kb = _status_kb("VmRSS")
  return None if kb is None else kb * 1024


def peak_rss_bytes() -> int | None:
  kb = _status_kb("VmHWM")
  return None if kb is None else kb * 1024


def reset_peak_rss() -> bool:
  """Resets VmHWM to the current RSS (Linux); False where that is not possible."""
  try:
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
      f.write("5")
    return True
  except OSError:
    return False


def memory_mode(threshold: int = 2**20) -> bool:
  """Makes free() return blocks >= `threshold` bytes to the OS and trims what the arenas hold now (glibc only);
  False where that is not possible (the peak figures then under-count), e.g. under tcmalloc, which keeps them."""
  if host_allocator.preloaded():
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    m_trim_threshold, m_mmap_threshold, m_mmap_max = -1, -3, -4
    ok = libc.mallopt(m_mmap_max, 65536) == 1  # undo MALLOC_KEEP's no-mmap, no-trim settings, if present
    ok = ok and libc.mallopt(m_trim_threshold, 128 * 1024) == 1
    ok = ok and libc.mallopt(m_mmap_threshold, threshold) == 1
    libc.malloc_trim(0)
    return ok
  except (OSError, AttributeError):
    return False


def peak_rise_bytes(fn: Callable[[], Any]) -> int | None:
  """The rise of peak RSS above the starting RSS during one blocked call of `fn` (call memory_mode() first)."""
  if not reset_peak_rss():
    return None
  start = rss_bytes()
  block(fn())
  peak = peak_rss_bytes()
  return None if start is None or peak is None else peak - start


# ------------------------------------------------------------------------------------------------ timing


@dataclasses.dataclass
class Measurement:
  """Wall-clock seconds of each timed call, and each call's peak RSS above the RSS it started from."""
  seconds: list[float] = dataclasses.field(default_factory=list)
  cpu_seconds: list[float] = dataclasses.field(default_factory=list)
  peak_delta: list[int] = dataclasses.field(default_factory=list)

  @property
  def median(self) -> float:
    return statistics.median(self.seconds)

  @property
  def spread(self) -> float:
    """(max - min) / median: how noisy the timed calls were."""
    return (max(self.seconds) - min(self.seconds)) / self.median if self.seconds else float("nan")

  @property
  def median_cpu(self) -> float:
    return statistics.median(self.cpu_seconds)

  @property
  def peak_delta_bytes(self) -> int | None:
    return max(self.peak_delta) if self.peak_delta else None


def time_call(fn: Callable[[], Any], out: Measurement, track_memory: bool = True) -> Any:
  """One call of `fn`, blocked until its result exists; appends to `out`."""
  can_reset = track_memory and reset_peak_rss()
  start_rss = rss_bytes() if can_reset else None
  cpu0, t0 = time.process_time(), time.perf_counter()
  result = block(fn())
  out.seconds.append(time.perf_counter() - t0)
  out.cpu_seconds.append(time.process_time() - cpu0)
  if start_rss is not None:
    peak = peak_rss_bytes()
    if peak is not None:
      out.peak_delta.append(peak - start_rss)
  return result


def interleaved(fns: Mapping[str, Callable[[], Any]], *, warmup: int, repeats: int,
                track_memory: bool = True) -> dict[str, Measurement]:
  """Warm each function up, then time them round-robin `repeats` times (A B A B ...)."""
  for fn in fns.values():
    for _ in range(warmup):
      block(fn())
  out = {name: Measurement() for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      time_call(fn, out[name], track_memory)
  return out


def median_time(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5) -> Measurement:
  return interleaved({"fn": fn}, warmup=warmup, repeats=repeats)["fn"]


# ------------------------------------------------------------------------------------------------ output


def fmt_bytes(n: float | None) -> str:
  if n is None or (isinstance(n, float) and np.isnan(n)):
    return "n/a"
  return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)
