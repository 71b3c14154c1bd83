"""Reading one clip's frames from a video file or a folder of images, at a fixed rate, resized and JPEG-encoded.

This is the frame-extraction recipe every shard writer shares (build_shards, the TFDS builders, their Beam
jobs), so a clip is stored the same way whichever tool wrote it:

* Decoding: PyAV (FFmpeg) for video files (mp4, avi, webm, mkv, anything FFmpeg opens); a directory is a
  folder of frame images (jpg/jpeg/png/bmp/webp), ordered by name with numbers compared as numbers
  (`frame_2` before `frame_10`).
* Rate: the originals extract frames at a fixed rate with ffmpeg (CLIP2Video: 5 fps) and then sample T of
  them. Here a frame with timestamp t (seconds from the clip start) is kept when t reaches the next target
  time k / fps (k = 0, 1, 2, ...); after keeping it, the next target is the first multiple of 1 / fps
  strictly after t. So a 30 fps source at 5 fps keeps frames 0, 6, 12, ...; a source slower than `fps` keeps
  every frame (no frame is ever duplicated). Timestamps are exact fractions (pts * time_base), so the rule
  has no rounding. fps = 0 keeps every frame (exact parity with CLIP-ViP, which samples over all frames).
* Segments: with start/end (seconds in the source), frames with start <= t < end are kept and the targets
  are start + k / fps.
* Resize: the short side is resized to `short_side` with PIL bicubic, the long side to round(long * ratio);
  frames whose short side is already <= short_side are stored as they are (no upscaling, so small sources
  are not interpolated twice); short_side = 0 keeps the original size. Model-ready frames (`frame_size` S > 0)
  are instead resized from the full-resolution decode straight to what the recipe feeds the model, S x S by
  `resize_mode` (transforms.resize_frame: 'squash' for CLIP-ViP, 'crop' for CLIP2Video), so the input pipeline
  only decodes them; the originals also resize once from the full-resolution frame.
* JPEG: PIL, quality `jpeg_quality` (default 90), 4:2:0 chroma subsampling (PIL's default), no optimisation
  pass, so the bytes are a deterministic function of the pixels.

Anything wrong with an input raises `VideoReadError` whose message is the skip reason the shard writers
put in their manifest: missing, empty, not a video, no video stream, undecodable, truncated.
"""

from __future__ import annotations

import dataclasses
import fractions
import io
import math
import os
import re
from collections.abc import Iterator

import av
import numpy as np
from PIL import Image

from data_pipelines import transforms

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".3gp")

Fraction = fractions.Fraction


class VideoReadError(Exception):
  """An input that cannot become a clip; the message is the reason recorded in the manifest."""


@dataclasses.dataclass(frozen=True)
class FrameOptions:
  """How frames are extracted; every field changes the stored bytes, so all of them go into the manifest.

  fps: rate of kept frames (0 = every frame). 5 is the rate CLIP2Video extracts at; 12 frames sampled from
    a 10-30 s clip at 5 fps are as far apart as the originals' samples over all frames.
  short_side: stored short side in pixels (0 = original size). 224 is what both originals feed the model
    (CLIP2Video: short side 224 then centre crop; CLIP-ViP: squash to 224x224), so the pipeline's resize is
    an identity or a downscale and never upsamples a smaller stored frame.
  jpeg_quality: PIL JPEG quality of stored frames.
  folder_fps: rate at which a folder of frame images was extracted; 0 = unknown, then every image is kept,
    the record's fps is 0.0, and start/end cannot be applied.
  max_missing_seconds: a video whose decoded frames end more than this before the duration its container
    declares (or before `end`) is reported as truncated rather than stored short.
  frame_size, resize_mode: frame_size > 0 stores model-ready frames, frame_size x frame_size as `resize_mode`
    makes them (replaces short_side); the pipeline must then ask for that image_size and resize_mode
    (manifest.check_stored_frames).
  """
  fps: float = 5.0
  short_side: int = 224
  jpeg_quality: int = 90
  folder_fps: float = 0.0
  max_missing_seconds: float = 1.0
  frame_size: int = 0
  resize_mode: str = "squash"

  def __post_init__(self):
    if not (self.fps >= 0 and math.isfinite(self.fps)):
      raise ValueError(f"fps must be a finite number >= 0, got {self.fps}")
    if self.short_side < 0:
      raise ValueError(f"short_side must be >= 0, got {self.short_side}")
    if not 1 <= self.jpeg_quality <= 100:
      raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
    if not (self.folder_fps >= 0 and math.isfinite(self.folder_fps)):
      raise ValueError(f"folder_fps must be a finite number >= 0, got {self.folder_fps}")
    if self.max_missing_seconds < 0:
      raise ValueError(f"max_missing_seconds must be >= 0, got {self.max_missing_seconds}")
    if self.frame_size < 0:
      raise ValueError(f"frame_size must be >= 0, got {self.frame_size}")
    if self.resize_mode not in transforms.RESIZE_MODES:
      raise ValueError(f"resize_mode must be one of {transforms.RESIZE_MODES}, got {self.resize_mode!r}")

  def manifest_fields(self) -> dict:
    """The options as the manifest (and a resumed build's fingerprint) records them; the model-ready fields
    only when used, so shards built before they existed keep their fingerprint."""
    fields = dataclasses.asdict(self)
    if not self.frame_size:
      del fields["frame_size"], fields["resize_mode"]
    return fields

  def shape(self, image: Image.Image) -> Image.Image:
    """One decoded frame as it is stored: model-ready S x S, or resized to the short side."""
    if self.frame_size:
      return Image.fromarray(transforms.resize_frame(image.convert("RGB"), self.frame_size, self.resize_mode))
    return resize_short_side(image, self.short_side)


