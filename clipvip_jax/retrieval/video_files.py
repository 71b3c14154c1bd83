"""Video files as encode reads them: finding the clips under a folder, and one clip's test-time model input.

A clip is a video file (video_io's extensions) or a folder of frame images. `load_video` prepares it as the
model's original does at test time: decoded with data_pipelines.video_io at `fps` (frames resized on the short
side, as build_shards stores them), T frames chosen with the test-time rule, resized (CLIP-ViP: squash to S x S;
CLIP2Video and image CLIPs: short side + centre crop) and CLIP-normalised. `ordered_map` decodes in threads.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import pathlib
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from clipvip_jax.retrieval.model import VideoRecipe


def find_videos(videos_dir: str | os.PathLike) -> list[tuple[str, pathlib.Path]]:
  """(id, path) of every clip under `videos_dir`, in natural name order: video files (video_io's extensions)
  anywhere below it, and folders of frame images (a folder holding image files is one clip). The id is the path
  relative to `videos_dir` without the video extension. Hidden entries (".DS_Store", macOS "._clip.mp4"
  resource forks, ".git") are not clips and are passed over."""
  from data_pipelines import video_io
  root = pathlib.Path(videos_dir)
  found: list[tuple[str, pathlib.Path]] = []

  def visit(folder: pathlib.Path) -> None:
    entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".")),
                     key=lambda p: video_io.natural_sort_key(p.name))
    for entry in entries:
      if entry.is_dir():
        if any(f.suffix.lower() in video_io.IMAGE_EXTENSIONS for f in entry.iterdir() if f.is_file()):
          found.append((entry.relative_to(root).as_posix(), entry))
        else:
          visit(entry)
      elif entry.suffix.lower() in video_io.VIDEO_EXTENSIONS:
        found.append((entry.relative_to(root).with_suffix("").as_posix(), entry))

  visit(root)
  counts = collections.Counter(clip_id for clip_id, _ in found)
  # Two files differing only in their container (a.mp4, a.webm) keep their full names to stay distinct.
  return [(path.relative_to(root).as_posix() if counts[clip_id] > 1 else clip_id, path) for clip_id, path in found]


def load_video(path: str | os.PathLike, recipe: VideoRecipe, fps: float) -> tuple[np.ndarray, np.ndarray]:
  """(float32 [T, S, S, 3] CLIP-normalised, int32 mask [T]) of one video file or frame folder, test-time frames.

  The same steps as an evaluation batch read from shards (data_pipelines.examples): frames kept at `fps` and
  resized on the short side to S (video_io.read_clip, as build_shards stores them), then the recipe's sampling,
  decode, resize and normalisation. Raises video_io.VideoReadError / ValueError for a bad input.
  """
  from data_pipelines import sampling, transforms, video_io
  clip = video_io.read_clip(str(path), video_io.FrameOptions(fps=fps, short_side=recipe.image_size))
  total = len(clip.frames)
  kept = (sampling.subsample_to_rate(total, clip.fps, recipe.target_fps) if recipe.sampling == "clip2video"
          else np.arange(total))
  picks, mask = sampling.frame_indices(recipe.sampling, len(kept), recipe.num_frames, False)
  frames = transforms.decode_frames(clip.frames, kept[picks], mask, recipe.image_size, recipe.resize_mode)
  return transforms.normalize_frames(frames, mask, np.float32), mask


def ordered_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int, window: int) -> Iterator[Any]:
  """fn over items in order, `workers` threads (PyAV and PIL release the GIL while decoding), with at most
  `window` results in flight so memory stays bounded however many videos there are."""
  if workers <= 1:
    yield from map(fn, items)
    return
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    todo = iter(items)
    pending = collections.deque(pool.submit(fn, item) for item, _ in zip(todo, range(window)))
    while pending:
      result = pending.popleft().result()
      nxt = next(todo, _END)
      if nxt is not _END:
        pending.append(pool.submit(fn, nxt))
      yield result


_END = object()
