"""Random-access sources of serialised clip records.

The pipeline reads from anything with `__len__` and `__getitem__(int) -> bytes` holding `records.encode_record`
output: the ArrayRecord shards of one split (`open_split`), or a wrapper around `tfds.data_source(...)`.
`KeyedSource` is the form the Grain loader consumes: it hands each worker `(record_key, bytes)` and turns a read
failure (a damaged ArrayRecord chunk) into empty bytes, so the damage is counted downstream like any other corrupt
record instead of killing a worker.
"""

from __future__ import annotations

import logging
import pathlib
import re
from typing import Any, Protocol, Sequence

from data_pipelines import manifest

_SHARD_NAME = re.compile(r"^(?P<split>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.array_record$")


class RecordSource(Protocol):
  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> bytes: ...


TFDS_PREFIX = "tfds:"


def shard_paths(shard_dir: str | pathlib.Path, split: str) -> list[str]:
  """The ArrayRecord files of one split, in shard order.

  A folder with manifest.json (every builder of this project writes one, last) is read through
  `manifest.shard_paths`, which also rejects a newer record schema and a missing split. A folder without one
  falls back to the files named `{split}-{i:05d}-of-{n:05d}.array_record`. Raises FileNotFoundError naming the
  folder and split when there are none, or when the shard set is incomplete.
  """
  if str(shard_dir).startswith(TFDS_PREFIX):
    # A TFDS-prepared dataset: check that the split opens and is non-empty; its files are TFDS's business.
    try:
      n = len(open_split(shard_dir, split))
    except Exception as e:  # tfds raises several types for a missing dataset, config or split
      raise FileNotFoundError(f"{shard_dir}: split {split!r} cannot be opened ({e})") from e
    if n == 0:
      raise FileNotFoundError(f"{shard_dir}: split {split!r} is empty")
    return [f"{shard_dir}#{split}"]
  root = pathlib.Path(shard_dir)
  if not root.is_dir():
    raise FileNotFoundError(f"shard folder {root} does not exist")
  if (root / manifest.MANIFEST_NAME).exists():
    names = [pathlib.Path(p).name for p in manifest.shard_paths(str(root), split)]
  else:
    found = sorted((m.group("index"), m.group("count"), p.name) for p in root.iterdir()
                   if (m := _SHARD_NAME.match(p.name)) and m.group("split") == split)
    counts = {count for _, count, _ in found}
    if len(counts) > 1:
      raise ValueError(f"{root}: split {split!r} mixes shard sets with counts {sorted(counts)}")
    if found and int(found[0][1]) != len(found):
      raise FileNotFoundError(f"{root}: split {split!r} has {len(found)} of {int(found[0][1])} shards")
    names = [name for _, _, name in found]
  paths = [str(root / name) for name in names]
  if not paths:
    raise FileNotFoundError(f"no shards for split {split!r} in {root}")
  missing = [p for p in paths if not pathlib.Path(p).exists()]
  if missing:
    raise FileNotFoundError(f"{root}: split {split!r} lists missing shard file(s) {missing[:3]}")
  for path in paths:
    check_shard(path)
  return paths


class DamagedShardError(ValueError):
  """A shard file that ArrayRecord cannot open (truncated by a failed copy, a full disk, a killed writer)."""


def check_shard(path: str | pathlib.Path) -> None:
  """Raises DamagedShardError naming `path` when its ArrayRecord footer does not read back.

  A truncated file opens without an exception and reports zero records (`ok()` is False); the Riegeli error
  only comes when the reader is closed, deep inside Grain, without the file's name. Opening reads the footer
  and the chunk index only (milliseconds per shard), so every reader checks its shards up front.
  """
  from array_record.python.array_record_module import ArrayRecordReader  # deferred, like grain below
  detail = ""
  try:
    reader = ArrayRecordReader(str(path))
    ok = reader.ok()
    try:
      reader.close()
    except RuntimeError as e:  # the reason of a failed open surfaces here
      ok, detail = False, str(e)
  except (RuntimeError, OSError) as e:
    ok, detail = False, str(e)
  if not ok:
    # Riegeli's reason ends "...; at byte N; Failed to read RiegeliPostscript": its first clause is enough.
    reason = detail.split(";")[0].strip() or "its footer does not read back"
    raise DamagedShardError(f"shard file {path} is damaged or truncated ({reason}); copy or rebuild it again")


def open_split(shard_dir: str | pathlib.Path, split: str) -> RecordSource:
  """The records of `split`, picklable (each worker reopens the files).

  `shard_dir` is a folder of our shards (build_shards, synthetic) or, for datasets prepared by the TFDS builders
  in data_pipelines/tfds, `tfds:NAME[@DATA_DIR]` (e.g. `tfds:msrvtt/9k@/data/tfds`) or `tfds:/path/to/version/dir`:
  every reader of `data.shard_dir` (trainer, eval, encode) takes either form.
  """
  spec = str(shard_dir)
  if spec.startswith(TFDS_PREFIX):
    from data_pipelines.tfds.common import TfdsRecordSource  # deferred: tfds is heavy to import

    name, _, data_dir = spec[len(TFDS_PREFIX):].partition("@")
    if not name:
      raise ValueError(f"data.shard_dir {spec!r}: expected tfds:NAME[@DATA_DIR]")
    return TfdsRecordSource(name, split, data_dir or None)
  import grain  # deferred: keeps `sources` importable for tools that only list shards

  return grain.sources.ArrayRecordDataSource(shard_paths(shard_dir, split))


def check_source(source: Any) -> None:
  if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
    raise TypeError(f"a clip source needs __len__ and __getitem__, got {type(source).__name__}")
  if len(source) == 0:
    raise ValueError("the clip source is empty")


class KeyedSource:
  """`(record_key, bytes)` per key over a subset (`keys`) of a record source; read errors give b""."""

  def __init__(self, source: RecordSource, keys: Sequence[int] | None = None):
    check_source(source)
    self._source = source
    self._keys = None if keys is None else list(keys)

  def __len__(self) -> int:
    return len(self._source) if self._keys is None else len(self._keys)

  def __getitem__(self, index: int) -> tuple[int, bytes]:
    key = int(index) if self._keys is None else self._keys[int(index)]
    try:
      data = self._source[key]
    except Exception as e:  # noqa: BLE001 — any storage error is a corrupt record, counted by the decoder
      logging.warning("clip record %d could not be read: %s", key, e)
      return key, b""
    if not isinstance(data, (bytes, bytearray, memoryview)):
      logging.warning("clip record %d is %s, not bytes", key, type(data).__name__)
      return key, b""
    return key, bytes(data)

  def __repr__(self) -> str:
    # Grain stores repr(data_source) in the iterator state and checks it on restore. In-memory sequences are named
    # by type only (as grain does for lists), or the state would hold every record; so are objects without their
    # own __repr__, whose default repr holds a memory address that differs in the resumed process.
    plain = isinstance(self._source, (list, tuple)) or type(self._source).__repr__ is object.__repr__
    inner = type(self._source).__qualname__ if plain else repr(self._source)
    return f"KeyedSource({inner}, {len(self)} records)"