@dataclasses.dataclass
class ClipFrames:
  """What a clip's source gave: encoded frames plus the rates that the record stores."""
  frames: list[bytes]
  fps: float          # rate of the kept frames (0.0 when the source rate is unknown and every frame is kept)
  source_fps: float   # source frame rate (0.0 when unknown)


class RateSelector:
  """Keeps a frame when its timestamp reaches the next multiple of 1/fps (after `start`); see the module doc."""

  def __init__(self, fps: float, start: Fraction = Fraction(0)):
    # limit_denominator turns a float such as 2.5 or 29.97 into the exact rate the user meant.
    self._rate = Fraction(fps).limit_denominator(1_000_000) if fps > 0 else None
    self._start = start
    self._next = start

  def keep(self, t: Fraction) -> bool:
    if t < self._start:
      return False
    if self._rate is None:
      return True
    if t < self._next:
      return False
    # Next target: the first start + k / fps strictly after t, so a frame that jumps over several targets is
    # kept once (never duplicated).
    k = math.floor((t - self._start) * self._rate) + 1
    self._next = self._start + k / self._rate
    return True


def resize_short_side(image: Image.Image, short_side: int) -> Image.Image:
  """Bicubic resize so that min(w, h) == short_side; no-op when short_side is 0 or the image is not larger."""
  w, h = image.size
  if short_side <= 0 or min(w, h) <= short_side:
    return image
  scale = short_side / min(w, h)
  size = (short_side, max(1, round(h * scale))) if w <= h else (max(1, round(w * scale)), short_side)
  return image.resize(size, Image.Resampling.BICUBIC)


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
  buf = io.BytesIO()
  image.convert("RGB").save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


# One frame's bytes -> uint8 RGB [H, W, 3]: the loader's decode (simplejpeg, or PIL), so tools that read shards see
# the pixels training sees.
decode_jpeg = transforms.decode_jpeg


def natural_sort_key(name: str) -> list:
  """'frame_2.jpg' < 'frame_10.jpg': digit runs compare as integers (split() alternates text and digits)."""
  return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def resolve_video_path(videos_dir: str, video: str) -> str:
  """videos_dir/video when it exists; else the first videos_dir/video + extension (VIDEO_EXTENSIONS order)
  that exists, because official annotation files name videos by id ("video7010") and leave the container
  to the download. A name found nowhere returns the plain join (read_clip then reports 'file not found')."""
  path = os.path.join(videos_dir, video)
  if os.path.exists(path):
    return path
  for ext in VIDEO_EXTENSIONS:
    if os.path.exists(path + ext):
      return path + ext
  return path


def read_clip(path: str, options: FrameOptions, start: float | None = None, end: float | None = None) -> ClipFrames:
  """Frames of one clip from a video file or a frame folder, selected, resized and encoded per `options`."""
  if os.path.isdir(path):
    return _read_frame_folder(path, options, start, end)
  return _read_video_file(path, options, start, end)


def _check_segment(start: float | None, end: float | None) -> tuple[Fraction, Fraction | None]:
  start_f = Fraction(start).limit_denominator(1_000_000) if start else Fraction(0)
  end_f = Fraction(end).limit_denominator(1_000_000) if end is not None else None
  return start_f, end_f


