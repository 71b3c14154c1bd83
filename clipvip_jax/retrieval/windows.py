"""Moments: a long video cut into overlapping windows, each one index row carrying (video, start, end).

    spans = window_spans(duration=61.3, window=8.0, stride=4.0)   # [(0, 8), (4, 12), ..., (52, 60), (53.3, 61.3)]
    for start, end, video, mask in video_windows(path, recipe, fps=5.0, window=8.0, stride=4.0): ...

The rule (window W, stride S <= W, a video whose time line ends at D):
  - D <= W: one window [0, D], the whole video: exactly the row a whole-clip encode gives it;
  - otherwise the windows [kS, kS + W] for every k with kS + W <= D, and, when the last of them ends before D, one
    more window [D - W, D] flush with the end, so every instant of the video is in at least one window, every window
    is W long, and no window reaches past the video.
Each window is sampled as a whole clip is (video_files.load_video): the frames kept at `fps` whose time t has
start <= t < end, the recipe's test-time rule picking T of them, resized and normalised the same way. The video is
decoded once, in order (video_io.FrameStream): a window is cut from a buffer of the last W + S seconds of kept
frames as soon as a frame past its end arrives, so memory does not grow with the video's length.

Defaults: a window of 0.5 s per model frame (CLIP-ViP and CLIP2Video's 12 frames: 6 s, the short end of the 6-12 s
those 12 frames cover in their MSR-VTT fine-tuning; the demo's 4 frames: 2 s, exactly the span of the clips it was
trained on), and a stride of half the window: then any moment W long overlaps some window by at least 3W/4, an IoU
of at least 0.6, so the 0.5 threshold of the moment-retrieval convention is within reach for every moment of the
window's length. Shorter is better for finding moments as long as the frames stay as far apart as the model was
trained on: a window longer than the moment mixes in what surrounds it (docs/performance.md section 10: with
2/3 s a frame the demo's CLIP-ViP found 17% of the moments at R@1, IoU >= 0.5; with 0.5 s, the figure there).
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import queue
import threading
from typing import Any, Callable, Iterator, Sequence

import numpy as np

SECONDS_PER_FRAME = 0.5
_EPS = 1e-6  # seconds: timestamps are exact fractions turned into floats


def default_window(num_frames: int) -> float:
  return round(num_frames * SECONDS_PER_FRAME, 3)


def default_stride(window: float) -> float:
  return round(window / 2, 3)


def check_window(window: float, stride: float) -> None:
  """Raises ValueError (one sentence) for a window or stride that cannot cut a video into covering windows."""
  if not (math.isfinite(window) and window > 0):
    raise ValueError(f"--window must be a number of seconds > 0, got {window}")
  if not (math.isfinite(stride) and stride > 0):
    raise ValueError(f"--stride must be a number of seconds > 0, got {stride}")
  if stride > window + _EPS:
    raise ValueError(f"--stride {stride:g} is longer than --window {window:g}: the windows would leave gaps")


def window_spans(duration: float, window: float, stride: float) -> list[tuple[float, float]]:
  """The (start, end) seconds of a video's windows (module doc)."""
  if duration <= window + _EPS:
    return [(0.0, float(duration))]
  count = int(math.floor((duration - window) / stride + _EPS)) + 1
  spans = [(k * stride, k * stride + window) for k in range(count)]
  if spans[-1][1] < duration - _EPS:
    spans.append((duration - window, float(duration)))
  return [(round(s, 6), round(e, 6)) for s, e in spans]


def _sample(frames: Sequence[tuple[float, bytes]], kept_fps: float, recipe) -> tuple[np.ndarray, np.ndarray]:
  """A window's frames -> (float32 [T, S, S, 3], mask [T]), as video_files.load_video prepares a clip."""
  from data_pipelines import sampling, transforms
  data = [f for _, f in frames]
  kept = (sampling.subsample_to_rate(len(data), kept_fps, recipe.target_fps) if recipe.sampling == "clip2video"
          else np.arange(len(data)))
  picks, mask = sampling.frame_indices(recipe.sampling, len(kept), recipe.num_frames, False)
  video = transforms.decode_frames(data, kept[picks], mask, recipe.image_size, recipe.resize_mode)
  return transforms.normalize_frames(video, mask, np.float32), mask


def video_windows(path, recipe, fps: float, window: float, stride: float
                  ) -> Iterator[tuple[float, float, np.ndarray, np.ndarray]]:
  """(start, end, video, mask) of every window of one video file, in order, decoding it once (module doc). A
  window without any kept frame (a gap in a variable-rate file) gives no row. Raises VideoReadError."""
  from data_pipelines import video_io
  options = video_io.FrameOptions(fps=fps, short_side=recipe.image_size)
  stream = video_io.FrameStream(str(path), options)
  buffer: collections.deque[tuple[float, bytes]] = collections.deque()
  emitted = 0

  def cut(start: float, end: float):
    while buffer and buffer[0][0] < start - _EPS:  # frames before the window being cut are never needed again
      buffer.popleft()
    frames = [f for f in buffer if start - _EPS <= f[0] < end - _EPS]
    if frames:
      video, mask = _sample(frames, _kept_rate(frames, fps), recipe)
      return start, end, video, mask
    return None

  for t, data in stream:
    while t >= emitted * stride + window - _EPS:  # window `emitted` is whole: a frame past its end arrived
      start = emitted * stride
      emitted += 1
      item = cut(round(start, 6), round(start + window, 6))
      if item is not None:
        yield item
    buffer.append((t, data))
  for start, end in window_spans(stream.end, window, stride)[emitted:]:
    item = cut(start, end)
    if item is not None:
      yield item


def _kept_rate(frames: Sequence[tuple[float, bytes]], fps: float) -> float:
  """The rate of the kept frames (CLIP2Video's thinning needs it): `fps`, or the source's when it is slower."""
  if len(frames) < 2:
    return fps
  measured = (len(frames) - 1) / max(frames[-1][0] - frames[0][0], _EPS)
  return min(fps, measured) if fps > 0 else measured


def ordered_streams(produce: Callable[[Any], Iterator[Any]], items: Sequence[Any], workers: int,
                    buffer: int) -> Iterator[tuple[int, Any, BaseException | None]]:
  """(item number, produced value, None) for every value of produce(item), items in order and each item's values
  in order; then (item number, None, error or None) closes each item (error: what its producer raised). Up to `workers` items are produced at
  once in threads (decoding releases the GIL), each holding at most `buffer` values: memory is bounded however
  long a video is."""
  stop = threading.Event()
  done = object()

  def put(out: queue.Queue, entry) -> bool:
    while not stop.is_set():
      try:
        out.put(entry, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def run(item, out: queue.Queue):
    try:
      for value in produce(item):
        if not put(out, (value, None)):
          return
      put(out, (done, None))
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, which decides
      put(out, (done, e))

  workers = max(1, workers)
  with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="clipvip-windows") as pool:
    queues: collections.deque[queue.Queue] = collections.deque()
    todo = iter(enumerate(items))

    def submit() -> None:
      nxt = next(todo, None)
      if nxt is not None:
        q: queue.Queue = queue.Queue(maxsize=buffer)
        q.number = nxt[0]  # type: ignore[attr-defined]
        pool.submit(run, nxt[1], q)
        queues.append(q)

    try:
      for _ in range(workers):
        submit()
      while queues:
        q = queues.popleft()
        while True:
          value, error = q.get()
          if value is done:
            yield q.number, None, error
            break
          yield q.number, value, None
        submit()
    finally:
      stop.set()
      for q in queues:  # unblock producers waiting on a full queue
        while not q.empty():
          q.get_nowait()
