"""A growing index: append new inputs without re-encoding the old ones, delete rows, and publish either atomically.

    encode --videos DIR --out IDX --append        # new videos (ids not in IDX) encoded, added as new parts
    python -m clipvip_jax.index delete IDX --id ID [--id ...] | --vanished

Atomicity. An index's files are never changed once published: an append builds the next index in the staging
folder beside it (indexer.build_index with `base`): the new inputs become new parts numbered after the old ones,
the old parts are hard links to the same files (no copy, no re-encoding), index.json is written last, the
thumbnails of the old rows are carried over and the new rows' added, the approximate index updated (below); then
one atomic exchange (files.replace_dir) makes it IDX. A deletion does the same with the parts that hold deleted
rows rewritten under new part numbers (the others linked). A reader (search, the service) maps every file of an
index when it opens it (index.read_index), so it keeps answering from the index it opened, whole, and a reader
opening IDX sees the old or the new index, never a mixture. An append killed part way leaves IDX as it was and its
finished new parts in the staging folder: the same command resumes it (the encode lock and plan, as for any
encode); a staging folder made for another state of IDX is started over.

Refusals (one sentence, exit 2, nothing written): an append whose model, checkpoint, step, source folder or options
(frames, size, fps, window, stride, dtype...) differ from the index's. Idempotence: an append with nothing new is a
no-op that exits 0. A deleted id is recorded ("deleted" in index.json) so a later append does not bring it back
while its file is still there; a vanished file's rows are deleted without record (its file may come back).

The approximate index (FAISS IVF): after an append, the new rows are added to the trained IVF lists (same
clusters: FAISS adds rows without retraining, as row numbers continue) while the index holds at most
REBUILD_GROWTH times the rows the clusters were trained on; past that, or after any deletion (row numbers shift),
it is rebuilt. Either way its recall@10 is measured again, nprobe re-chosen, and approximate.json records both.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
from typing import Any, Sequence

import numpy as np

from clipvip_jax.runtime.cli_errors import UsageError
from clipvip_jax.retrieval import index as index_lib

REBUILD_GROWTH = 2.0
# What must be equal for rows to share an index: the model, and every option that changes a row.
_SAME = ("kind", "checkpoint", "step", "config", "modality", "source", "dtype", "windows")
_NOT_ROW_OPTIONS = ("batch_size",)
_PART_NUMBER = re.compile(r"part-([0-9]{5,})")


def identity(index: index_lib.EmbeddingIndex) -> str:
  """A digest of index.json: which state of the index an append was planned on."""
  return hashlib.sha256((index.path / index_lib.INDEX_FILE).read_bytes()).hexdigest()[:32]


def check_unchanged(index: index_lib.EmbeddingIndex) -> None:
  if identity(index) != index.meta.get("_identity", identity(index)):
    raise UsageError(f"{index.path} changed while this command waited for it; run the command again")


def open_base(out: str | os.PathLike) -> index_lib.EmbeddingIndex:
  """The index an append or a deletion starts from, with its identity noted (check_unchanged)."""
  index = index_lib.read_index(out)
  if index.format_version != index_lib.FORMAT_VERSION:
    raise UsageError(f"{out} is an index of format {index.format_version}; rebuild it with python -m "
                     "clipvip_jax.encode --force before appending to it")
  index.meta["_identity"] = identity(index)
  return index


def _row_options(meta: dict[str, Any]) -> dict[str, Any]:
  options = dict(meta.get("options") or {})
  for name in _NOT_ROW_OPTIONS:
    options.pop(name, None)
  return options


def check_append(base: index_lib.EmbeddingIndex, meta: dict[str, Any]) -> None:
  """UsageError (one sentence) unless rows made with `meta` (encode's index meta) may join `base`'s rows."""
  old = {**{k: base.meta.get(k) for k in _SAME}, "dtype": base.dtype}
  new = {k: meta.get(k) for k in _SAME}
  differ = [k for k in _SAME if old[k] != new[k]]
  old_options, new_options = _row_options(base.meta), _row_options(meta)
  differ += [f"options.{k}" for k in sorted(set(old_options) | set(new_options))
             if old_options.get(k) != new_options.get(k)]
  if differ:
    first = differ[0]
    pick = (lambda m: m.get(first)) if "." not in first else (lambda m: _row_options(m).get(first.split(".")[1]))
    was = old[first] if "." not in first else pick(base.meta)
    raise UsageError(f"--append to {base.path} refused: its rows were made with another {', '.join(differ)} ("
                     f"{first} {was!r} there, {pick(meta)!r} here), and one index holds rows of one model and one "
                     "set of options; encode into another --out, or rebuild it with --force")


def known_names(base: index_lib.EmbeddingIndex) -> set[str]:
  """Inputs an append does not encode again: every row's id, the inputs skipped before, and deleted ids."""
  return set(base.ids) | {s["id"] for s in base.skipped()} | set(base.meta.get("deleted") or [])


def new_inputs(inputs, base: index_lib.EmbeddingIndex):
  """The inputs whose ids the index does not know (known_names), in their order."""
  known = known_names(base)
  return inputs.only([i for i, name in enumerate(inputs.names()) if name not in known])


def next_part_number(index: index_lib.EmbeddingIndex) -> int:
  numbers = [int(m.group(1)) for p in index.parts if (m := _PART_NUMBER.fullmatch(p.name))]
  return max(numbers, default=len(index.parts) - 1) + 1


def _link_tree(source: pathlib.Path, target: pathlib.Path) -> None:
  """target/ holding hard links to every file of source/ (a copy where links are refused)."""
  import shutil
  target.mkdir(parents=True, exist_ok=True)
  for entry in source.iterdir():
    if entry.is_dir():
      _link_tree(entry, target / entry.name)
    elif not (target / entry.name).exists():
      try:
        os.link(entry, target / entry.name)
      except OSError:
        shutil.copy2(entry, target / entry.name)


def link_parts(base: index_lib.EmbeddingIndex, staging: pathlib.Path, skip: Sequence[str] = ()) -> list[str]:
  """The base's parts (but `skip`) linked into staging/parts/; returns their names, in order."""
  names = []
  for part in base.parts:
    if part.name in skip:
      continue
    target = staging / index_lib.PARTS_DIR / part.name
    if not target.is_dir():
      tmp = target.with_name(f".{part.name}.tmp-{os.getpid()}")
      index_lib.remove(tmp)
      _link_tree(part.folder, tmp)
      tmp.rename(target)
    names.append(part.name)
  return names


def carried_meta(base: index_lib.EmbeddingIndex, deleted: Sequence[str] = ()) -> dict[str, Any]:
  """index.json fields a new state of the index carries: its generation (one more) and the deleted ids."""
  out: dict[str, Any] = {"generation": int(base.meta.get("generation") or 0) + 1}
  ids = sorted(set(base.meta.get("deleted") or []) | set(deleted))
  if ids:
    out["deleted"] = ids
  return out


def append_rows(out: str | os.PathLike, embeddings: np.ndarray, ids: Sequence[str], *,
                spans: np.ndarray | None = None, captions: Sequence[Sequence[str]] | None = None,
                log=print) -> index_lib.EmbeddingIndex:
  """Rows computed elsewhere (a program with its own encoder, the benchmarks) appended to the index in `out` as
  one new part, published as encode --append publishes (module doc: linked old parts, one exchange, thumbnails
  carried over, the approximate index by its rule), under the encode lock. Returns the new index."""
  from clipvip_jax.retrieval import indexer
  out = pathlib.Path(out)
  with indexer.holding_encode_lock(out, lambda line: log(f"clipvip_jax.index: {line}")):
    base = open_base(out)
    if (spans is None) == base.moments:
      raise UsageError(f"{out} is {'a moment' if base.moments else 'a whole-clip'} index: rows appended to it "
                       f"{'need' if base.moments else 'take no'} spans")
    seen = int(base.meta.get("inputs", base.count))

    def parts(staging: pathlib.Path) -> list[str]:
      name = index_lib.part_name(next_part_number(base))
      index_lib.write_part(staging, name, embeddings, list(ids), captions,
                           {"first_input": seen, "inputs": len(ids), "skipped": []}, base.dtype, spans)
      return link_parts(base, staging) + [name]

    _publish_next(out, base, parts, {"inputs": seen + len(ids), **carried_meta(base)}, range(base.count),
                  base.count, log)
  return index_lib.read_index(out)


# Fields of index.json that describe one state of the index (rewritten by finish_index, or carried_meta).
_STATE_FIELDS = ("format_version", "count", "parts", "skipped", "captions", "_identity", "generation", "deleted")


def _publish_next(out: pathlib.Path, base: index_lib.EmbeddingIndex, write_parts, meta: dict[str, Any],
                  old_rows: Sequence[int], appended_from: int | None, log) -> None:
  """The next state of the index built beside it (write_parts(staging) -> the part names in order; the base's
  other fields, updated by `meta`; the strips of `old_rows` carried over; the approximate index by its rule) and
  published by one exchange; nothing is left behind on failure."""
  staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
  index_lib.remove(staging)
  staging.mkdir()
  try:
    names = write_parts(staging)
    index_lib.finish_index(staging, {k: v for k, v in base.meta.items() if k not in _STATE_FIELDS} | meta, names)
    carry_thumbnails(staging, base, old_rows=old_rows)
    refresh_approximate(staging, base, appended_from, log=log)
    check_unchanged(base)
    index_lib.publish(staging, out)
  except BaseException:
    index_lib.remove(staging)
    raise


# ------------------------------------------------------------------------------------------------ after the rows


def carry_thumbnails(staging: pathlib.Path, base: index_lib.EmbeddingIndex, old_rows: Sequence[int] | None = None,
                     new_ids: set[str] | None = None) -> None:
  """staging/thumbnails for the new index: the strips of `old_rows` of the base (all of them by default), in that
  order, then the strips of the new rows from the source (new_ids). Nothing when the base had none."""
  from clipvip_jax.retrieval import thumbnails
  old = thumbnails.Thumbnails(base.path, base.count)
  if not old.available:
    return
  carried = _Strips(old, range(base.count) if old_rows is None else old_rows)
  fresh = None
  if new_ids:
    new = index_lib.read_index(staging)
    fresh = thumbnails.source_frames(new, only=new_ids)
  thumbnails.write_thumbnails(staging, fresh, first=carried)


def refresh_approximate(staging: pathlib.Path, base: index_lib.EmbeddingIndex, appended_from: int | None,
                        log=print) -> dict[str, Any] | None:
  """staging/approximate by the module's rule: updated (rows from `appended_from` added) or rebuilt; None when the
  base had none."""
  from clipvip_jax.retrieval import approximate
  folder = approximate.approximate_dir(base.path)
  if not (folder / approximate.META_FILE).is_file():
    return None
  new = index_lib.read_index(staging)
  old = approximate.load(base)
  trained_on = int(old.meta.get("trained_count", old.meta["count"]))
  if appended_from is None or new.count > REBUILD_GROWTH * trained_on:
    return approximate.build(new, log=log)
  return approximate.update(new, old, appended_from, trained_on, log=log)


class _Strips:
  """The strips of some rows of an index, read one at a time as they are written (not all held in memory)."""

  def __init__(self, thumbnails, rows: Sequence[int]):
    self.thumbnails, self.rows = thumbnails, rows

  def __len__(self) -> int:
    return len(self.rows)

  def __iter__(self):
    for row in self.rows:
      yield self.thumbnails.strip(int(row)) or b""


# ------------------------------------------------------------------------------------------------ deletion


def vanished_ids(base: index_lib.EmbeddingIndex) -> list[str]:
  """Ids of a videos index whose files are gone from its source folder (the folder itself must be there)."""
  from data_pipelines.video_io import VIDEO_EXTENSIONS
  source = base.meta.get("source")
  if base.modality != "video" or not source or (base.meta.get("options") or {}).get("split"):
    raise UsageError(f"{base.path} was not encoded from a folder of videos, so no file of it can vanish; delete by "
                     "--id")
  root = pathlib.Path(source)
  if not root.is_dir():
    raise UsageError(f"the source folder of {base.path}, {root}, is not there; with every file gone, delete the "
                     "index or rebuild it")
  gone = []
  for clip_id in dict.fromkeys(base.ids):
    candidates = [root / clip_id] + [root / (clip_id + ext) for ext in VIDEO_EXTENSIONS]
    if not any(c.exists() for c in candidates):
      gone.append(clip_id)
  return gone


def delete(out: str | os.PathLike, ids: Sequence[str] = (), vanished: bool = False, log=print) -> tuple[int, int]:
  """Removes every row of `ids` (recorded as deleted) and of vanished files from the index in `out`, atomically
  (module doc), holding the encode lock. Returns (rows removed, rows left). Unknown ids are refused."""
  from clipvip_jax.retrieval import indexer
  out = pathlib.Path(out)
  with indexer.holding_encode_lock(out, lambda line: log(f"clipvip_jax.index: {line}")):
    return _delete_locked(out, list(ids), vanished, log)


def _delete_locked(out: pathlib.Path, ids: list[str], vanished: bool, log) -> tuple[int, int]:
  base = open_base(out)
  all_ids = base.ids
  present = set(all_ids)
  unknown = [i for i in ids if i not in present]
  if unknown:
    raise UsageError(f"{out} has no row with the id {unknown[0]!r}" + (f" (nor {len(unknown) - 1} more)"
                                                                      if len(unknown) > 1 else ""))
  doomed = set(ids) | (set(vanished_ids(base)) if vanished else set())
  if not doomed:
    return 0, base.count
  keep = np.asarray([i not in doomed for i in all_ids])

  def parts(staging: pathlib.Path) -> list[str]:
    affected = [p.name for p, start in zip(base.parts, base.row_starts[:-1]) if not keep[start:start + p.rows].all()]
    link_parts(base, staging, skip=affected)
    number, ordered = next_part_number(base), []
    for part, start in zip(base.parts, base.row_starts[:-1].tolist()):
      if part.name not in affected:
        ordered.append(part.name)
        continue
      ordered.append(_rewrite_part(base, staging, part, start, keep[start:start + part.rows], number, doomed))
      number += 1
    return ordered

  _publish_next(out, base, parts, carried_meta(base, ids), np.flatnonzero(keep).tolist(), None, log)
  return int((~keep).sum()), int(keep.sum())


def _rewrite_part(base, staging, part, start, keep, number, doomed) -> str:
  """A part without its deleted rows, under a new number (an index's files never change)."""
  rows = np.flatnonzero(keep)
  info = index_lib.read_part_info(base.path, part.name)
  name = index_lib.part_name(number)
  captions = None if part.captions is None else [base.captions(start + int(r)) for r in rows]
  index_lib.write_part(staging, name, np.asarray(part.embeddings)[rows], [part.ids[int(r)] for r in rows], captions,
                       {**info, "skipped": [s for s in info.get("skipped", []) if s["id"] not in doomed]},
                       str(part.embeddings.dtype), None if part.spans is None else part.spans[rows])
  return name