def _read_frame_folder(path: str, options: FrameOptions, start: float | None, end: float | None) -> ClipFrames:
  names = sorted((n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS)), key=natural_sort_key)
  if not names:
    raise VideoReadError(f"frame folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
  start_f, end_f = _check_segment(start, end)
  if (start_f > 0 or end_f is not None) and options.folder_fps <= 0:
    raise VideoReadError("start/end given for a frame folder whose rate is unknown (set folder_fps / --folder-fps)")
  folder_rate = Fraction(options.folder_fps).limit_denominator(1_000_000) if options.folder_fps > 0 else None
  selector = RateSelector(options.fps if folder_rate else 0.0, start_f)
  frames = []
  for i, name in enumerate(names):
    t = i / folder_rate if folder_rate else Fraction(i)
    if end_f is not None and t >= end_f:
      break
    if not selector.keep(t):
      continue
    try:
      with Image.open(os.path.join(path, name)) as im:
        image = im.convert("RGB")
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError) for a bad file
      raise VideoReadError(f"unreadable image {name!r} ({type(e).__name__}: {e})") from e
    frames.append(encode_jpeg(options.shape(image), options.jpeg_quality))
  if not frames:
    raise VideoReadError(f"no frame in the segment [{start}, {end}) of a {len(names)}-image folder")
  source_fps = float(options.folder_fps)
  kept_fps = min(options.fps, source_fps) if options.fps > 0 else source_fps
  return ClipFrames(frames, float(kept_fps), source_fps)


def _open_container(path: str):
  if not os.path.exists(path):
    raise VideoReadError("file not found")
  if os.path.getsize(path) == 0:
    raise VideoReadError("empty file (0 bytes)")
  try:
    container = av.open(path)
  except av.FFmpegError as e:
    raise VideoReadError(f"not a readable video ({type(e).__name__}: {e})") from e
  if not container.streams.video:
    container.close()
    raise VideoReadError("no video stream (not a video, or truncated before the stream index)")
  return container


def _iter_timed_frames(container, stream, seek_to: Fraction | None) -> Iterator[tuple[Fraction, av.VideoFrame]]:
  """(seconds from the stream start, frame) in presentation order."""
  time_base = stream.time_base
  origin = stream.start_time
  rate = stream.average_rate or stream.guessed_rate
  if seek_to is not None and origin is not None:  # without a declared origin, seek targets are ambiguous
    container.seek(int(seek_to / time_base) + origin, stream=stream, backward=True)
  for index, frame in enumerate(container.decode(stream)):
    if frame.pts is not None and time_base is not None:
      if origin is None:
        origin = frame.pts  # no declared start time: the first frame is t = 0
      t = Fraction(frame.pts - origin) * time_base
    elif rate:
      t = index / Fraction(rate)  # no timestamps (rare raw streams): count frames at the declared rate
    else:
      raise VideoReadError("frames carry no timestamps and the stream declares no frame rate")
    yield t, frame


def _declared_duration(container, stream) -> Fraction | None:
  """The video stream's own duration: the stream header (mp4, avi), else the per-stream DURATION tag that
  FFmpeg's Matroska/WebM muxer writes, else the container's duration when the video is its only stream
  (with audio beside it the container's duration may be the audio's, so it proves nothing)."""
  if stream.duration and stream.time_base:
    return Fraction(stream.duration) * stream.time_base
  tag = stream.metadata.get("DURATION") or stream.metadata.get("duration")
  match = re.fullmatch(r"(\d+):(\d{2}):(\d{2}(?:\.\d+)?)", tag.strip()) if tag else None
  if match:
    hours, minutes, seconds = match.groups()
    return (int(hours) * 3600 + int(minutes) * 60) + Fraction(seconds)
  if container.duration and len(container.streams) == 1:
    return Fraction(container.duration, av.time_base)
  return None


def _read_video_file(path: str, options: FrameOptions, start: float | None, end: float | None) -> ClipFrames:
  start_f, end_f = _check_segment(start, end)
  # Seeking saves decoding the head of a long video (ActivityNet segments); if the demuxer lands after
  # `start` (possible with sparse indexes) the clip is decoded again from the beginning.
  clip = _read_video_pass(path, options, start_f, end_f, seek=start_f > 1)
  if clip is None:
    clip = _read_video_pass(path, options, start_f, end_f, seek=False)
  return clip


