"""Row names and captions of an index part, seekable without reading them all: NAME.utf8 + NAME.offsets.npy.

NAME.utf8 is every string's UTF-8 bytes back to back; NAME.offsets.npy (int64 [n + 1]) where each starts, so
string i is utf8[offsets[i]:offsets[i + 1]]. Both are memory-mapped on read: looking up the ten ids of a search
result touches ten small slices, however many millions of rows the index has (a JSON list would be parsed
whole, on every search).
"""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

import numpy as np

from clipvip_jax.cli_errors import UsageError

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
  return (folder / f"{name}{OFFSETS_SUFFIX}").is_file()


class StringTable:
  """Read side: len(table), table[i] -> str, both O(1) in the table's size."""

  def __init__(self, folder: pathlib.Path, name: str, expected_count: int):
    offsets_path, bytes_path = folder / f"{name}{OFFSETS_SUFFIX}", folder / f"{name}{BYTES_SUFFIX}"
    for path in (offsets_path, bytes_path):
      if not path.is_file():
        raise UsageError(f"index part {folder} has no {path.name} (the part is incomplete; re-run the encode)")
    try:
      self._offsets = np.load(offsets_path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
      raise UsageError(f"{offsets_path} is not a readable .npy array ({e}); the part is damaged") from None
    if self._offsets.shape != (expected_count + 1,):
      raise UsageError(f"{offsets_path} holds {self._offsets.shape[0] - 1} entries but the index describes "
                       f"{expected_count} rows for this part")
    size = os.path.getsize(bytes_path)
    if int(self._offsets[-1]) != size:
      raise UsageError(f"{bytes_path} has {size} bytes but its offsets end at {int(self._offsets[-1])} "
                       "(truncated or damaged part)")
    # np.memmap refuses empty files; an all-empty table (or an empty part) is just b"".
    self._bytes = np.memmap(bytes_path, np.uint8, "r") if size else np.zeros(0, np.uint8)

  def __len__(self) -> int:
    return self._offsets.shape[0] - 1

  def __getitem__(self, i: int) -> str:
    start, stop = int(self._offsets[i]), int(self._offsets[i + 1])
    return self._bytes[start:stop].tobytes().decode("utf-8")

  def all(self) -> list[str]:
    return [self[i] for i in range(len(self))]
