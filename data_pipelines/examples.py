"""Record bytes -> model example: the per-clip work every Grain worker does.

A training example is a dict of numpy arrays:
  video      [T, S, S, 3]  float32 / bfloat16 (CLIP-normalised) or uint8 (raw, normalise on device)
  frame_mask [T] int32     1 = real frame, 0 = padding (CLIP2Video sampling of a clip shorter than T)
  text_ids   [L] int32, text_mask [L] int32: one caption drawn at random per draw (paragraph: all joined)
  clip_index int64         the record's key in the source
  valid      int32         0 for a row whose record is corrupt: a placeholder the loss masks out (the batch
                           builder in pipeline.py adds it)
and, for pretraining, subtitle_ids/subtitle_mask, caption_ids/caption_mask (the OFA caption, "None" when absent, as
the original) and image [S, S, 3] = the middle sampled frame.

An evaluation example has the video fields, clip_index and `valid` (0 for a corrupt record, whose video is zeros:
evaluation keeps every index so clip_index stays aligned with the caption table).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import grain
import numpy as np

from data_pipelines import records, sampling, transforms

TokenizeFn = Callable[[list[str], int], tuple[np.ndarray, np.ndarray]]


class DefaultTokenize:
  """`clipvip_jax.tokenizer.tokenize`, imported on first use (in the worker), so building a pipeline with a custom
  tokenize_fn never needs the tokenizer package."""

  def __call__(self, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    from clipvip_jax.tokenizer import tokenize  # pylint: disable=import-outside-toplevel

    return tokenize(texts, max_len)


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  """The per-clip settings an example op needs (a picklable slice of DataConfig)."""
  num_frames: int
  image_size: int
  resize_mode: str
  sampling: str
  max_text_len: int
  dtype: str
  paragraph: bool
  pretraining: bool
  target_fps: float | None


def clip_texts(rec: records.ClipRecord, paragraph: bool) -> list[str]:
  """The retrieval texts of a clip: its captions, or one paragraph of all of them joined with spaces (DiDeMo and
  ActivityNet, spec "Data"). Records without captions (pretraining) fall back to the subtitle, then the caption."""
  texts = [c for c in rec.captions if c] or [t for t in (rec.subtitle, rec.caption) if t]
  if not texts:
    raise ValueError(f"clip {rec.clip_id!r} has no text")
  return [" ".join(texts)] if paragraph else texts


def _sampled_video(rec: records.ClipRecord, spec: ExampleSpec, train: bool,
                   rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [T,S,S,3], mask [T]) from a decoded record; raises ValueError on a bad frame."""
  if not rec.frames:
    raise ValueError(f"clip {rec.clip_id!r} has no frames")
  kept = (sampling.subsample_to_rate(len(rec.frames), rec.fps, spec.target_fps)
          if spec.sampling == "clip2video" else np.arange(len(rec.frames)))
  picks, mask = sampling.frame_indices(spec.sampling, len(kept), spec.num_frames, train, rng)
  return transforms.decode_frames(rec.frames, kept[picks], mask, spec.image_size, spec.resize_mode), mask


def _tokenize_one(tokenize_fn: TokenizeFn, texts: list[str], max_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
  ids, mask = tokenize_fn(texts, max_len)
  ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
  if ids.shape != (len(texts), max_len) or mask.shape != ids.shape:
    raise ValueError(f"tokenize_fn returned ids {ids.shape} / mask {mask.shape}, expected ({len(texts)}, {max_len})")
  return [(ids[i], mask[i]) for i in range(len(texts))]


class TrainExample:
  """(key, bytes, rng) -> (training example, valid): the work of one row of a training batch.

  A record that does not decode (bad bytes, a frame that is not a JPEG, no text) gives a placeholder of the same
  shapes with valid False: zero pixels, every frame marked real and a one-token text, so that the encoders stay
  finite on it; the loss masks the row out. Keeping the row (instead of dropping the record) keeps every other
  row of every batch where it is, whatever the number of hosts or workers. Only record and frame decoding is
  guarded: a failing tokenize_fn is a bug, not a bad record, and is raised.
  """

  def __init__(self, spec: ExampleSpec, tokenize_fn: TokenizeFn):
    self._spec = spec
    self._tokenize_fn = tokenize_fn

  def __call__(self, key: int, data: bytes, rng: np.random.Generator) -> tuple[dict[str, Any], bool]:
    spec = self._spec
    try:
      rec = records.decode_record(data)
      video, mask = _sampled_video(rec, spec, True, rng)
      texts = clip_texts(rec, spec.paragraph)
    except (ValueError, IndexError, TypeError) as e:
      logging.warning("corrupt clip record %d is masked out of the loss: %s", key, e)
      return self.placeholder(key), False
    text = texts[int(rng.integers(len(texts)))]
    to_tokenize = [text] + ([rec.subtitle or "None", rec.caption or "None"] if spec.pretraining else [])
    tokens = _tokenize_one(self._tokenize_fn, to_tokenize, spec.max_text_len)
    example = {
        "video": transforms.normalize_frames(video, mask, transforms.video_dtype(spec.dtype)),
        "frame_mask": mask,
        "text_ids": tokens[0][0],
        "text_mask": tokens[0][1],
        "clip_index": np.int64(key),
    }
    if spec.pretraining:
      example["subtitle_ids"], example["subtitle_mask"] = tokens[1]
      example["caption_ids"], example["caption_mask"] = tokens[2]
      example["image"] = example["video"][spec.num_frames // 2]
    return example, True

  def placeholder(self, key: int) -> dict[str, Any]:
    spec = self._spec
    t, s, l = spec.num_frames, spec.image_size, spec.max_text_len
    text_mask = np.zeros(l, np.int32)
    text_mask[0] = 1
    example = {"video": np.zeros((t, s, s, 3), transforms.video_dtype(spec.dtype)),
               "frame_mask": np.ones(t, np.int32), "text_ids": np.zeros(l, np.int32), "text_mask": text_mask,
               "clip_index": np.int64(key)}
    if spec.pretraining:
      for name in ("subtitle", "caption"):
        example[f"{name}_ids"], example[f"{name}_mask"] = example["text_ids"], text_mask
      example["image"] = example["video"][0]
    return example


class EvalVideo(grain.transforms.Map):
  """(key, bytes) -> evaluation video example with test-time sampling; a corrupt record gives zeros, valid 0."""

  def __init__(self, spec: ExampleSpec):
    self._spec = spec

  def map(self, element: tuple[int, bytes]) -> dict[str, Any]:
    key, data = element
    spec = self._spec
    try:
      video, mask = _sampled_video(records.decode_record(data), spec, False, None)
      valid = 1
    except (ValueError, IndexError, TypeError) as e:
      logging.warning("evaluation clip record %d is corrupt, its video is zeros: %s", key, e)
      video = np.zeros((spec.num_frames, spec.image_size, spec.image_size, 3), np.uint8)
      mask = np.zeros(spec.num_frames, np.int32)
      valid = 0
    return {
        "video": transforms.normalize_frames(video, mask, transforms.video_dtype(spec.dtype)),
        "frame_mask": mask,
        "clip_index": np.int64(key),
        "valid": np.int32(valid),
    }