def _read_video_pass(path, options, start_f, end_f, seek: bool) -> ClipFrames | None:
  container = _open_container(path)
  try:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame threading: same pixels, faster decode
    try:
      frames, last_t = _decode_selected(container, stream, options, start_f, end_f, seek)
    except VideoReadError:
      raise
    except (av.FFmpegError, OSError, ValueError, RuntimeError) as e:
      raise VideoReadError(f"decode failed ({type(e).__name__}: {e})") from e
    if frames is None:
      return None
    if not frames:
      segment = start_f > 0 or end_f is not None
      what = f"the segment [{float(start_f)}, {float(end_f) if end_f else 'end'})" if segment else "the file"
      raise VideoReadError(f"no decodable frame in {what}")
    _check_not_truncated(container, stream, last_t, end_f, options.max_missing_seconds)
    rate = stream.average_rate or stream.guessed_rate
  finally:
    container.close()
  source_fps = float(rate) if rate else 0.0
  kept_fps = min(options.fps, source_fps) if options.fps > 0 and source_fps else (options.fps or source_fps)
  return ClipFrames(frames, float(kept_fps), source_fps)


def _decode_selected(container, stream, options, start_f, end_f, seek: bool):
  """Kept, resized, encoded frames and the last decoded timestamp; (None, None) when a seek overshot."""
  selector = RateSelector(options.fps, start_f)
  frames, last_t, first = [], None, True
  for t, frame in _iter_timed_frames(container, stream, start_f if seek else None):
    if first and seek and t > start_f:
      return None, None
    first = False
    if end_f is not None and t >= end_f:
      break
    last_t = t
    if selector.keep(t):
      image = options.shape(frame.to_image())
      frames.append(encode_jpeg(image, options.jpeg_quality))
  return frames, last_t


def _check_not_truncated(container, stream, last_t, end_f, max_missing_seconds):
  """A truncated webm/mkv decodes its first part without any error; compare with the declared duration."""
  declared = _declared_duration(container, stream)
  if declared is None:
    return
  needed = declared if end_f is None else min(declared, end_f)
  rate = stream.average_rate or stream.guessed_rate
  covered = last_t + (1 / Fraction(rate) if rate else 0)
  if covered + Fraction(max_missing_seconds).limit_denominator(1000) < needed:
    raise VideoReadError(
        f"truncated: decoded frames end at {float(covered):.2f}s but the file declares {float(declared):.2f}s")


class FrameStream:
  """The kept frames of one video file as (seconds, stored bytes), decoded once, in order, without holding the
  clip: what a windowed encode reads (clipvip_jax.retrieval.windows). The same frames as read_clip(path, options)
  keeps; after the iteration, `end` is where the video's time line ends (the last decoded frame's time plus one
  source frame), and a truncated file has raised VideoReadError as read_clip would."""

  def __init__(self, path: str, options: FrameOptions):
    self.path, self.options = str(path), options
    self.end: float | None = None

  def __iter__(self) -> Iterator[tuple[float, bytes]]:
    if os.path.isdir(self.path):
      raise VideoReadError("a frame folder has no time line (windows need a video file)")
    container = _open_container(self.path)
    try:
      stream = container.streams.video[0]
      stream.thread_type = "AUTO"
      selector, last_t = RateSelector(self.options.fps), None
      try:
        for t, frame in _iter_timed_frames(container, stream, None):
          last_t = t
          if selector.keep(t):
            yield float(t), encode_jpeg(self.options.shape(frame.to_image()), self.options.jpeg_quality)
      except VideoReadError:
        raise
      except (av.FFmpegError, OSError, ValueError, RuntimeError) as e:
        raise VideoReadError(f"decode failed ({type(e).__name__}: {e})") from e
      if last_t is None:
        raise VideoReadError("no decodable frame in the file")
      _check_not_truncated(container, stream, last_t, None, self.options.max_missing_seconds)
      rate = stream.average_rate or stream.guessed_rate
      self.end = float(last_t + (1 / Fraction(rate) if rate else 0))
    finally:
      container.close()


def declared_seconds(path: str) -> float | None:
  """A video file's duration as its container declares it (headers only, nothing decoded); None for a frame
  folder, an unreadable file, or one that declares none."""
  if os.path.isdir(path):
    return None
  try:
    container = _open_container(path)
  except VideoReadError:
    return None
  try:
    declared = _declared_duration(container, container.streams.video[0])
  except (av.FFmpegError, ValueError):
    declared = None
  finally:
    container.close()
  return None if declared is None else float(declared)
