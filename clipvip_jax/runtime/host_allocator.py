"""The host allocator of a command: tcmalloc (or jemalloc) in place of glibc's malloc, chosen at process start.

Why: XLA:CPU allocates a step's temporaries (gigabytes at CLIP-ViP B/32 and B/16) afresh at every call. glibc serves
every block above 32 MiB with its own mmap and unmaps it at free(), so each step faults all of those pages in again,
which made CPU steps markedly slower on the VMs we run on (docs/performance.md section 1a has the figures and the
commands). tcmalloc keeps freed pages for
the next step: no faults after the first one. glibc's own settings cannot do the same without putting every thread
on one arena, which serialises the input thread against XLA's (section 2, "tried"). On a GPU or TPU the step's
buffers live on the device, so there is little for it to change (not measured there).

A process picks its malloc when it starts (LD_PRELOAD), so a command calls `use_preferred()` first thing in its
`__main__` block: where the preferred allocator is installed and not yet loaded, the process executes itself
again, once, with the same arguments and LD_PRELOAD set; nothing has run yet, so nothing is repeated. Library
code (imports, tests, notebooks) never re-executes anything.

CLIPVIP_HOST_ALLOCATOR chooses: "auto" (the default: tcmalloc, else jemalloc, where installed; otherwise glibc's),
"system" (leave the process as started), or the path of a malloc library to preload. Installing one on Debian or
Ubuntu: `apt-get install libtcmalloc-minimal4` (`make install` does it where it runs as root).
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Mapping, Sequence

ENV = "CLIPVIP_HOST_ALLOCATOR"
# Set in the re-executed process: the library it preloaded (so that it never re-executes twice).
CHOSEN_ENV = "CLIPVIP_HOST_ALLOCATOR_CHOSEN"
# Preference order, as file-name patterns: tcmalloc was the fastest on our CPU step (docs/performance.md 1a).
CANDIDATES = ("libtcmalloc_minimal.so*", "libtcmalloc.so*", "libjemalloc.so*")
_KNOWN = ("tcmalloc", "jemalloc", "mimalloc")  # a preload of any of these already replaces glibc's malloc
# tcmalloc keeps freed memory and never returns it by itself. In a command (one model: its train and eval steps,
# the input pipeline) that costs nothing measurable (the demo's peak RSS: docs/performance.md section 1a). A process
# that interleaves several large models' steps can hold freed blocks of each (benchmarks/train_step.py with several
# B/16 rows ran out of memory where glibc's malloc did not: the same section). Such a process should hold fewer
# models or run with CLIPVIP_HOST_ALLOCATOR=system. (gperftools' TCMALLOC_HEAP_LIMIT_MB
# turned that case into a failed allocation instead of a release of free pages: not used.)
# jemalloc returns freed pages to the OS after 10 s by default: longer than one CPU step at B/16, so every step
# would fault them in again. Never purge (the process keeps its high-water mark, as with tcmalloc).
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def library_dirs() -> list[str]:
  """Where shared libraries are installed: the Python environment's own lib (conda), then the system's."""
  dirs = [os.path.join(sys.prefix, "lib"), "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
          "/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"]
  conda = os.environ.get("CONDA_PREFIX")
  if conda:
    dirs.insert(0, os.path.join(conda, "lib"))
  return list(dict.fromkeys(dirs))


def find(dirs: Sequence[str] | None = None, patterns: Sequence[str] = CANDIDATES) -> str | None:
  """The first of `patterns` (file-name patterns, in order of preference) installed in `dirs` (default
  library_dirs()), or None."""
  for pattern in patterns:
    for d in library_dirs() if dirs is None else dirs:
      # the versioned file (libtcmalloc_minimal.so.4), not a development symlink that may point nowhere
      hits = sorted(p for p in glob.glob(os.path.join(d, pattern)) if os.path.isfile(p))
      if hits:
        return min(hits, key=len)  # libtcmalloc_minimal.so.4 before libtcmalloc_minimal.so.4.5.10
  return None


def preloaded(env: Mapping[str, str] | None = None) -> str | None:
  """The malloc library already in LD_PRELOAD, if any."""
  env = os.environ if env is None else env
  for entry in env.get("LD_PRELOAD", "").replace(":", " ").split():
    if any(name in os.path.basename(entry) for name in _KNOWN):
      return entry
  return None


def plan(env: Mapping[str, str] | None = None, dirs: Sequence[str] | None = None) -> dict[str, str] | None:
  """The environment to re-execute with, or None when this process should run as it is."""
  env = dict(os.environ if env is None else env)
  choice = env.get(ENV, "auto").strip() or "auto"
  if choice == "system" or CHOSEN_ENV in env or preloaded(env) or not sys.platform.startswith("linux"):
    return None
  if choice == "auto":
    library = find(dirs)
    if library is None:
      return None
  else:
    if not os.path.isfile(choice):
      raise SystemExit(f"clipvip_jax: {ENV}={choice!r}: no such file (give 'auto', 'system' or the path of a "
                       "malloc library such as /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4)")
    library = choice
  env["LD_PRELOAD"] = " ".join(filter(None, [library, env.get("LD_PRELOAD", "")]))
  env[CHOSEN_ENV] = library
  if "jemalloc" in os.path.basename(library) and "MALLOC_CONF" not in env:
    env["MALLOC_CONF"] = JEMALLOC_CONF
  return env


def use_preferred() -> None:
  """Re-executes this process with the preferred malloc preloaded where one is installed and not yet loaded;
  returns otherwise. Call it first in a command's `__main__` block, before any work."""
  env = plan()
  if env is None:
    return
  argv = list(getattr(sys, "orig_argv", []) or [])
  if not argv or sys.executable is None:
    return  # an embedded interpreter: nothing to re-execute
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv[1:]], env)


def describe() -> str:
  """One phrase for logs: which malloc this process runs with."""
  library = preloaded()
  if library:
    return f"host allocator {os.path.basename(library)}"
  hint = " (apt-get install libtcmalloc-minimal4 makes CPU steps faster)" if find() is None else ""
  return f"host allocator glibc malloc{hint}"
