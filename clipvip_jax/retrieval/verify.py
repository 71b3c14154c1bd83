"""python -m clipvip_jax.index verify DIR: every check of an index as untrusted input, in one pass, every problem named.

    report = verify_index("idx/")      # -> Report(problems=[...], notes=[...], rows, parts)
    report.ok                          # True: search and serve may trust what they read from it

What read_index checks when it opens an index (index.json's fields and their types, part names, every file inside
the folder, shapes, dtypes, the string tables' ends) is checked here for every field and part, not up to the first
problem; and then what opening does not read: every row finite (a NaN or infinite row is never ranked, and encode
never writes one), every id and caption entry inside its file and valid UTF-8 (captions: a JSON list of strings),
every part.json, every thumbnail strip inside strips.bin and a JPEG, approximate.json's fields, and no link in the
folder that leads out of it. python -m clipvip_jax.serve runs it before it serves an index and refuses one with a
problem (docs/security.md).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import numpy as np

from clipvip_jax.runtime.cli_errors import UsageError
from clipvip_jax.retrieval import index as index_lib
from clipvip_jax.retrieval.index_checks import (IndexDamaged, check_part_name, exists_inside, inside, is_int,
                                                meta_problems, read_json)
from clipvip_jax.retrieval.string_table import StringTable, has_strings

LIMIT = 5  # problems named per file (then a count of the rest)
CHUNK_ROWS = 65536


@dataclasses.dataclass
class Report:
  path: pathlib.Path
  problems: list[str]
  notes: list[str]
  rows: int = 0
  parts: int = 0

  @property
  def ok(self) -> bool:
    return not self.problems


def _non_finite(embeddings: np.ndarray, path: pathlib.Path, first_row: int = 0) -> list[str]:
  bad: list[int] = []
  count = 0
  for start in range(0, embeddings.shape[0], CHUNK_ROWS):
    rows = index_lib.non_finite_rows(embeddings[start:start + CHUNK_ROWS])
    count += len(rows)
    if len(bad) < LIMIT:
      bad += (rows + start).tolist()[:LIMIT - len(bad)]
  if not count:
    return []
  shown = ", ".join(str(first_row + r) for r in bad)
  return [f"{path}: {count} row(s) hold NaN or infinite values (index rows {shown}{', ...' if count > len(bad) else ''});"
          " they are never ranked; re-encode the index"]


def _captions_check(table: StringTable):
  def check(i: int, text: str) -> str | None:
    try:
      index_lib.parse_captions(text, table, i)
    except IndexDamaged as e:
      return str(e).split(" (python -m")[0]
    return None
  return check


def _links_out(root: pathlib.Path, reported: str) -> list[str]:
  """Every link inside the folder that leads out of it (the reader refuses those it opens; any other is named)."""
  real_root = root.resolve()
  found = []
  for folder, dirs, files in os.walk(root):
    for name in dirs + files:
      path = pathlib.Path(folder) / name
      if path.is_symlink():
        target = path.resolve()
        if target != real_root and not target.is_relative_to(real_root) and str(path) not in reported:
          found.append(f"{path} leads outside the index folder {root} (to {target})")
  return found


def verify_index(index_dir: str | os.PathLike) -> Report:
  """Report of everything wrong with the index in `index_dir` (module doc). UsageError only when there is no index
  at all (no folder, no index.json: the message says so, or that an encode is unfinished)."""
  root = pathlib.Path(index_dir)
  report = Report(root, [], [])
  try:
    index_lib._read_meta(root)  # pylint: disable=protected-access  (no folder / no index.json: UsageError)
  except IndexDamaged:
    pass
  index_path = root / index_lib.INDEX_FILE
  try:
    meta = read_json(inside(root, index_lib.INDEX_FILE))
  except IndexDamaged as e:
    report.problems.append(str(e))
    return report
  report.problems += meta_problems(meta, index_path, modalities=index_lib.MODALITIES, dtypes=index_lib.DTYPES,
                                   versions=(index_lib.FORMAT_VERSION, index_lib.LEGACY_VERSION))
  if report.problems:
    report.problems += _links_out(root, " ".join(report.problems))
    return report
  if meta["format_version"] == index_lib.LEGACY_VERSION:
    _verify_legacy(root, meta, report)
  else:
    _verify_parts(root, meta, report)
  _verify_thumbnails(root, meta["count"], report)
  _verify_approximate(root, meta, report)
  report.problems += _links_out(root, " ".join(report.problems))
  return report


def _verify_legacy(root: pathlib.Path, meta: dict[str, Any], report: Report) -> None:
  try:
    index = index_lib.read_index(root)
  except UsageError as e:
    report.problems.append(str(e))
    return
  report.rows, report.parts = index.count, 1
  report.problems += _non_finite(index.parts[0].embeddings, root / index_lib.EMBEDDINGS_FILE)
  report.notes.append("format 1 (legacy): rebuild it with python -m clipvip_jax.encode for the current format")


def _verify_parts(root: pathlib.Path, meta: dict[str, Any], report: Report) -> None:
  dims, dtype = meta["dims"], str(meta.get("dtype", "float32"))
  first_row = 0
  seen_ids: dict[str, int] = {}
  repeated = 0
  for entry in meta["parts"]:
    name, rows = check_part_name(entry["name"], "part name"), entry["rows"]
    folder = root / index_lib.PARTS_DIR / name
    try:
      if not exists_inside(root, index_lib.PARTS_DIR, name):
        raise IndexDamaged(f"index part {folder} is missing")
      inside(root, index_lib.PARTS_DIR, name, kind="dir")
      embeddings = index_lib._open_embeddings(  # pylint: disable=protected-access
          root, [index_lib.PARTS_DIR, name, index_lib.EMBEDDINGS_FILE], rows, dims, dtype)
      ids = StringTable(folder, "ids", rows, root)
      captions = StringTable(folder, "captions", rows, root) if has_strings(folder, "captions") else None
      if isinstance(meta.get("windows"), dict):
        index_lib._open_spans(root, name, rows)  # pylint: disable=protected-access
    except UsageError as e:
      report.problems.append(str(e))
      first_row += rows
      continue
    report.parts += 1
    report.rows += rows
    report.problems += _non_finite(embeddings, folder / index_lib.EMBEDDINGS_FILE, first_row)

    def note_id(i: int, text: str, first=first_row) -> None:
      nonlocal repeated
      if text in seen_ids:
        repeated += 1
      else:
        seen_ids[text] = first + i
      return None

    report.problems += ids.problems(note_id, LIMIT)
    if captions is not None:
      report.problems += captions.problems(_captions_check(captions), LIMIT)
    try:
      index_lib.read_part_info(root, name)
    except IndexDamaged as e:
      report.problems.append(str(e))
    first_row += rows
  if repeated and not isinstance(meta.get("windows"), dict):  # moment rows share their video's id by design
    report.notes.append(f"{repeated} row(s) repeat the id of an earlier row: /api/clip and /api/similar serve the "
                        "first row of each id")


def _verify_thumbnails(root: pathlib.Path, rows: int, report: Report) -> None:
  from clipvip_jax.retrieval.thumbnails import FOLDER, Thumbnails
  if not exists_inside(root, FOLDER):
    report.notes.append("no thumbnails (the page shows captions only; python -m clipvip_jax.index thumbnails DIR "
                        "writes them from the videos or shards the index was encoded from)")
    return
  try:
    strips = Thumbnails(root, rows)
  except UsageError as e:
    report.problems.append(str(e))
    return
  if not strips.available:
    report.problems.append(f"{root / FOLDER} has no thumbnails.json (an unfinished thumbnails folder)")
    return
  report.problems += strips.problems(LIMIT)


def _verify_approximate(root: pathlib.Path, meta: dict[str, Any], report: Report) -> None:
  from clipvip_jax.retrieval import approximate
  if not exists_inside(root, approximate.APPROXIMATE_DIR):
    return
  try:
    info_path = inside(root, approximate.APPROXIMATE_DIR, approximate.META_FILE)
    info = read_json(info_path)
    inside(root, approximate.APPROXIMATE_DIR, approximate.FAISS_FILE)
  except IndexDamaged as e:
    report.problems.append(str(e))
    return
  if not isinstance(info, dict):
    report.problems.append(f"{info_path} holds no JSON object")
    return
  for name in ("count", "dims", "nprobe", "refine"):
    if not (is_int(info.get(name)) and info[name] >= (0 if name == "count" else 1)):
      report.problems.append(f"{info_path}: field {name!r} must be a positive integer, not {info.get(name)!r}")
  if is_int(info.get("count")) and (info.get("count"), info.get("dims")) != (meta["count"], meta["dims"]):
    report.problems.append(f"{info_path} was built for {info.get('count')} rows of {info.get('dims')} dims, not "
                           f"the index's {meta['count']} of {meta['dims']}; rebuild it (build-approximate)")
  report.notes.append(f"{root / approximate.APPROXIMATE_DIR / approximate.FAISS_FILE} is read by FAISS, whose "
                      "reader does not guard against hostile files: rebuild it (python -m clipvip_jax.index "
                      "build-approximate) unless you made it")


def describe_report(report: Report) -> str:
  """What verify prints."""
  lines = [f"index       {report.path}"]
  if report.ok:
    lines.append(f"verified    {report.rows} rows in {report.parts} part(s): index.json, every file inside the "
                 "folder, every row finite, every id and caption, thumbnails, approximate.json: no problem")
  else:
    lines.append(f"problems    {len(report.problems)}: do not search or serve it as it is (re-encode it, or "
                 "fix what is named)")
    lines += [f"  - {problem}" for problem in report.problems]
  lines += [f"note        {note}" for note in report.notes]
  return "\n".join(lines)
