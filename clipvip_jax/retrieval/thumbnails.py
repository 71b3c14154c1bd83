"""Thumbnail strips inside an index: a few frames of each clip side by side, one JPEG per row, for the web page.

    DIR/thumbnails/strips.bin            every row's strip JPEG back to back (an empty strip: no frames readable)
                  /strips.starts.npy     int64 [rows]: where row r's strip starts in strips.bin
                  /strips.lengths.npy    int64 [rows]: its length in bytes
                  /thumbnails.json       {"rows", "frames", "height", "source"}

The page must show clips without access to the original videos or shards (serve reads nothing outside the index
folder), so encode writes the strips into the index: from the shard set's stored JPEG frames (--shards: no
decoding beyond those JPEGs) or by decoding each video once more at a low rate (--videos). Strips are keyed by
row, so a lookup is two array reads and one slice, whatever the index size. The folder is written under a
temporary name and renamed: it is there whole or not at all.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
from typing import Iterable, Iterator

import numpy as np

from clipvip_jax.retrieval import index as index_lib

FOLDER = "thumbnails"
STRIP_FRAMES = 6  # frames per strip: enough to see the motion of a clip
STRIP_HEIGHT = 96  # pixels; frames smaller than this are kept at their size (the page scales them)
VIDEO_FPS = 2.0  # rate videos are decoded at for strips: a strip needs a handful of frames, not all of them
JPEG_QUALITY = 80


def make_strip(frames: list, frames_per_strip: int = STRIP_FRAMES, height: int = STRIP_HEIGHT) -> bytes:
  """One JPEG of up to `frames_per_strip` evenly spaced frames (PIL images or JPEG bytes), side by side."""
  from PIL import Image
  if not frames:
    return b""
  picks = np.unique(np.linspace(0, len(frames) - 1, min(frames_per_strip, len(frames))).round().astype(int))
  images = []
  for i in picks:
    frame = frames[i]
    image = Image.open(io.BytesIO(frame)) if isinstance(frame, (bytes, bytearray)) else frame
    image = image.convert("RGB")
    if image.height > height:
      image = image.resize((max(1, round(image.width * height / image.height)), height), Image.BICUBIC)
    images.append(image)
  strip = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)))
  x = 0
  for image in images:
    strip.paste(image, (x, 0))
    x += image.width
  out = io.BytesIO()
  strip.save(out, format="JPEG", quality=JPEG_QUALITY)
  return out.getvalue()


def _shard_frames(shard_dir: pathlib.Path, split: str) -> Iterator[tuple[str, list[bytes]]]:
  """(clip id, stored JPEG frames) of every readable record of a shard split, in shard order."""
  from data_pipelines import shard_writer, sources
  for path in sources.shard_paths(shard_dir, split):
    try:
      for record in shard_writer.read_records(path):
        yield record.clip_id, list(record.frames)
    except (ValueError, OSError):
      continue  # a damaged shard: its clips get no strip (encode skipped or listed them already)


def _video_frames(videos_dir: pathlib.Path, wanted: set[str]) -> Iterator[tuple[str, list[bytes]]]:
  """(clip id, JPEG frames at VIDEO_FPS, short side STRIP_HEIGHT) of the clips of a videos folder the index holds,
  decoded in threads."""
  from clipvip_jax.retrieval.video_files import find_videos, ordered_map
  from data_pipelines import video_io
  options = video_io.FrameOptions(fps=VIDEO_FPS, short_side=STRIP_HEIGHT)
  videos = [(clip_id, path) for clip_id, path in find_videos(videos_dir) if clip_id in wanted]

  def decode(item):
    clip_id, path = item
    try:
      return clip_id, list(video_io.read_clip(str(path), options).frames)
    except (video_io.VideoReadError, ValueError, OSError):
      return clip_id, []

  yield from ordered_map(decode, videos, min(8, os.cpu_count() or 1), window=32)


def source_frames(index: index_lib.EmbeddingIndex) -> Iterable[tuple[str, list[bytes]]] | None:
  """Where the index's clips can be read from (its recorded source), or None when it cannot (a text index, a
  source that moved)."""
  source = index.meta.get("source")
  if index.modality != "video" or not source or not pathlib.Path(source).is_dir():
    return None
  source = pathlib.Path(source)
  split = (index.meta.get("options") or {}).get("split")
  if (source / "manifest.json").is_file() and split:
    return _shard_frames(source, split)
  return _video_frames(source, set(index.ids))


def write_thumbnails(index_dir: str | os.PathLike, frames: Iterable[tuple[str, list[bytes]]] | None = None) -> bool:
  """DIR/thumbnails for the index in `index_dir`, from `frames` ((clip id, frames) pairs, any order; default:
  the index's recorded source). Returns False (writing nothing) when there is no source to read."""
  index = index_lib.read_index(index_dir)
  frames = source_frames(index) if frames is None else frames
  if frames is None:
    return False
  rows = {clip_id: row for row, clip_id in enumerate(index.ids)}
  root = index.path / FOLDER
  tmp = index.path / f".{FOLDER}.tmp-{os.getpid()}"
  index_lib.remove(tmp)
  tmp.mkdir()
  try:
    starts = np.zeros(index.count, np.int64)
    lengths = np.zeros(index.count, np.int64)
    offset = 0
    with open(tmp / "strips.bin", "wb") as out:
      for clip_id, clip_frames in frames:
        row = rows.get(clip_id)
        if row is None or lengths[row]:
          continue
        try:
          strip = make_strip(clip_frames)
        except (OSError, ValueError):
          continue  # an undecodable frame: the row keeps no strip, the page shows its caption alone
        out.write(strip)
        starts[row], lengths[row] = offset, len(strip)
        offset += len(strip)
    np.save(tmp / "strips.starts.npy", starts)
    np.save(tmp / "strips.lengths.npy", lengths)
    (tmp / "thumbnails.json").write_text(json.dumps(
        {"rows": index.count, "frames": STRIP_FRAMES, "height": STRIP_HEIGHT,
         "source": index.meta.get("source")}) + "\n", encoding="utf-8")
    index_lib.remove(root)
    tmp.rename(root)
  except BaseException:
    index_lib.remove(tmp)
    raise
  return True


def ensure_thumbnails(index: index_lib.EmbeddingIndex) -> bool:
  """Writes the strips of an index encoded before encode wrote them, when its source is still there; True when
  it wrote them now (serve calls this once at start)."""
  if (index.path / FOLDER).is_dir() or source_frames(index) is None:
    return False
  return write_thumbnails(index.path)


class Thumbnails:
  """The read side: strip(row) -> JPEG bytes or None; the arrays memory-mapped, strips.bin read per request."""

  def __init__(self, index_dir: str | os.PathLike, rows: int):
    root = pathlib.Path(index_dir) / FOLDER
    self.path = root / "strips.bin"
    self.available = (root / "thumbnails.json").is_file()
    if self.available:
      self.starts = np.load(root / "strips.starts.npy", mmap_mode="r")
      self.lengths = np.load(root / "strips.lengths.npy", mmap_mode="r")
      self.available = len(self.starts) == rows == len(self.lengths)

  def has(self, row: int) -> bool:
    return self.available and 0 <= row < len(self.lengths) and bool(self.lengths[row])

  def strip(self, row: int) -> bytes | None:
    if not self.has(row):
      return None
    with open(self.path, "rb") as f:
      f.seek(int(self.starts[row]))
      return f.read(int(self.lengths[row]))
