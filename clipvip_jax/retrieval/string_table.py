"""Row names and captions of an index part, seekable without reading them all: NAME.utf8 + NAME.offsets.npy.

NAME.utf8 is every string's UTF-8 bytes back to back; NAME.offsets.npy (int64 [n + 1]) where each starts, so
string i is utf8[offsets[i]:offsets[i + 1]]. Both are memory-mapped on read: looking up the ten ids of a search
result touches ten small slices, however many millions of rows the index has (a JSON list would be parsed
whole, on every search).
"""

from __future__ import annotations

import os
import pathlib
from typing import Callable, Sequence

import numpy as np

from clipvip_jax.retrieval.index_checks import VERIFY_HINT, IndexDamaged, inside

BYTES_SUFFIX = ".utf8"
OFFSETS_SUFFIX = ".offsets.npy"


def write_strings(folder: pathlib.Path, name: str, strings: Sequence[str]) -> None:
  """folder/name.utf8 + folder/name.offsets.npy (the caller makes the folder atomic as a whole)."""
  encoded = [s.encode("utf-8") for s in strings]
  offsets = np.zeros(len(encoded) + 1, np.int64)
  np.cumsum([len(b) for b in encoded], out=offsets[1:])
  (folder / f"{name}{BYTES_SUFFIX}").write_bytes(b"".join(encoded))
  np.save(folder / f"{name}{OFFSETS_SUFFIX}", offsets)


def has_strings(folder: pathlib.Path, name: str) -> bool:
  """Whether the table is there (a link counts, even a broken one: StringTable then says what is wrong)."""
  return os.path.lexists(folder / f"{name}{OFFSETS_SUFFIX}")


class StringTable:
  """Read side: len(table), table[i] -> str, both O(1) in the table's size. Opening checks the offsets' type,
  count and end against the bytes file (both inside the index folder, `root`); each lookup checks its own slice
  (0 <= start <= stop <= size) and decodes strictly, so a damaged or hostile table raises IndexDamaged naming the
  file and entry instead of reading outside it. `problems()` checks every entry at once (index verify)."""

  def __init__(self, folder: pathlib.Path, name: str, expected_count: int, root: pathlib.Path | None = None):
    root = folder if root is None else root
    rel = folder.relative_to(root).parts if folder != root else ()
    offsets_path, bytes_path = folder / f"{name}{OFFSETS_SUFFIX}", folder / f"{name}{BYTES_SUFFIX}"
    for path in (offsets_path, bytes_path):
      if not os.path.lexists(path):
        raise IndexDamaged(f"index part {folder} has no {path.name} (the part is incomplete; re-run the encode)")
      inside(root, *rel, path.name)
    self.offsets_path, self.bytes_path = offsets_path, bytes_path
    try:
      self._offsets = np.load(offsets_path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
      raise IndexDamaged(f"{offsets_path} is not a readable .npy array ({e}); the part is damaged") from None
    if not np.issubdtype(self._offsets.dtype, np.integer):
      raise IndexDamaged(f"{offsets_path} holds {self._offsets.dtype}, not integer offsets; the part is damaged")
    if self._offsets.ndim != 1:
      raise IndexDamaged(f"{offsets_path} has shape {self._offsets.shape}, not one offset per entry plus one")
    if self._offsets.shape != (expected_count + 1,):
      raise IndexDamaged(f"{offsets_path} holds {self._offsets.shape[0] - 1} entries but the index describes "
                         f"{expected_count} rows for this part")
    size = os.path.getsize(bytes_path)
    if int(self._offsets[0]) != 0:
      raise IndexDamaged(f"{offsets_path} starts at {int(self._offsets[0])}, not 0 (damaged part)")
    if int(self._offsets[-1]) != size:
      raise IndexDamaged(f"{bytes_path} has {size} bytes but its offsets end at {int(self._offsets[-1])} "
                         "(truncated or damaged part)")
    self._size = size
    # np.memmap refuses empty files; an all-empty table (or an empty part) is just b"".
    self._bytes = np.memmap(bytes_path, np.uint8, "r") if size else np.zeros(0, np.uint8)

  def __len__(self) -> int:
    return self._offsets.shape[0] - 1

  def __getitem__(self, i: int) -> str:
    if not 0 <= i < len(self):
      raise IndexError(f"entry {i} is outside {self.bytes_path}'s {len(self)} entries")
    start, stop = int(self._offsets[i]), int(self._offsets[i + 1])
    if not 0 <= start <= stop <= self._size:
      raise IndexDamaged(f"{self.offsets_path}: entry {i} spans bytes {start}..{stop}, outside {self.bytes_path} "
                         f"({self._size} bytes); the part is damaged ({VERIFY_HINT} lists every problem)")
    try:
      return self._bytes[start:stop].tobytes().decode("utf-8")
    except UnicodeDecodeError as e:
      raise IndexDamaged(f"{self.bytes_path}: entry {i} is not valid UTF-8 ({e.reason} at byte {start + e.start}); "
                         f"the part is damaged ({VERIFY_HINT} lists every problem)") from None

  def all(self) -> list[str]:
    return [self[i] for i in range(len(self))]

  def problems(self, check: Callable[[int, str], str | None] | None = None, limit: int = 5) -> list[str]:
    """Every entry checked (slice bounds, UTF-8, then `check(i, text)` -> a problem or None), at most `limit`
    problems named, plus a count of the rest."""
    offsets = np.asarray(self._offsets, np.int64)
    found: list[str] = []
    bad = np.flatnonzero((offsets[1:] < offsets[:-1]) | (offsets[1:] > self._size) | (offsets[:-1] < 0))
    for i in bad[:limit].tolist():
      found.append(f"{self.offsets_path}: entry {i} spans bytes {int(offsets[i])}..{int(offsets[i + 1])}, outside "
                   f"{self.bytes_path} ({self._size} bytes) or backwards")
    more = max(0, len(bad) - limit)
    if not len(bad):
      for i in range(len(self)):
        try:
          text = self[i]
          problem = check(i, text) if check is not None else None
        except IndexDamaged as e:
          problem = str(e).split(f" ({VERIFY_HINT}")[0]
        if problem:
          if len(found) < limit:
            found.append(problem)
          else:
            more += 1
    if more:
      found.append(f"{self.bytes_path}: {more} more damaged entries")
    return found
