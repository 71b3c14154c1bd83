"""The embedding index on disk: sharded parts, memory-mapped, for millions of rows.

    DIR/index.json                         what the index holds (below); written last: no index.json, no index
    DIR/parts/part-00000/embeddings.npy    [rows, D] float32 or float16, row order = input order
                        /ids.utf8 + ids.offsets.npy             row names (clip ids, video paths, text lines)
                        /captions.utf8 + captions.offsets.npy   shard sets: each clip's captions as a JSON list
                        /spans.npy         moment indexes (encode --window): float64 [rows, 2], each row's
                                           (start, end) seconds in its video; the ids are the videos' ids
                        /part.json         {"first_input", "inputs", "rows", "skipped": [{"id", "reason"}]}
    DIR/approximate/                       optional approximate-search index (clipvip_jax.retrieval.approximate)

index.json (format_version 2):
  {"format_version": 2, "created_by": "clipvip_jax.encode", "kind", "checkpoint", "step", "config",
   "trust_pickle", "modality": "video" | "text", "source", "options": {recipe, fps, split, batch_size},
   "dims": D, "dtype": "float32" | "float16", "count": N, "inputs": inputs seen (encoded + skipped),
   "part_size": inputs per part, "parts": [{"name": "part-00000", "rows": n}], "skipped": count,
   "captions": true | false, "windows": {"window": W, "stride": S} (moment indexes only; absent: one row a clip),
   "generation": appends and deletions since the first encode, "deleted": [ids deleted with index delete --id]}

A part covers a fixed range of inputs (part_size of them), so which inputs a part holds depends only on the input
list and part_size, never on how many processes or devices encoded it: that is what makes an interrupted encode
resumable part by part and a multi-process encode identical to a single-process one. Each part folder is written
under a temporary name and renamed, so a part exists whole or not at all. Embeddings are opened with
mmap_mode="r": opening an index reads index.json and the .npy headers, nothing else; search streams the rows.

Format version 1 (embeddings.npy + index.json with the ids as one JSON list, written before the parts) still
opens, as one part held in memory; `info` names it and how to rebuild it in the current format.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from clipvip_jax.runtime.cli_errors import UsageError
from clipvip_jax.files import remove, replace_dir, write_json_atomic  # noqa: F401  (remove, write_json_atomic: used by the indexer through this module)
from clipvip_jax.retrieval.index_checks import (VERIFY_HINT, IndexDamaged, check_part_name, exists_inside, inside,
                                                meta_problems, part_info_problems, read_json)
from clipvip_jax.retrieval.string_table import StringTable, has_strings, write_strings

FORMAT_VERSION = 2
LEGACY_VERSION = 1
INDEX_FILE = "index.json"
PARTS_DIR = "parts"
PART_FILE = "part.json"
EMBEDDINGS_FILE = "embeddings.npy"
SPANS_FILE = "spans.npy"
MODALITIES = ("video", "text")
DTYPES = ("float32", "float16")
REQUIRED = ("kind", "checkpoint", "modality", "count", "dims")


def part_name(number: int) -> str:
  return f"part-{number:05d}"


@dataclasses.dataclass
class Part:
  """One part, opened: embeddings memory-mapped, ids/captions seekable."""
  name: str
  folder: pathlib.Path
  embeddings: np.ndarray  # [rows, D], np.memmap for format 2
  ids: StringTable | list[str]
  captions: StringTable | list[list[str]] | None
  spans: np.ndarray | None = None  # [rows, 2] float64 (start, end) seconds, moment indexes only

  @property
  def rows(self) -> int:
    return int(self.embeddings.shape[0])


@dataclasses.dataclass
class EmbeddingIndex:
  """An opened index. Rows are numbered 0..count-1 across parts, in input order."""
  path: pathlib.Path
  meta: dict[str, Any]
  parts: list[Part]

  def __post_init__(self):
    self.row_starts = np.concatenate([[0], np.cumsum([p.rows for p in self.parts])]).astype(np.int64)

  @property
  def count(self) -> int:
    return int(self.row_starts[-1])

  @property
  def dims(self) -> int:
    return int(self.meta["dims"])

  @property
  def dtype(self) -> str:
    return str(self.meta.get("dtype", "float32"))

  @property
  def kind(self) -> str:
    return self.meta["kind"]

  @property
  def modality(self) -> str:
    return self.meta["modality"]

  @property
  def format_version(self) -> int:
    return int(self.meta["format_version"])

  @property
  def moments(self) -> bool:
    """Whether the rows are windows of videos (encode --window): each row's id is its video, span() its time."""
    return isinstance(self.meta.get("windows"), dict)

  def span(self, row: int) -> tuple[float, float] | None:
    """(start, end) seconds of a moment row in its video; None in a whole-clip index."""
    part, local = self._locate(int(row))
    if part.spans is None:
      return None
    start, end = (float(v) for v in part.spans[local])
    return start, end

  def spans(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
    """float64 [len(rows), 2] (start, end) of the given rows; NaN for rows of a part without spans."""
    rows = np.asarray(rows, np.int64)
    out = np.full((len(rows), 2), np.nan)
    parts = np.searchsorted(self.row_starts, rows, side="right") - 1
    for p in np.unique(parts):
      if self.parts[p].spans is not None:
        sel = parts == p
        out[sel] = self.parts[p].spans[rows[sel] - self.row_starts[p]]
    return out

  def _locate(self, row: int) -> tuple[Part, int]:
    if not 0 <= row < self.count:
      raise IndexError(f"row {row} is outside the index's {self.count} rows")
    p = int(np.searchsorted(self.row_starts, row, side="right")) - 1
    return self.parts[p], row - int(self.row_starts[p])

  def id(self, row: int) -> str:
    part, local = self._locate(int(row))
    return part.ids[local]

  def captions(self, row: int) -> list[str]:
    part, local = self._locate(int(row))
    if part.captions is None:
      return []
    value = part.captions[local]
    if not isinstance(value, str):
      return list(value)
    return parse_captions(value, part.captions, local)

  @property
  def ids(self) -> list[str]:
    """Every row name (reads all of them: for small indexes and tests; search looks up only its results)."""
    return [self.id(r) for r in range(self.count)]

  def embeddings(self) -> np.ndarray:
    """Every row as one float32 array in memory (small indexes and tests; search streams `chunks` instead)."""
    if not self.parts:
      return np.zeros((0, self.dims), np.float32)
    return np.concatenate([np.asarray(p.embeddings, np.float32) for p in self.parts])

  def rows(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
    """float32 [len(rows), D]: the embeddings of the given rows (a re-ranking reads only these)."""
    rows = np.asarray(rows, np.int64)
    out = np.empty((len(rows), self.dims), np.float32)
    parts = np.searchsorted(self.row_starts, rows, side="right") - 1
    for p in np.unique(parts):
      sel = parts == p
      out[sel] = self.parts[p].embeddings[rows[sel] - self.row_starts[p]]
    return out

  def chunks(self, chunk_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, [<= chunk_rows, D] view in the stored dtype) over the whole index, part by part."""
    for start, part in zip(self.row_starts[:-1].tolist(), self.parts):
      for offset in range(0, part.rows, chunk_rows):
        yield start + offset, part.embeddings[offset:offset + chunk_rows]

  def skipped(self) -> list[dict[str, str]]:
    """The inputs that could not be encoded, from every part's part.json (format 1: from index.json)."""
    if self.format_version == LEGACY_VERSION:
      return list(self.meta.get("skipped") or [])
    out = []
    for part in self.parts:
      out.extend(read_part_info(self.path, part.name).get("skipped", []))
    return out


def parse_captions(value: str, table: StringTable, local: int) -> list[str]:
  """One entry of a captions table: a JSON list of strings, or IndexDamaged naming the file and entry."""
  try:
    captions = json.loads(value)
  except (json.JSONDecodeError, RecursionError):
    captions = None
  if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
    raise IndexDamaged(f"{table.bytes_path}: entry {local} is not a JSON list of captions; the part is damaged "
                       f"({VERIFY_HINT} lists every problem)")
  return captions


def read_part_info(root: pathlib.Path, name: str) -> dict[str, Any]:
  """parts/NAME/part.json, checked (inside the index, JSON, fields of the right types)."""
  path = inside(root, PARTS_DIR, name, PART_FILE)
  info = read_json(path)
  problems = part_info_problems(info, path)
  if problems:
    raise IndexDamaged(problems[0])
  return info


# ------------------------------------------------------------------------------------------------ writing


def check_out_dir(out_dir: str | os.PathLike, force: bool, finished_ok: bool = False) -> pathlib.Path:
  """Refuses (UsageError) an output that exists, unless `force` and it is an index or an empty folder: --force
  must never delete a folder that holds something else. finished_ok: an index there is let through (encode then
  compares it with what it was asked to write: the same is a finished encode, exit 0)."""
  out = pathlib.Path(out_dir)
  if out.exists():
    if not out.is_dir():
      raise UsageError(f"--out {out} exists and is not a directory")
    if finished_ok and not force and (out / INDEX_FILE).is_file():
      return out
    if not force:
      raise UsageError(f"--out {out} already exists (pass --force to replace the index in it)")
    if any(out.iterdir()) and not (out / INDEX_FILE).is_file():
      raise UsageError(f"--out {out} is a non-empty folder without {INDEX_FILE}; refusing to replace it")
  if not out.absolute().parent.exists():
    raise UsageError(f"--out {out}: the parent folder {out.absolute().parent} does not exist")
  return out


def write_part(root: pathlib.Path, name: str, embeddings: np.ndarray, ids: Sequence[str],
               captions: Sequence[Sequence[str]] | None, info: Mapping[str, Any], dtype: str,
               spans: np.ndarray | None = None) -> pathlib.Path:
  """root/parts/<name>/, written under a temporary name and renamed: a part is there whole or not at all."""
  if dtype not in DTYPES:
    raise UsageError(f"index dtype {dtype!r} is not one of {DTYPES}")
  embeddings = np.asarray(embeddings)
  if embeddings.ndim != 2 or embeddings.shape[0] != len(ids):
    raise ValueError(f"part {name}: embeddings {embeddings.shape} do not match {len(ids)} ids")
  bad = non_finite_rows(embeddings)
  if len(bad):
    raise ValueError(f"part {name}: {len(bad)} row(s) hold NaN or infinite values (first: {ids[int(bad[0])]!r}); "
                     "an index holds finite rows only")
  parts = root / PARTS_DIR
  parts.mkdir(parents=True, exist_ok=True)
  final = parts / name
  tmp = parts / f".{name}.tmp-{os.getpid()}"
  remove(tmp)
  try:
    tmp.mkdir()
    np.save(tmp / EMBEDDINGS_FILE, embeddings.astype(dtype))
    write_strings(tmp, "ids", ids)
    if captions is not None:
      write_strings(tmp, "captions", [json.dumps(list(c), ensure_ascii=False) for c in captions])
    if spans is not None:
      np.save(tmp / SPANS_FILE, np.asarray(spans, np.float64).reshape(len(ids), 2))
    (tmp / PART_FILE).write_text(json.dumps({**info, "rows": len(ids)}, ensure_ascii=False) + "\n",
                                 encoding="utf-8")
    remove(final)
    tmp.rename(final)
  except BaseException:
    remove(tmp)
    raise
  return final


def non_finite_rows(rows: np.ndarray) -> np.ndarray:
  """Row numbers of a [n, D] array that hold a NaN or an infinity."""
  rows = np.asarray(rows)
  return np.flatnonzero(~np.isfinite(rows).all(axis=1)) if rows.size else np.zeros(0, np.int64)


def finished_parts(root: pathlib.Path) -> set[str]:
  parts = root / PARTS_DIR
  if not parts.is_dir():
    return set()
  return {p.name for p in parts.iterdir() if p.is_dir() and not p.name.startswith(".")}


def finish_index(root: pathlib.Path, meta: Mapping[str, Any], part_names: Sequence[str]) -> dict[str, Any]:
  """Writes root/index.json describing `part_names` (all written): the step that makes root an index."""
  parts, skipped, has_captions = [], 0, False
  for name in part_names:
    info = json.loads((root / PARTS_DIR / name / PART_FILE).read_text(encoding="utf-8"))
    parts.append({"name": name, "rows": int(info["rows"])})
    skipped += len(info.get("skipped", []))
    has_captions = has_captions or has_strings(root / PARTS_DIR / name, "captions")
  full = {"format_version": FORMAT_VERSION, **meta, "count": sum(p["rows"] for p in parts), "parts": parts,
          "skipped": skipped, "captions": has_captions}
  write_json_atomic(root / INDEX_FILE, full)
  return full


def publish(staging: pathlib.Path, out: pathlib.Path) -> None:
  """The finished staging folder becomes `out`; an existing index there (--force) is swapped out whole, so a reader
  never sees a mix."""
  replace_dir(staging, out)


def write_index(out_dir: str | os.PathLike, embeddings: np.ndarray, ids: Sequence[str], meta: Mapping[str, Any], *,
                captions: Sequence[Sequence[str]] | None = None, dtype: str = "float32", part_rows: int = 1 << 20,
                force: bool = False, spans: np.ndarray | None = None) -> pathlib.Path:
  """An index from in-memory rows (tests, benchmarks, small sets), parts of `part_rows`; written atomically.
  spans: [rows, 2] (start, end) seconds: a moment index (meta must then hold "windows")."""
  out = check_out_dir(out_dir, force)
  staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
  remove(staging)
  try:
    staging.mkdir()
    names = []
    for number, start in enumerate(range(0, max(len(ids), 1), part_rows)):
      stop = min(start + part_rows, len(ids))
      names.append(part_name(number))
      write_part(staging, names[-1], embeddings[start:stop], ids[start:stop],
                 None if captions is None else captions[start:stop],
                 {"first_input": start, "inputs": stop - start, "skipped": []}, dtype,
                 None if spans is None else spans[start:stop])
    finish_index(staging, {**meta, "dims": int(np.shape(embeddings)[1]), "dtype": dtype, "inputs": len(ids),
                           "part_size": part_rows}, names)
    publish(staging, out)
  except BaseException:
    remove(staging)
    raise
  return out


# ------------------------------------------------------------------------------------------------ reading


def _read_meta(root: pathlib.Path) -> dict[str, Any]:
  index_path = root / INDEX_FILE
  if not os.path.lexists(index_path):
    from clipvip_jax.retrieval.indexer import unfinished_encode
    unfinished = unfinished_encode(root)
    if unfinished:
      raise UsageError(unfinished)
    if not root.is_dir():
      raise UsageError(f"index directory {root} does not exist")
    raise UsageError(f"{root} has no {INDEX_FILE} (not an index written by python -m clipvip_jax.encode)")
  if not root.is_dir():
    raise UsageError(f"index directory {root} is not a folder")
  meta = read_json(inside(root, INDEX_FILE))
  problems = meta_problems(meta, index_path, modalities=MODALITIES, dtypes=DTYPES,
                           versions=(FORMAT_VERSION, LEGACY_VERSION))
  if problems:
    raise IndexDamaged(problems[0])
  return meta


def _open_embeddings(root: pathlib.Path, names: Sequence[str], rows: int, dims: int, dtype: str | None) -> np.ndarray:
  path = root.joinpath(*names)
  if not exists_inside(root, *names):
    raise IndexDamaged(f"{path} is missing (the index is incomplete; rebuild it with python -m clipvip_jax.encode)")
  inside(root, *names)
  try:
    emb = np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise IndexDamaged(f"{path} is not a readable .npy array, probably truncated ({e}); rebuild the index") from None
  if emb.ndim != 2 or tuple(emb.shape) != (rows, dims):
    raise IndexDamaged(f"{path} has shape {tuple(emb.shape)} but the index describes {rows} rows of {dims} dims")
  if dtype is not None and emb.dtype != np.dtype(dtype):
    raise IndexDamaged(f"{path} holds {emb.dtype} but the index describes {dtype} embeddings")
  if not np.issubdtype(emb.dtype, np.floating):
    raise IndexDamaged(f"{path} holds {emb.dtype}, not float embeddings")
  return emb


def _open_spans(root: pathlib.Path, name: str, rows: int) -> np.ndarray:
  """parts/NAME/spans.npy of a moment index, checked whole (16 bytes a row: read at open, never trusted): float64
  [rows, 2], every row finite with 0 <= start < end."""
  path = root / PARTS_DIR / name / SPANS_FILE
  if not exists_inside(root, PARTS_DIR, name, SPANS_FILE):
    raise IndexDamaged(f"{path} is missing (a moment index holds each row's time span; rebuild it with python -m "
                       "clipvip_jax.encode)")
  inside(root, PARTS_DIR, name, SPANS_FILE)
  try:
    spans = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise IndexDamaged(f"{path} is not a readable .npy array ({e}); rebuild the index") from None
  if spans.dtype != np.float64 or spans.shape != (rows, 2):
    raise IndexDamaged(f"{path} holds {spans.dtype} {tuple(spans.shape)} but the part has {rows} rows: float64 "
                       f"({rows}, 2) expected")
  bad = np.flatnonzero(~(np.isfinite(spans).all(axis=1) & (spans[:, 0] >= 0) & (spans[:, 0] < spans[:, 1])))
  if len(bad):
    raise IndexDamaged(f"{path}: row {int(bad[0])} has the span {spans[bad[0]].tolist()}, not 0 <= start < end in "
                       "seconds")
  return spans


def _read_legacy(root: pathlib.Path, meta: dict[str, Any]) -> EmbeddingIndex:
  """Format 1: one embeddings.npy and the ids as a JSON list; opened as a single part (fields checked already)."""
  count, dims = meta["count"], meta["dims"]
  emb = _open_embeddings(root, [EMBEDDINGS_FILE], count, dims, None)
  meta = {**meta, "dtype": str(emb.dtype)}
  return EmbeddingIndex(root, meta, [Part("embeddings", root, emb, list(meta["ids"]), meta.get("captions"))])


def read_index(index_dir: str | os.PathLike) -> EmbeddingIndex:
  """The index in `index_dir`, checked (every field of index.json typed, every file inside the folder, every part
  present, shapes and counts as index.json says); embeddings memory-mapped. Raises UsageError (IndexDamaged for a
  damaged or hostile file), one sentence naming the file, for anything missing, truncated, off or outside."""
  root = pathlib.Path(index_dir)
  meta = _read_meta(root)
  if meta["format_version"] == LEGACY_VERSION:
    return _read_legacy(root, meta)
  dims, dtype = meta["dims"], str(meta.get("dtype", "float32"))
  windows = isinstance(meta.get("windows"), dict)
  parts = []
  for entry in meta["parts"]:
    name = check_part_name(entry["name"], f"{root / INDEX_FILE}: a part's name")
    folder = root / PARTS_DIR / name
    if not exists_inside(root, PARTS_DIR, name):
      raise IndexDamaged(f"index part {folder} is missing (the index is incomplete; rebuild it with python -m "
                         "clipvip_jax.encode)")
    inside(root, PARTS_DIR, name, kind="dir")
    rows = entry["rows"]
    emb = _open_embeddings(root, [PARTS_DIR, name, EMBEDDINGS_FILE], rows, dims, dtype)
    ids = StringTable(folder, "ids", rows, root)
    captions = StringTable(folder, "captions", rows, root) if has_strings(folder, "captions") else None
    spans = _open_spans(root, name, rows) if windows else None
    parts.append(Part(name, folder, emb, ids, captions, spans))
  index = EmbeddingIndex(root, meta, parts)
  if index.count != meta["count"]:
    raise IndexDamaged(f"{root / INDEX_FILE} says {meta['count']} rows but its parts hold {index.count}")
  return index


def describe(index: EmbeddingIndex) -> str:
  """What `python -m clipvip_jax.index info` prints: what the index holds and how it was made."""
  m = index.meta
  size = sum(p.embeddings.nbytes for p in index.parts)
  lines = [f"index       {index.path}",
           f"format      version {index.format_version}" + (
               " (legacy: one embeddings.npy + JSON ids; rebuild with python -m clipvip_jax.encode for the "
               "sharded, memory-mapped format)" if index.format_version == LEGACY_VERSION else ""),
           f"rows        {index.count} {index.modality} embeddings of {index.dims} dims, {index.dtype} "
           f"({size / 2**20:.1f} MiB) in {len(index.parts)} part(s)",
           f"model       {m['kind']} {m['checkpoint']}" + (f" (step {m['step']})" if m.get("step") is not None
                                                           else ""),
           f"source      {m.get('source', '?')}"]
  if index.moments:
    lines.append(f"moments     each row a window of {m['windows']['window']:g} s every {m['windows']['stride']:g} s "
                 "of a video (id: the video)")
  if m.get("generation"):
    deleted = len(m.get("deleted") or [])
    lines.append(f"grown       generation {m['generation']} (appends and deletions since the first encode)"
                 + (f"; {deleted} id(s) deleted for good" if deleted else ""))
  skipped = m.get("skipped")
  skipped = len(skipped) if isinstance(skipped, list) else skipped
  if skipped:
    lines.append(f"skipped     {skipped} input(s) that could not be encoded")
  options = m.get("options") or {}
  if options:
    lines.append("options     " + ", ".join(f"{k}={v}" for k, v in options.items() if v is not None))
  if exists_inside(index.path, "approximate", "approximate.json"):
    a = read_json(inside(index.path, "approximate", "approximate.json"))
    a = a if isinstance(a, dict) else {}
    lines.append(f"approximate {a.get('factory')} over {a.get('count')} rows, nprobe {a.get('nprobe')}, "
                 f"recall@10 {a.get('recall_at_10')} against exact search")
  else:
    lines.append("approximate none (python -m clipvip_jax.index build-approximate DIR builds one)")
  return "\n".join(lines)
