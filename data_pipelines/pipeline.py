"""The Grain input pipeline: clip shards -> batches the trainer and the evaluators consume.

Training (`make_train_iterator`):
  source (ArrayRecord shards of a split, or any sequence of record bytes)
  -> IndexSampler: per-host shard (jax process index/count), global shuffle with `seed`, repeat
  -> TrainExample (in `worker_count` processes): frame sampling, JPEG decode of the sampled frames only, resize,
     CLIP normalisation, one random caption tokenised; corrupt records dropped and counted
  -> Batch(per-host batch, drop_remainder=True)
  -> ClipBatchIterator: sums and logs corrupt records; get_state/set_state for exact resumption.
Per-record randomness (frames, caption) comes from Grain's per-record generator, seeded from `seed` and the
record's position in the sampled order. Each worker batches its own share of that order and the batches are read
round-robin, so the batches are a function of (seed, worker_count, process count): the same config gives the same
batches, and resuming needs the same config, worker_count included (Grain validates it).

Evaluation (`make_eval_dataset`): every text of the split tokenised up front (one row per caption with the index
of its video, or one paragraph per video), and `video_batches()`: every video once, in order, test-time sampling,
the last batch padded, `valid` marking real rows; each host reads a contiguous slice and all hosts yield the same
number of batches.

Config keys (dict or ml_collections.ConfigDict; unknown keys are an error):
  shard_dir      folder with `{split}-{i:05d}-of-{n:05d}.array_record` (+ manifest.json); unused when a `source`
                 argument is given
  split          "train" / "test" / ...                                       (default "train")
  num_frames     T                                                             (12)
  image_size     S, frames are S x S                                           (224)
  resize_mode    "squash" (CLIP-ViP: bicubic to S x S) | "crop" (CLIP2Video: short side S, centre crop)  ("squash")
  sampling       "clipvip" | "clip2video" (see sampling.py)                    ("clipvip")
  target_fps     clip2video only: thin stored frames to this rate first (CLIP2Video used 5); None keeps all  (None)
  max_text_len   L, token length incl. start/end tokens                        (32)
  batch_size     global batch; each of the jax processes gets batch_size / process_count   (required)
  seed           shuffle and sampling seed, 0 <= seed < 2**32                  (42)
  worker_count   Grain worker processes, 0 = in the calling process            (0)
  worker_buffer_size  batches each worker prepares ahead                       (2)
  read_threads   threads per process that read and transform clips (Grain ReadOptions)  (16)
  read_buffer    clips those threads prepare ahead (Grain ReadOptions)           (500)
  dtype          video dtype: "float32" | "bfloat16" | "uint8" (raw frames, a quarter of float32's bytes; the
                 train step and the evaluator normalise them on the device)    ("float32")
  paragraph      join all captions of a clip into one text (DiDeMo, ActivityNet)   (False)
  pretraining    add subtitle_ids/mask, caption_ids/mask and image (CLIP-ViP pretraining)   (False)
  shuffle        shuffle training records                                      (True)
  num_epochs     training epochs before StopIteration, None = repeat forever  (None)
  group_size     G > 1 shuffles groups of G consecutive records and keeps each group inside one batch: hard
                 negatives that share a batch (the synthetic set's time-reversed twins; clips cut from the same
                 video). A group with a corrupt record is dropped whole.                               (1)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Iterator, Mapping

import grain
import jax
import numpy as np

from data_pipelines import examples, records, sampling, sources, transforms
from data_pipelines.device_prefetch import DevicePrefetchIterator, prefetch_to_device  # noqa: F401 (re-export)

TokenizeFn = examples.TokenizeFn


@dataclasses.dataclass(frozen=True)
class DataConfig:
  batch_size: int
  shard_dir: str | None = None
  split: str = "train"
  num_frames: int = 12
  image_size: int = 224
  resize_mode: str = "squash"
  sampling: str = "clipvip"
  target_fps: float | None = None
  max_text_len: int = 32
  seed: int = 42
  worker_count: int = 0
  worker_buffer_size: int = 2
  read_threads: int = 16
  read_buffer: int = 500
  dtype: str = "float32"
  paragraph: bool = False
  pretraining: bool = False
  shuffle: bool = True
  num_epochs: int | None = None
  group_size: int = 1

  @classmethod
  def from_config(cls, config: Any) -> "DataConfig":
    """From a dict, a Mapping, an ml_collections ConfigDict or a DataConfig; bad keys/values raise ValueError."""
    if isinstance(config, DataConfig):
      return config
    if hasattr(config, "to_dict"):
      config = config.to_dict()
    if not isinstance(config, Mapping):
      raise TypeError(f"data config must be a mapping or ConfigDict, got {type(config).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - known)
    if unknown:
      raise ValueError(f"unknown data config key(s) {unknown}; known: {sorted(known)}")
    if "batch_size" not in config:
      raise ValueError("data config needs 'batch_size'")
    cfg = cls(**dict(config))
    cfg.validate()
    return cfg

  def validate(self) -> None:
    for name in ("batch_size", "num_frames", "image_size", "max_text_len"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"data.{name} must be a positive int, got {value!r}")
    if not isinstance(self.worker_count, int) or self.worker_count < 0:
      raise ValueError(f"data.worker_count must be an int >= 0, got {self.worker_count!r}")
    for name in ("read_threads", "read_buffer"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < (0 if name == "read_threads" else 1):
        raise ValueError(f"data.{name} must be an int >= {0 if name == 'read_threads' else 1}, got {value!r}")
    if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
      raise ValueError(f"data.seed must be an int in [0, 2**32), got {self.seed!r}")
    if self.resize_mode not in transforms.RESIZE_MODES:
      raise ValueError(f"data.resize_mode must be one of {transforms.RESIZE_MODES}, got {self.resize_mode!r}")
    if self.sampling not in sampling.SAMPLERS:
      raise ValueError(f"data.sampling must be one of {sorted(sampling.SAMPLERS)}, got {self.sampling!r}")
    transforms.video_dtype(self.dtype)
    if not isinstance(self.group_size, int) or self.group_size < 1 or self.batch_size % self.group_size:
      raise ValueError(f"data.group_size must be a positive int dividing batch_size {self.batch_size}, "
                       f"got {self.group_size!r}")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError(f"data.num_epochs must be None or >= 1, got {self.num_epochs!r}")

  def example_spec(self) -> examples.ExampleSpec:
    return examples.ExampleSpec(num_frames=self.num_frames, image_size=self.image_size,
                                resize_mode=self.resize_mode, sampling=self.sampling,
                                max_text_len=self.max_text_len, dtype=self.dtype, paragraph=self.paragraph,
                                pretraining=self.pretraining, target_fps=self.target_fps)


def _open_source(cfg: DataConfig, source: sources.RecordSource | None) -> sources.RecordSource:
  if source is not None:
    sources.check_source(source)
    return source
  if not cfg.shard_dir:
    raise ValueError("data.shard_dir is required when no source is given")
  return sources.open_split(cfg.shard_dir, cfg.split)


def _per_host_batch(batch_size: int, shard_count: int) -> int:
  if batch_size % shard_count:
    raise ValueError(f"data.batch_size {batch_size} is not divisible by the {shard_count} jax processes")
  return batch_size // shard_count


class ClipBatchIterator:
  """A Grain DataLoader iterator that also counts corrupt records (`num_corrupt_skipped`).

  Duck-types DataLoaderIterator for grain.checkpoint.CheckpointHandler: get_state() -> bytes (JSON),
  set_state(bytes), start_prefetch().
  """

  def __init__(self, iterator: grain.DataLoaderIterator):
    self._iterator = iterator
    self.num_corrupt_skipped = 0

  def __iter__(self) -> "ClipBatchIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._iterator)
    skipped = int(np.sum(batch.pop("corrupt_skipped")))
    if skipped:
      self.num_corrupt_skipped += skipped
      logging.warning("input pipeline: %d corrupt clip record(s) skipped (%d so far)", skipped,
                      self.num_corrupt_skipped)
    return batch

  def get_state(self) -> bytes:
    return self._iterator.get_state()

  def set_state(self, state: bytes) -> None:
    self._iterator.set_state(state)

  def start_prefetch(self) -> None:
    self._iterator.start_prefetch()

  def close(self) -> None:
    """Stops the worker processes and frees their shared memory now rather than at garbage collection (at
    interpreter exit that order is undefined and leaks shared-memory segments). grain 0.2.18's DataLoaderIterator
    has no close(); the dataset iterator it wraps does."""
    inner = getattr(self._iterator, "_iterator", None)
    if inner is not None and hasattr(inner, "close"):
      inner.close()

  def __enter__(self) -> "ClipBatchIterator":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def _allow_grain_workers_outside_absl_app() -> None:
  """grain 0.2.18 reads its absl flags directly when it starts worker processes, which raises
  UnparsedFlagAccessError unless the program runs under absl.app (pytest, notebooks, plain scripts). Marking the
  flags parsed keeps their defaults; a later absl.app.run still parses the command line as usual."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_train_loader(config_data: Any, *, source: sources.RecordSource | None = None,
                      tokenize_fn: TokenizeFn | None = None,
                      shard_options: grain.sharding.ShardOptions | None = None) -> grain.DataLoader:
  """The training DataLoader. shard_options defaults to ShardByJaxProcess (drop_remainder: equal host shards)."""
  cfg = DataConfig.from_config(config_data)
  data = sources.KeyedSource(_open_source(cfg, source))
  example = examples.TrainExample(cfg.example_spec(), tokenize_fn or examples.DefaultTokenize())
  if cfg.group_size > 1:
    data = sources.GroupedSource(data, cfg.group_size)
    example = examples.GroupExample(example)
  shard_options = shard_options or grain.sharding.ShardByJaxProcess(drop_remainder=True)
  if len(data) < shard_options.shard_count:
    raise ValueError(f"{len(data)} clips cannot be split over {shard_options.shard_count} hosts")
  sampler = grain.samplers.IndexSampler(num_records=len(data), shard_options=shard_options, shuffle=cfg.shuffle,
                                        num_epochs=cfg.num_epochs, seed=cfg.seed)
  per_host = _per_host_batch(cfg.batch_size, shard_options.shard_count)
  if per_host % cfg.group_size:
    raise ValueError(f"per-host batch {per_host} is not divisible by data.group_size {cfg.group_size}")
  operations = [
      example,
      examples.DropCorrupt(),
      grain.transforms.Batch(per_host // cfg.group_size, drop_remainder=True),
  ]
  if cfg.group_size > 1:
    operations.append(examples.FlattenGroups())
  if cfg.worker_count:
    _allow_grain_workers_outside_absl_app()
  return grain.DataLoader(data_source=data, sampler=sampler, operations=operations, worker_count=cfg.worker_count,
                          worker_buffer_size=cfg.worker_buffer_size, shard_options=shard_options,
                          read_options=grain.ReadOptions(num_threads=cfg.read_threads,
                                                         prefetch_buffer_size=cfg.read_buffer))


def make_train_iterator(config_data: Any, *, source: sources.RecordSource | None = None,
                        tokenize_fn: TokenizeFn | None = None,
                        shard_options: grain.sharding.ShardOptions | None = None) -> ClipBatchIterator:
  """Host batches for training: dict of numpy arrays, per-host batch B = batch_size / process_count:

    video [B,T,S,S,3] (dtype), frame_mask [B,T] int32, text_ids [B,L] int32, text_mask [B,L] int32,
    clip_index [B] int64; pretraining adds subtitle_ids/mask, caption_ids/mask [B,L] and image [B,S,S,3].

  Wrap with `prefetch_to_device(it, sharding)` for jax.Arrays. Save/restore with get_state()/set_state() (JSON
  bytes) or with orbax, beside the model state: manager.save(step, args=ocp.args.Composite(...,
  data=grain.checkpoint.CheckpointSave(it))) and manager.restore(step, args=ocp.args.Composite(...,
  data=grain.checkpoint.CheckpointRestore(it))) (grain registers its CheckpointHandler for these args; it writes
  one process_{i}-of-{n}.json per host). The prefetcher's get_state is the position after the last batch it
  handed out, so either object can be checkpointed. Close with close() or use as a context manager.
  """
  loader = make_train_loader(config_data, source=source, tokenize_fn=tokenize_fn, shard_options=shard_options)
  return ClipBatchIterator(iter(loader))


@dataclasses.dataclass
class EvalData:
  """One evaluation split: every text (tokenised) and a way to stream every video.

  texts: text_ids [N_text, L] int32, text_mask [N_text, L] int32, text_video_index [N_text] int32 (the video each
  text describes; several rows per video for multi-caption sets, one per video with `paragraph`).
  Videos are indexed 0..num_videos-1 in source order; clip_ids[i] names video i ("" when the record is unreadable:
  such a video has no texts and comes out of video_batches with valid 0). A record that reads but whose sampled
  frames do not decode keeps its texts and also comes out with valid 0: evaluators drop the texts of invalid videos.
  """
  config: DataConfig
  source: sources.RecordSource
  clip_ids: list[str]
  text_ids: np.ndarray
  text_mask: np.ndarray
  text_video_index: np.ndarray
  num_corrupt: int
  process_index: int = 0
  process_count: int = 1

  @property
  def num_videos(self) -> int:
    return len(self.clip_ids)

  @property
  def per_host_batch(self) -> int:
    return _per_host_batch(self.config.batch_size, self.process_count)

  def host_video_indices(self) -> range:
    """The contiguous slice of videos this host encodes (ceil(N / hosts) each, the last ones shorter)."""
    per_host = math.ceil(self.num_videos / self.process_count)
    start = min(self.process_index * per_host, self.num_videos)
    return range(start, min(start + per_host, self.num_videos))

  def num_batches(self) -> int:
    """Batches per host: identical on every host, so a multi-host evaluation step never waits on a missing one."""
    return math.ceil(math.ceil(self.num_videos / self.process_count) / self.per_host_batch)

  def video_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """video [B,T,S,S,3], frame_mask [B,T] int32, clip_index [B] int64 (-1 on padding), valid [B] int32."""
    cfg, batch = self.config, self.per_host_batch
    keys = self.host_video_indices()
    produced = 0
    if len(keys):
      # Workers map single videos and the batches are formed here, in order: with the DataLoader each worker would
      # batch its own share, interleaving videos and leaving one short batch per worker.
      videos = grain.MapDataset.source(sources.KeyedSource(self.source, keys)).map(
          examples.EvalVideo(cfg.example_spec())).to_iter_dataset()
      if cfg.worker_count:
        _allow_grain_workers_outside_absl_app()
        videos = videos.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.worker_count, per_worker_buffer_size=cfg.worker_buffer_size * batch))
      iterator = iter(videos.batch(batch, drop_remainder=False))
      try:
        for host_batch in iterator:
          produced += 1
          yield _pad_batch(host_batch, batch)
      finally:
        iterator.close()
    template = _padding_example(cfg)
    for _ in range(self.num_batches() - produced):
      yield _pad_batch({k: v[:0] for k, v in template.items()}, batch)


