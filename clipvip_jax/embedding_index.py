"""An embedding index on disk: DIR/embeddings.npy (float32 [N, D]) + DIR/index.json (what the rows are).

index.json:
  {"format_version": 1, "created_by": "clipvip_jax.encode",
   "kind": "clipvip", "checkpoint": "/abs/path", "step": null | int, "config": null | "/abs/config.json",
   "modality": "video" | "text", "count": N, "dims": D,
   "ids": [row names: clip ids, video paths relative to the folder, or the text lines],
   "captions": [[...], ...] (shard sets only: the captions of each clip),
   "skipped": [{"id": ..., "reason": ...}] (inputs that could not be encoded),
   "source": "/abs/input", "options": {num_frames, image_size, sampling, resize_mode, target_fps, max_text_len,
   fps, batch_size, split}}

The directory is written whole under a temporary name and renamed into place, so a reader sees either the old
index or the new one, never a mix; `read_index` checks that the two files agree before anything uses them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from typing import Any, Mapping

import numpy as np

from clipvip_jax.cli_errors import UsageError

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
EMBEDDINGS_FILE = "embeddings.npy"
MODALITIES = ("video", "text")


@dataclasses.dataclass
class EmbeddingIndex:
  embeddings: np.ndarray  # float32 [N, D]
  meta: dict[str, Any]
  path: pathlib.Path

  @property
  def ids(self) -> list[str]:
    return self.meta["ids"]

  @property
  def kind(self) -> str:
    return self.meta["kind"]

  @property
  def modality(self) -> str:
    return self.meta["modality"]

  @property
  def dims(self) -> int:
    return int(self.embeddings.shape[1])

  def captions(self, row: int) -> list[str]:
    captions = self.meta.get("captions")
    return list(captions[row]) if captions else []


def check_out_dir(out_dir: str | os.PathLike, force: bool) -> pathlib.Path:
  """Refuses (UsageError) an output that exists, unless `force` and it is an index or an empty folder: --force
  must never delete a folder that holds something else."""
  out = pathlib.Path(out_dir)
  if out.exists():
    if not out.is_dir():
      raise UsageError(f"--out {out} exists and is not a directory")
    if not force:
      raise UsageError(f"--out {out} already exists (pass --force to replace the index in it)")
    if any(out.iterdir()) and not (out / INDEX_FILE).is_file():
      raise UsageError(f"--out {out} is a non-empty folder without {INDEX_FILE}; refusing to replace it")
  if not out.absolute().parent.exists():
    raise UsageError(f"--out {out}: the parent folder {out.absolute().parent} does not exist")
  return out


def _remove(path: pathlib.Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  elif path.exists() or path.is_symlink():
    path.unlink()


def write_index(out_dir: str | os.PathLike, embeddings: np.ndarray, meta: Mapping[str, Any], *,
                force: bool = False) -> pathlib.Path:
  """Writes embeddings + index.json into `out_dir` atomically (temporary folder, then rename)."""
  out = check_out_dir(out_dir, force)
  embeddings = np.asarray(embeddings, np.float32)
  if embeddings.ndim != 2 or embeddings.shape[0] != len(meta["ids"]):
    raise ValueError(f"embeddings {embeddings.shape} do not match {len(meta['ids'])} ids")
  full = {"format_version": FORMAT_VERSION, **meta, "count": int(embeddings.shape[0]),
          "dims": int(embeddings.shape[1])}
  tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
  _remove(tmp)
  try:
    tmp.mkdir()
    np.save(tmp / EMBEDDINGS_FILE, embeddings)
    (tmp / INDEX_FILE).write_text(json.dumps(full, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if out.exists():  # --force: the old index moves aside first, so a failure still leaves one whole copy
      old = out.with_name(f".{out.name}.old-{os.getpid()}")
      _remove(old)
      out.rename(old)
      tmp.rename(out)
      _remove(old)
    else:
      tmp.rename(out)
  except BaseException:
    _remove(tmp)
    raise
  return out


def read_index(index_dir: str | os.PathLike) -> EmbeddingIndex:
  """The index in `index_dir`, checked: both files present, JSON valid, embeddings [count, dims] float."""
  root = pathlib.Path(index_dir)
  if not root.is_dir():
    raise UsageError(f"index directory {root} does not exist")
  index_path, emb_path = root / INDEX_FILE, root / EMBEDDINGS_FILE
  for path in (index_path, emb_path):
    if not path.is_file():
      raise UsageError(f"{root} has no {path.name} (not an index written by python -m clipvip_jax.encode)")
  try:
    meta = json.loads(index_path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UsageError(f"{index_path} is not valid JSON ({e})") from None
  if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
    raise UsageError(f"{index_path} is not an index of format version {FORMAT_VERSION}")
  missing = [k for k in ("kind", "checkpoint", "modality", "ids", "count", "dims") if k not in meta]
  if missing:
    raise UsageError(f"{index_path} lacks the field(s) {missing}")
  if meta["modality"] not in MODALITIES:
    raise UsageError(f"{index_path}: modality {meta['modality']!r} is not one of {MODALITIES}")
  try:
    embeddings = np.load(emb_path, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise UsageError(f"{emb_path} is not a readable .npy array ({e})") from None
  expected = (int(meta["count"]), int(meta["dims"]))
  if embeddings.ndim != 2 or tuple(embeddings.shape) != expected or len(meta["ids"]) != expected[0]:
    raise UsageError(f"{emb_path} has shape {tuple(embeddings.shape)} but {index_path} describes {expected[0]} "
                     f"rows ({len(meta['ids'])} ids) of {expected[1]} dims")
  if not np.issubdtype(embeddings.dtype, np.floating):
    raise UsageError(f"{emb_path} holds {embeddings.dtype}, not float embeddings")
  captions = meta.get("captions")
  if captions is not None and len(captions) != expected[0]:
    raise UsageError(f"{index_path}: {len(captions)} caption lists for {expected[0]} rows")
  return EmbeddingIndex(embeddings.astype(np.float32, copy=False), meta, root)
