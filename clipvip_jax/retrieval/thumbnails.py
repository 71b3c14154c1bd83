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
from clipvip_jax.retrieval.index_checks import IndexDamaged, exists_inside, inside, read_json

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


def source_frames(index: index_lib.EmbeddingIndex,
                  only: set[str] | None = None) -> Iterable[tuple[str, list[bytes]]] | None:
  """Where the index's clips (or those of `only`) can be read from (its recorded source), or None when it cannot (a
  text index, a source that moved)."""
  source = index.meta.get("source")
  if index.modality != "video" or not source or not pathlib.Path(source).is_dir():
    return None
  source = pathlib.Path(source)
  split = (index.meta.get("options") or {}).get("split")
  if (source / "manifest.json").is_file() and split:
    frames = _shard_frames(source, split)
    return frames if only is None else ((i, f) for i, f in frames if i in only)
  return _video_frames(source, set(index.ids) if only is None else only)


def write_thumbnails(index_dir: str | os.PathLike, frames: Iterable[tuple[str, list[bytes]]] | None = None, *,
                     first: list[bytes] | None = None) -> bool:
  """DIR/thumbnails for the index in `index_dir`, from `frames` ((clip id, frames) pairs, any order; default:
  the index's recorded source). Returns False (writing nothing) when there is no source to read. first: the strips
  of the first len(first) rows, given (an append or a deletion carries them over; b"": none); `frames` then
  serves only the rows after them (None: they get no strip)."""
  index = index_lib.read_index(index_dir)
  first = first or []
  if first:
    frames = frames or []
  else:
    frames = source_frames(index) if frames is None else frames
  if frames is None:
    return False
  rows: dict[str, list[int]] = {}
  for row, clip_id in enumerate(index.ids):
    if row >= len(first):
      rows.setdefault(clip_id, []).append(row)
  if not index.moments:  # one row a clip (a repeated id: its first row)
    rows = {clip_id: found[:1] for clip_id, found in rows.items()}
  root = index.path / FOLDER
  tmp = index.path / f".{FOLDER}.tmp-{os.getpid()}"
  index_lib.remove(tmp)
  tmp.mkdir()
  try:
    starts = np.zeros(index.count, np.int64)
    lengths = np.zeros(index.count, np.int64)
    offset = 0
    with open(tmp / "strips.bin", "wb") as out:
      for row, strip in enumerate(first):
        out.write(strip)
        starts[row], lengths[row] = offset, len(strip)
        offset += len(strip)
      for clip_id, clip_frames in frames:
        for row in rows.get(clip_id, []):
          if lengths[row]:
            continue
          try:
            strip = make_strip(_moment_frames(index, row, clip_frames))
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


def _moment_frames(index: index_lib.EmbeddingIndex, row: int, frames: list) -> list:
  """The frames of a row: all of the clip's, or for a moment row those of its window (frames read at VIDEO_FPS
  from the start: frame i is at i / VIDEO_FPS seconds)."""
  span = index.span(row)
  if span is None:
    return frames
  first, stop = int(np.ceil(span[0] * VIDEO_FPS - 1e-6)), int(np.ceil(span[1] * VIDEO_FPS - 1e-6))
  return frames[first:max(stop, first + 1)]


def ensure_thumbnails(index: index_lib.EmbeddingIndex) -> bool:
  """Writes the strips of an index encoded before encode wrote them, when its source is still there; True when
  it wrote them now (serve calls this once at start)."""
  if (index.path / FOLDER).is_dir() or source_frames(index) is None:
    return False
  return write_thumbnails(index.path)


class Thumbnails:
  """The read side: strip(row) -> JPEG bytes or None. Every file is checked to lie inside the index folder and
  strips.bin is memory-mapped once, at open; each row's (start, length) is checked against its size and the strip
  must start as a JPEG does, so a damaged or hostile thumbnails/ folder can neither read outside strips.bin nor
  serve anything but JPEG. A folder that does not match the index raises IndexDamaged."""

  def __init__(self, index_dir: str | os.PathLike, rows: int):
    index_dir = pathlib.Path(index_dir)
    root = index_dir / FOLDER
    self.path = root / "strips.bin"
    self.available = exists_inside(index_dir, FOLDER, "thumbnails.json")
    self.starts = self.lengths = np.zeros(0, np.int64)
    self._data = np.zeros(0, np.uint8)
    if not self.available:
      return
    inside(index_dir, FOLDER, kind="dir")
    info_path = inside(index_dir, FOLDER, "thumbnails.json")
    info = read_json(info_path)
    if not isinstance(info, dict) or info.get("rows") != rows:
      raise IndexDamaged(f"{info_path} describes {info.get('rows') if isinstance(info, dict) else info!r} rows, "
                         f"not the index's {rows}; re-encode the index (or python -m clipvip_jax.index thumbnails)")
    arrays = []
    for name in ("strips.starts.npy", "strips.lengths.npy"):
      path = inside(index_dir, FOLDER, name)
      try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
      except (ValueError, OSError, EOFError) as e:
        raise IndexDamaged(f"{path} is not a readable .npy array ({e})") from None
      if array.shape != (rows,) or not np.issubdtype(array.dtype, np.integer):
        raise IndexDamaged(f"{path} holds {array.dtype} {tuple(array.shape)}, not {rows} integer offsets")
      arrays.append(array)
    self.starts, self.lengths = arrays
    self.path = inside(index_dir, FOLDER, "strips.bin")
    self.size = os.path.getsize(self.path)
    self._data = np.memmap(self.path, np.uint8, "r") if self.size else np.zeros(0, np.uint8)

  def _span(self, row: int) -> tuple[int, int] | None:
    if not (self.available and 0 <= row < len(self.lengths)):
      return None
    start, length = int(self.starts[row]), int(self.lengths[row])
    if length <= 0 or start < 0 or start + length > self.size or length < 2:
      return None
    if self._data[start] != 0xFF or self._data[start + 1] != 0xD8:  # not a JPEG: never served as one
      return None
    return start, length

  def has(self, row: int) -> bool:
    return self._span(row) is not None

  def strip(self, row: int) -> bytes | None:
    span = self._span(row)
    if span is None:
      return None
    start, length = span
    return self._data[start:start + length].tobytes()

  def problems(self, limit: int = 5) -> list[str]:
    """What is wrong with the strips (index verify): entries outside strips.bin, negative, or not JPEG."""
    if not self.available:
      return []
    starts, lengths = np.asarray(self.starts, np.int64), np.asarray(self.lengths, np.int64)
    outside = (starts < 0) | (lengths < 0) | (starts + lengths > self.size)
    found = [f"{self.path.with_name('strips.lengths.npy')}: row {r} spans bytes {int(starts[r])}.."
             f"{int(starts[r] + lengths[r])}, outside {self.path} ({self.size} bytes)"
             for r in np.flatnonzero(outside)[:limit].tolist()]
    rest = (lengths > 0) & ~outside
    if rest.any():
      first = np.where(rest, starts, 0)
      second = np.where(rest, np.minimum(starts + 1, max(self.size - 1, 0)), 0)
      data = np.asarray(self._data) if self.size else np.zeros(1, np.uint8)
      not_jpeg = rest & ((lengths < 2) | (data[first] != 0xFF) | (data[second] != 0xD8))
      found += [f"{self.path}: the strip of row {r} is not a JPEG" for r in np.flatnonzero(not_jpeg)[:limit].tolist()]
    else:
      not_jpeg = rest
    more = int(outside.sum()) + int(not_jpeg.sum()) - len(found)
    if more > 0:
      found.append(f"{self.path}: {more} more damaged strips")
    return found
