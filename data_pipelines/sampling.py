"""Which frames of a stored clip become the T model frames.

Two rules, one per original:

* CLIP-ViP (`clipvip_frame_indices`): train draws a random start in the first interval and a random end in the
  last one, then takes T evenly spaced frames between them; test takes T evenly spaced frames over the whole clip.
  A clip shorter than T yields repeated indices (linspace over fewer frames than points), never padding, so every
  frame mask is 1.
* CLIP2Video / CLIP4Clip (`clip2video_frame_indices`): uniform sub-sampling to at most T frames with, in training,
  interior frames jittered by up to half a step; a clip shorter than T keeps all its frames and the remaining
  slots are padding (zero frames, mask 0).

Both return `(indices, mask)`: `indices` int64 [T] into the stored frames (padding slots point at frame 0 and
must be zeroed by the caller), `mask` int32 [T] (1 = real frame). Randomness comes only from the explicit
`np.random.Generator`, so a record's frames are a pure function of (record, seed).
"""

from __future__ import annotations

import numpy as np


def _check(total: int, num_frames: int) -> None:
  if total < 1:
    raise ValueError(f"a clip needs at least one stored frame, got total={total}")
  if num_frames < 1:
    raise ValueError(f"num_frames must be >= 1, got {num_frames}")


def clipvip_frame_indices(total: int, num_frames: int, train: bool,
                          rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
  """CLIP-ViP frame sampling (spec "Data", first bullet).

  train: interval = int(total / (T-1)); start ~ U{0..interval}; end ~ U{total-1-interval .. total-1};
         indices = linspace(start, end, T) cast to int.
  test:  indices = linspace(0, total-1, T) cast to int.

  Deviations, each only where the original formula is undefined or reads out of range:
  * T == 1: the original divides by zero; we take the middle frame (total // 2) in train and test.
  * The drawn start/end are clipped to [0, total-1]. This changes nothing for T >= 3 (interval <= total/2 keeps
    both in range) and only matters for T == 2, where start can reach `total` and end can reach -1.
  For tiny clips start may exceed end; the original then yields frames in reverse order, and so do we.
  """
  _check(total, num_frames)
  mask = np.ones(num_frames, np.int32)
  if num_frames == 1:
    return np.array([total // 2], np.int64), mask
  if not train:
    return np.linspace(0, total - 1, num_frames).astype(np.int64), mask
  if rng is None:
    raise ValueError("training frame sampling needs an np.random.Generator")
  interval = int(total / (num_frames - 1))
  # Generator.integers(low, high) excludes high, so +1 gives the inclusive ranges of the original's randint.
  start = int(rng.integers(0, interval + 1))
  end = int(rng.integers(total - 1 - interval, total))
  start = min(max(start, 0), total - 1)
  end = min(max(end, 0), total - 1)
  return np.linspace(start, end, num_frames).astype(np.int64), mask


def clip2video_frame_indices(total: int, num_frames: int, train: bool,
                             rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
  """CLIP2Video / CLIP4Clip frame sampling (spec clip2video.md "Data").

  * total <= T: every stored frame, in order, then padding slots (index 0, mask 0) up to T.
  * total > T: base = linspace(0, total-1, T) cast to int. In training, with step = (base[1]-base[0]) // 2 > 0,
    each interior index moves by an offset drawn from U{-step .. step-1} (half-open, as the original's randint);
    the first and last frames stay fixed.
  * T == 1 and total > 1: the middle frame (linspace would pick frame 0; the middle frame is the useful choice and
    matches CLIP-ViP's handling here).
  """
  _check(total, num_frames)
  if total <= num_frames:
    indices = np.zeros(num_frames, np.int64)
    indices[:total] = np.arange(total)
    mask = np.zeros(num_frames, np.int32)
    mask[:total] = 1
    return indices, mask
  mask = np.ones(num_frames, np.int32)
  if num_frames == 1:
    return np.array([total // 2], np.int64), mask
  indices = np.linspace(0, total - 1, num_frames).astype(np.int64)
  if train:
    if rng is None:
      raise ValueError("training frame sampling needs an np.random.Generator")
    step = int(indices[1] - indices[0]) // 2
    if step > 0 and num_frames > 2:
      indices[1:-1] += rng.integers(-step, step, size=num_frames - 2)
  return indices, mask


def subsample_to_rate(total: int, stored_fps: float, target_fps: float | None) -> np.ndarray:
  """Indices that thin a clip stored at `stored_fps` down to `target_fps` (CLIP2Video extracts 5 fps).

  Returns all indices when no target is given, the stored rate is unknown (<= 0) or already at/below the target.
  """
  if not target_fps or stored_fps <= 0 or stored_fps <= target_fps:
    return np.arange(total, dtype=np.int64)
  kept = max(1, int(total * target_fps / stored_fps))
  return np.linspace(0, total - 1, kept).astype(np.int64)


SAMPLERS = {"clipvip": clipvip_frame_indices, "clip2video": clip2video_frame_indices}


def frame_indices(rule: str, total: int, num_frames: int, train: bool,
                  rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Dispatch on the config's `sampling` key ('clipvip' | 'clip2video')."""
  try:
    sampler = SAMPLERS[rule]
  except KeyError:
    raise ValueError(f"data.sampling must be one of {sorted(SAMPLERS)}, got {rule!r}") from None
  return sampler(total, num_frames, train, rng)
