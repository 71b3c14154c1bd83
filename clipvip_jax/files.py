"""File safety: every writer in the project publishes through these three steps, so a reader (or a relaunch after a
kill) sees the old file or folder, or the new one, never half of either.

  write_json_atomic(path, value)      a JSON file written under a temporary name in the same folder, then renamed
  replace_dir(tmp, out)               a finished folder takes `out`'s place (atomic exchange where Linux offers it)
  remove(path)                        a file, a link or a folder, gone; missing is fine

Temporaries are named `.NAME.tmp-PID` beside their target: the same file system (rename is atomic only there), and
the pid lets a relaunch tell its own leftovers from a live process's (`temporary_name`, `is_temporary`).
"""

from __future__ import annotations

import ctypes
import json
import os
import pathlib
import shutil
from typing import Any


def temporary_name(path: str | os.PathLike, kind: str = "tmp") -> pathlib.Path:
  """`.NAME.<kind>-PID` beside `path`: hidden, on the same file system, owned by this process."""
  path = pathlib.Path(path)
  return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def is_temporary(name: str) -> bool:
  return name.startswith(".") and (".tmp-" in name or ".old-" in name)


def remove(path: str | os.PathLike) -> None:
  """Removes a file, a symlink (never what it points to) or a folder tree; a missing path is not an error."""
  path = pathlib.Path(path)
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  elif path.exists() or path.is_symlink():
    path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  path = pathlib.Path(path)
  tmp = temporary_name(path)
  try:
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
  except BaseException:
    remove(tmp)
    raise


def write_json_atomic(path: str | os.PathLike, value: Any, *, indent: int = 2) -> None:
  """`value` as UTF-8 JSON (non-ASCII kept) at `path`, replacing any earlier file in one rename."""
  write_text_atomic(path, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
  """Swaps two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the call is unavailable."""
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):
    return False
  at_fdcwd, rename_exchange = -100, 2
  return renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


def replace_dir(tmp: str | os.PathLike, out: str | os.PathLike) -> None:
  """The finished folder `tmp` becomes `out`. A new `out` is a plain rename; an existing one is swapped in one atomic
  exchange and the old copy removed afterwards. Without renameat2 the old folder is renamed aside first: `out` is
  briefly absent, never half-written, and a failure between the two renames leaves the old copy beside it."""
  tmp, out = pathlib.Path(tmp), pathlib.Path(out)
  if not out.exists():
    tmp.rename(out)
    return
  if _exchange(tmp, out):
    remove(tmp)  # now the old folder
    return
  old = temporary_name(out, "old")
  remove(old)
  out.rename(old)
  tmp.rename(out)
  remove(old)
