"""One annotated clip as build_shards reads it: a JSON-lines file, one clip per line, validated up front.

  {"clip_id": "video7010", "video": "video7010.mp4", "captions": ["a man is cooking", ...],
   "subtitle": "...", "caption": "...", "start": 12.5, "end": 20.0, "split": "test"}

clip_id, video and captions are required (captions may be [] when subtitle or caption carries the text);
`video` is relative to the videos directory and names a video file or a folder of frame images (a name
without extension is also looked up with the usual video extensions, see video_io.resolve_video_path);
start/end (seconds) cut a segment; split defaults to the builder's default split. Unknown fields are
errors, so a misspelt "captoins" cannot silently drop a dataset's texts.

`annotations.write_jsonl` (the parsers of the official benchmark files) writes this form, and the TFDS
builders can validate their dicts with `parse_annotation`, so every path into a shard shares these checks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

from data_pipelines.annotations import text_file

_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")  # split names become file-name prefixes
_FIELDS = ("clip_id", "video", "captions", "subtitle", "caption", "start", "end", "split")


class AnnotationLineError(ValueError):
  """A bad annotation; the message names the file, line and field."""


@dataclasses.dataclass(frozen=True)
class ClipAnnotation:
  clip_id: str
  video: str
  captions: tuple[str, ...]
  subtitle: str = ""
  caption: str = ""
  start: float | None = None
  end: float | None = None
  split: str = "train"


def parse_annotation(obj: object, where: str, default_split: str = "train") -> ClipAnnotation:
  """Validates one annotation dict; `where` (e.g. "ann.jsonl:12") prefixes every error message."""
  if not isinstance(obj, dict):
    raise AnnotationLineError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  unknown = sorted(set(obj) - set(_FIELDS))
  if unknown:
    raise AnnotationLineError(f"{where}: unknown field(s) {unknown} (allowed: {', '.join(_FIELDS)})")
  for key in ("clip_id", "video", "captions"):
    if key not in obj:
      raise AnnotationLineError(f"{where}: missing required field {key!r}")
  for key in ("clip_id", "video"):
    if not isinstance(obj[key], str) or not obj[key].strip():
      raise AnnotationLineError(f"{where}: field {key!r} must be a non-empty string, got {obj[key]!r}")
  captions = obj["captions"]
  if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
    raise AnnotationLineError(f"{where}: field 'captions' must be a list of strings, got {captions!r}")
  texts = {}
  for key in ("subtitle", "caption"):
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
      raise AnnotationLineError(f"{where}: field {key!r} must be a string or null, got {value!r}")
    texts[key] = value or ""
  if not any(c.strip() for c in captions) and not texts["subtitle"] and not texts["caption"]:
    raise AnnotationLineError(f"{where}: no text: 'captions' is empty and there is no 'subtitle' or 'caption'")
  bounds = {}
  for key in ("start", "end"):
    value = obj.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or value < 0):
      raise AnnotationLineError(f"{where}: field {key!r} must be a number of seconds >= 0, got {value!r}")
    bounds[key] = None if value is None else float(value)
  if bounds["end"] is not None and bounds["end"] <= (bounds["start"] or 0.0):
    raise AnnotationLineError(
        f"{where}: field 'end' ({bounds['end']}) must be greater than 'start' ({bounds['start']})")
  split = obj.get("split", default_split)
  if not isinstance(split, str) or not _SPLIT_NAME.match(split):
    raise AnnotationLineError(f"{where}: field 'split' must match [A-Za-z0-9_]+, got {split!r}")
  return ClipAnnotation(clip_id=obj["clip_id"], video=obj["video"], captions=tuple(captions),
                        subtitle=texts["subtitle"], caption=texts["caption"], start=bounds["start"],
                        end=bounds["end"], split=split)


def read_annotation_lines(path: str, default_split: str = "train") -> list[ClipAnnotation]:
  """Every annotation of a JSON-lines file (blank lines ignored); the first bad line raises AnnotationLineError."""
  if not os.path.isfile(path):
    raise AnnotationLineError(f"annotation file {path} does not exist")
  if not _SPLIT_NAME.match(default_split):
    raise AnnotationLineError(f"default split {default_split!r} must match [A-Za-z0-9_]+")
  annotations, first_line = [], {}
  with text_file(path, AnnotationLineError) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise AnnotationLineError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
      ann = parse_annotation(obj, where, default_split)
      if ann.clip_id in first_line:
        raise AnnotationLineError(
            f"{where}: field 'clip_id' {ann.clip_id!r} repeats line {first_line[ann.clip_id]}")
      first_line[ann.clip_id] = number
      annotations.append(ann)
  if not annotations:
    raise AnnotationLineError(f"annotation file {path} holds no annotation")
  return annotations
