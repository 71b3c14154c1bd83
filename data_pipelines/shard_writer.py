"""Writing clip records into ArrayRecord shards, and turning one annotation + its video into a record.

Reused by build_shards (multiprocessing), the TFDS builders and their Beam jobs, and the synthetic set:

  options = FrameOptions(fps=5, short_side=224)
  with ShardWriter(os.path.join(out, shard_name("train", 0, 4))) as writer:
    for ann in annotations:
      try:
        writer.write(clip_to_record(ann, videos_dir, options))
      except VideoReadError as e:
        skipped.append(skip_entry(ann, str(e)))

Shards are written with `group_size:1` (one record per chunk: the random access Grain needs) and no
compression (JPEG bytes do not compress; zstd would only cost the reader CPU time).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from data_pipelines.clip_annotation import ClipAnnotation
from data_pipelines.records import ClipRecord, decode_record, encode_record
from data_pipelines.video_io import FrameOptions, VideoReadError, read_clip, resolve_video_path

WRITER_OPTIONS = "group_size:1,uncompressed"
SHARD_SUFFIX = ".array_record"


def shard_name(split: str, index: int, count: int) -> str:
  """'train-00003-of-00010.array_record' (the TFDS naming, so globs and tools recognise it)."""
  return f"{split}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def temporary_path(path: str) -> str:
  """Name a file is written under before its rename; build_shards removes leftovers of killed runs."""
  folder, name = os.path.split(path)
  return os.path.join(folder, f".{name}.tmp-{os.getpid()}")


class ShardWriter:
  """Writes records to a temporary file and renames it to `path` on a clean close (never a partial shard).

  Used as a context manager: leaving the block by an exception deletes the temporary file instead.
  """

  def __init__(self, path: str):
    self.path = path
    self._tmp = temporary_path(path)
    self._writer = ArrayRecordWriter(self._tmp, WRITER_OPTIONS)
    self.num_records = 0

  def write(self, record: ClipRecord) -> None:
    self._writer.write(encode_record(record))
    self.num_records += 1

  def close(self) -> None:
    self._writer.close()
    os.replace(self._tmp, self.path)

  def abort(self) -> None:
    self._writer.close()
    if os.path.exists(self._tmp):
      os.remove(self._tmp)

  def __enter__(self) -> ShardWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


def read_records(path: str) -> Iterator[ClipRecord]:
  """Every record of one shard, in order (sequential reading; Grain does the random access)."""
  reader = ArrayRecordReader(path)
  try:
    for _ in range(reader.num_records()):
      yield decode_record(reader.read())
  finally:
    reader.close()


def count_records(path: str) -> int:
  reader = ArrayRecordReader(path)
  try:
    return reader.num_records()
  finally:
    reader.close()


def clip_to_record(annotation: ClipAnnotation, videos_dir: str, options: FrameOptions) -> ClipRecord:
  """One annotated clip as a record; raises VideoReadError (the skip reason) for a bad input."""
  path = resolve_video_path(videos_dir, annotation.video)
  clip = read_clip(path, options, annotation.start, annotation.end)
  return ClipRecord(
      clip_id=annotation.clip_id, frames=clip.frames, captions=list(annotation.captions), fps=clip.fps,
      source_fps=clip.source_fps, split=annotation.split, subtitle=annotation.subtitle,
      caption=annotation.caption, start=annotation.start, end=annotation.end)


def skip_entry(annotation: ClipAnnotation, reason: str) -> dict[str, Any]:
  """The manifest's record of one skipped input."""
  return {"clip_id": annotation.clip_id, "video": annotation.video, "split": annotation.split, "reason": reason}


def clip_to_record_or_reason(annotation: ClipAnnotation, videos_dir: str,
                             options: FrameOptions) -> tuple[ClipRecord | None, str | None]:
  """(record, None) or (None, reason). Any failure of one input, including an unexpected one from a
  codec or PIL, becomes a reason: a dataset of millions of web videos must not stop at one bad file."""
  try:
    return clip_to_record(annotation, videos_dir, options), None
  except VideoReadError as e:
    return None, str(e)
  except Exception as e:  # noqa: BLE001 - reported in the manifest, never swallowed silently
    return None, f"unexpected {type(e).__name__}: {e}"
