"""Pixels: JPEG decode of the sampled frames, resize, CLIP normalisation.

Decoding goes through simplejpeg (libjpeg-turbo called straight from C) when it is installed, PIL otherwise:
the same libjpeg-turbo decode (integer IDCT, fancy upsampling), the same pixels (tests/test_sampling.py checks
it), without PIL's per-image Python header parsing. Frames stored model-ready (build_shards --frame-size: already
image_size x image_size, as the recipe feeds them) skip the resize, which costs more than the decode: the host then
only decodes (docs/performance.md section 8 has the figures and the command).

Frames stay uint8 until the last step, so a worker moves 1 byte per pixel through decode and resize and only the
final normalisation writes float32/bfloat16 (a gather from a table of the 768 possible values, cheaper than a
multiply-add over the float array, and written straight in bfloat16 without a float32 copy). `normalize_video` also accepts jax.numpy arrays, so a pipeline that ships uint8 (dtype 'uint8')
can normalise on the accelerator instead.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import ml_dtypes
import numpy as np
from PIL import Image

try:
  import simplejpeg
except ImportError:  # optional: PIL decodes the same pixels, slower
  simplejpeg = None

# OpenAI CLIP's pixel statistics, used by both originals.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RESIZE_MODES = ("squash", "crop")
VIDEO_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "uint8": np.uint8}

# The normalised value (v / 255 - mean_c) / std_c of every uint8 level v and channel c, at position 3 * v + c:
# normalising is then one gather from a 768-entry table per pixel, written contiguously in the output dtype.
_LEVELS = ((np.arange(256, dtype=np.float64)[:, None] / 255.0 - np.asarray(CLIP_MEAN)[None, :])
           / np.asarray(CLIP_STD)[None, :]).reshape(-1)
_CHANNEL = np.arange(3, dtype=np.uint16)


def video_dtype(name: str) -> Any:
  try:
    return VIDEO_DTYPES[name]
  except KeyError:
    raise ValueError(f"data.dtype must be one of {sorted(VIDEO_DTYPES)}, got {name!r}") from None


def _draft_size(width: int, height: int, min_size: int) -> tuple[int, int]:
  """The size PIL's draft mode decodes a width x height JPEG at for a requested min_size: the largest of the
  libjpeg scales 1/8, 1/4, 1/2 that keeps both sides >= min_size (1/1 if none), sides rounded up."""
  scale = min(width // min_size, height // min_size)
  for denom in (8, 4, 2):
    if scale >= denom:
      return -(-width // denom), -(-height // denom)
  return width, height


def decode_jpeg(data: bytes, min_size: int | None = None) -> np.ndarray:
  """Decodes one frame (JPEG, or any image PIL reads) to uint8 RGB [H, W, 3].

  With `min_size`, libjpeg's DCT-domain scaling (PIL draft mode) decodes at the smallest 1/2, 1/4 or 1/8 scale that
  still keeps both sides >= min_size; for frames stored much larger than the model input this skips most of the
  decode work. It never triggers for shards stored at short side 256 and a 224 input. Raises ValueError or OSError
  on bytes that are not a complete image (a truncated JPEG included).
  """
  if simplejpeg is not None and data[:2] == b"\xff\xd8":
    try:
      kwargs = {}
      if min_size:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        draft_w, draft_h = _draft_size(width, height, min_size)
        if (draft_w, draft_h) != (width, height):  # the same scale PIL's draft picks
          kwargs = dict(min_width=draft_w, min_height=draft_h)
      return simplejpeg.decode_jpeg(data, colorspace="RGB", **kwargs)
    except ValueError:
      pass  # a JPEG simplejpeg does not take (e.g. CMYK): PIL decides, and raises on a damaged one
  img = Image.open(io.BytesIO(data))
  if min_size is not None and img.format == "JPEG":
    img.draft("RGB", (min_size, min_size))
  if img.mode != "RGB":
    img = img.convert("RGB")
  img.load()
  return np.asarray(img, dtype=np.uint8)


def resize_frame(img: np.ndarray | Image.Image, image_size: int, mode: str) -> np.ndarray:
  """uint8 [S, S, 3] from one frame (uint8 [H, W, 3] or a PIL image); a frame already S x S is returned as it is
  (both modes are the identity on it).

  'squash' (CLIP-ViP): bicubic straight to S x S, aspect ratio not kept.
  'crop' (CLIP2Video): bicubic so the short side is S (long side int(S * long / short), torchvision Resize), then
  the centre S x S crop with offsets round((side - S) / 2) (torchvision CenterCrop).
  """
  if mode not in RESIZE_MODES:
    raise ValueError(f"data.resize_mode must be one of {RESIZE_MODES}, got {mode!r}")
  if isinstance(img, np.ndarray):
    if img.shape[:2] == (image_size, image_size):
      return img
    img = Image.fromarray(img)
  if img.size == (image_size, image_size):
    return np.asarray(img, dtype=np.uint8)
  if mode == "squash":
    img = img.resize((image_size, image_size), Image.BICUBIC)
  else:
    w, h = img.size
    if w <= h:
      new_w, new_h = image_size, int(image_size * h / w)
    else:
      new_w, new_h = int(image_size * w / h), image_size
    left = int(round((new_w - image_size) / 2.0))
    top = int(round((new_h - image_size) / 2.0))
    # Resampling only the source box that maps onto the crop computes the S x S output directly instead of the
    # whole resized frame (half the work for 16:9); it equals resize-then-crop up to +-1 on a few pixels.
    scale_x, scale_y = w / new_w, h / new_h
    box = (left * scale_x, top * scale_y, (left + image_size) * scale_x, (top + image_size) * scale_y)
    img = img.resize((image_size, image_size), Image.BICUBIC, box=box)
  return np.asarray(img, dtype=np.uint8)


def decode_frames(frames: Sequence[bytes], indices: np.ndarray, mask: np.ndarray, image_size: int,
                  mode: str) -> np.ndarray:
  """uint8 [T, S, S, 3]: decodes only the sampled frames, each distinct index once (CLIP-ViP's linspace repeats
  indices on short clips); slots with mask 0 stay zero. Raises ValueError naming the frame on a bad JPEG."""
  out = np.zeros((len(indices), image_size, image_size, 3), np.uint8)
  decoded: dict[int, np.ndarray] = {}
  for slot, (index, valid) in enumerate(zip(indices.tolist(), mask.tolist())):
    if not valid:
      continue
    if index not in decoded:
      try:
        decoded[index] = resize_frame(decode_jpeg(frames[index], image_size), image_size, mode)
      except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for truncated / non-image bytes
        raise ValueError(f"frame {index} is not a decodable image: {e}") from e
    out[slot] = decoded[index]
  return out


def normalize_frames(video: np.ndarray, mask: np.ndarray | None, dtype: Any) -> np.ndarray:
  """uint8 [..., H, W, 3] -> CLIP-normalised `dtype`; frames with mask 0 become exact zeros (CLIP2Video pads with
  zero tensors after normalisation). dtype uint8 returns the input unchanged (normalise later on device)."""
  if np.dtype(dtype) == np.uint8:
    return video
  index = video.astype(np.uint16)
  index *= 3
  index += _CHANNEL
  out = np.take(_LEVELS.astype(dtype), index)
  if mask is not None:
    out[np.asarray(mask) == 0] = 0
  return out


def normalize_video(video: Any, frame_mask: Any = None, xp: Any = np) -> Any:
  """The same normalisation for uint8 video shipped to the accelerator: `xp` is numpy or jax.numpy.

  video [..., T, H, W, 3] uint8, frame_mask [..., T] (optional) -> float32.
  """
  mean = xp.asarray(CLIP_MEAN, dtype=xp.float32)
  std = xp.asarray(CLIP_STD, dtype=xp.float32)
  out = (video.astype(xp.float32) / 255.0 - mean) / std
  if frame_mask is not None:
    out = out * (frame_mask != 0)[..., None, None, None].astype(xp.float32)
  return out
