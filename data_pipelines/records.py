"""The clip record: the one on-disk unit of every shard this project writes or reads.

A shard is an ArrayRecord file; each record is one clip, serialised with msgpack as a flat dict:

  clip_id     str             unique within the dataset
  split       str             "train" / "val" / "test" / ...
  frames      list[bytes]     JPEG-encoded RGB frames, in time order, already resized on the short side
  num_frames  int             len(frames)
  fps         float           rate at which `frames` were kept (frames per second of the stored clip)
  source_fps  float           frame rate of the source video (0.0 when unknown, e.g. folders of images)
  captions    list[str]       one or more sentences describing the clip (paragraph datasets: one per sentence)
  subtitle    str             ASR subtitle (pretraining); "" when absent
  caption     str             auxiliary caption (OFA caption in pretraining); "" when absent
  start, end  float | None    clip boundaries in seconds inside the source video, when the clip is a segment

Everything that writes shards (build_shards, the TFDS builders, the synthetic generator) goes through
`encode_record`; everything that reads them (the Grain pipeline, preview, encode) goes through `decode_record`,
so the schema lives in exactly one place.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

SCHEMA_VERSION = 1


@dataclasses.dataclass
class ClipRecord:
  clip_id: str
  frames: list[bytes]
  captions: list[str]
  fps: float
  source_fps: float = 0.0
  split: str = "train"
  subtitle: str = ""
  caption: str = ""
  start: float | None = None
  end: float | None = None

  @property
  def num_frames(self) -> int:
    return len(self.frames)


_REQUIRED = ("clip_id", "frames", "captions", "fps")


def encode_record(rec: ClipRecord) -> bytes:
  if not rec.frames:
    raise ValueError(f"clip {rec.clip_id!r}: a record needs at least one frame")
  if not rec.captions and not rec.subtitle and not rec.caption:
    raise ValueError(f"clip {rec.clip_id!r}: a record needs at least one text (captions, subtitle or caption)")
  d: dict[str, Any] = dataclasses.asdict(rec)
  d["num_frames"] = len(rec.frames)
  d["schema_version"] = SCHEMA_VERSION
  return msgpack.packb(d, use_bin_type=True)


def decode_record(data: bytes) -> ClipRecord:
  try:
    d = msgpack.unpackb(data, raw=False)
  except Exception as e:  # msgpack raises several unrelated exception types
    raise ValueError(f"not a clip record (msgpack decode failed: {e})") from e
  if not isinstance(d, dict):
    raise ValueError("not a clip record (top level is not a map)")
  missing = [k for k in _REQUIRED if k not in d]
  if missing:
    raise ValueError(f"clip record {d.get('clip_id', '?')!r} lacks field(s) {missing}")
  if d.get("schema_version", 1) > SCHEMA_VERSION:
    raise ValueError(f"clip record schema {d['schema_version']} is newer than this reader ({SCHEMA_VERSION})")
  fields = {f.name for f in dataclasses.fields(ClipRecord)}
  return ClipRecord(**{k: v for k, v in d.items() if k in fields})