def _padding_example(cfg: DataConfig) -> dict[str, np.ndarray]:
  t, s = cfg.num_frames, cfg.image_size
  return {"video": np.zeros((1, t, s, s, 3), transforms.video_dtype(cfg.dtype)),
          "frame_mask": np.zeros((1, t), np.int32), "clip_index": np.full((1,), -1, np.int64),
          "valid": np.zeros((1,), np.int32)}


def _pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """Pads every field to `size` rows: zeros, clip_index -1, valid 0."""
  out = {}
  for key, value in batch.items():
    missing = size - value.shape[0]
    if missing <= 0:
      out[key] = value
      continue
    fill = -1 if key == "clip_index" else 0
    pad = np.full((missing,) + value.shape[1:], fill, value.dtype)
    out[key] = np.concatenate([value, pad])
  return out


def make_eval_dataset(config_data: Any, *, source: sources.RecordSource | None = None,
                      tokenize_fn: TokenizeFn | None = None, process_index: int | None = None,
                      process_count: int | None = None) -> EvalData:
  """Reads the split's texts once and returns an EvalData; `shuffle`, `seed` and `num_epochs` do not apply.
  process_index/count default to jax.process_index()/process_count().

  Every record is read whole (ArrayRecord has no partial reads), so the scan reads in parallel threads: for long
  videos (ActivityNet) it is I/O of the size of the split.
  """
  cfg = DataConfig.from_config(config_data)
  data = _open_source(cfg, source)
  tokenize_fn = tokenize_fn or examples.DefaultTokenize()
  clip_ids: list[str] = []
  texts: list[str] = []
  text_video: list[int] = []
  corrupt = 0
  scan = grain.MapDataset.source(sources.KeyedSource(data)).map(
      functools.partial(_record_texts, paragraph=cfg.paragraph))
  for key, clip_id, clip_text_list in scan.to_iter_dataset(grain.ReadOptions(num_threads=16, prefetch_buffer_size=64)):
    if clip_text_list is None:
      corrupt += 1
      clip_ids.append("")
      continue
    clip_ids.append(clip_id)
    texts.extend(clip_text_list)
    text_video.extend([key] * len(clip_text_list))
  if corrupt:
    logging.warning("evaluation split %r: %d of %d clip records are corrupt", cfg.split, corrupt, len(data))
  ids, mask = _tokenize_all(tokenize_fn, texts, cfg.max_text_len)
  return EvalData(config=cfg, source=data, clip_ids=clip_ids, text_ids=ids, text_mask=mask,
                  text_video_index=np.asarray(text_video, np.int32), num_corrupt=corrupt,
                  process_index=jax.process_index() if process_index is None else process_index,
                  process_count=jax.process_count() if process_count is None else process_count)


def _record_texts(element: tuple[int, bytes], paragraph: bool) -> tuple[int, str, list[str] | None]:
  """(key, clip_id, texts) of one record; texts None for an unreadable record (logged, kept as an invalid video)."""
  key, data = element
  try:
    rec = records.decode_record(data)
    return key, rec.clip_id, examples.clip_texts(rec, paragraph)
  except (ValueError, TypeError) as e:
    logging.warning("evaluation clip record %d is corrupt: %s", key, e)
    return key, "", None


def _tokenize_all(tokenize_fn: TokenizeFn, texts: list[str], max_len: int,
                  chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  ids = np.zeros((len(texts), max_len), np.int32)
  mask = np.zeros((len(texts), max_len), np.int32)
  for start in range(0, len(texts), chunk):
    part = texts[start:start + chunk]
    part_ids, part_mask = tokenize_fn(part, max_len)
    ids[start:start + len(part)] = np.asarray(part_ids, np.int32)
    mask[start:start + len(part)] = np.asarray(part_mask, np.int32)
  return ids, mask
