"""The Grain input pipeline: clip shards -> batches the trainer and the evaluators consume.

Training (`make_train_iterator`): the sequence of GLOBAL batches is a function of the data, `seed` and the
global `batch_size` only, never of the number of processes, devices or Grain workers:
  GlobalOrder: global row q -> record key (epochs of keyed permutations of groups of `group_size` records)
  -> each process reads only its rows of each global batch (the rows its devices hold: `host_rows`)
  -> TrainExample per row: frame sampling, JPEG decode of the sampled frames only, resize, CLIP normalisation,
     one random caption tokenised; randomness keyed by (seed, q), so a clip is augmented alike on any topology
  -> a corrupt record keeps its row as a placeholder with valid 0 (masked out of the loss; counted, logged), so
     it never shifts which clips the other rows hold
  -> host batches built whole inside `worker_count` Grain processes (worker w builds batches w, w + W, ...),
     handed out in order
  -> ClipBatchIterator: state = the next global row (JSON), one value valid on every host: resume on any number
     of processes, devices or workers continues at exactly the next global batch.
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
  batch_size     global batch; each process reads the rows its devices hold       (required)
  seed           shuffle and sampling seed, 0 <= seed < 2**32                  (42)
  worker_count   Grain worker processes, 0 = in the calling process            (0)
  worker_buffer_size  batches each worker prepares ahead                       (2)
  read_threads   threads per process that build batches (Grain ReadOptions; evaluation: per clip)  (16)
  read_buffer    clips those threads prepare ahead, rounded up to whole batches (Grain ReadOptions)  (500)
  dtype          video dtype: "float32" | "bfloat16" | "uint8" (raw frames, a quarter of float32's bytes; the
                 train step and the evaluator normalise them on the device)    ("float32")
  paragraph      join all captions of a clip into one text (DiDeMo, ActivityNet)   (False)
  pretraining    add subtitle_ids/mask, caption_ids/mask and image (CLIP-ViP pretraining)   (False)
  shuffle        shuffle training records                                      (True)
  num_epochs     training epochs before StopIteration, None = repeat forever  (None)
  group_size     G > 1 shuffles groups of G consecutive records and keeps each group inside one batch: hard
                 negatives that share a batch (the synthetic set's time-reversed twins; clips cut from the same
                 video). A corrupt member is masked like any corrupt record; its group keeps its rows.   (1)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from typing import Any, Iterator, Mapping, Sequence

import grain
import jax
import numpy as np

from data_pipelines import examples, manifest, records, sampling, sources, transforms
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
  if os.path.exists(os.path.join(cfg.shard_dir, manifest.MANIFEST_NAME)):
    manifest.check_stored_frames(manifest.read_manifest(cfg.shard_dir).get("options", {}), cfg.image_size,
                                 cfg.resize_mode, cfg.shard_dir)
  return sources.open_split(cfg.shard_dir, cfg.split)


def _per_host_batch(batch_size: int, shard_count: int) -> int:
  if batch_size % shard_count:
    raise ValueError(f"data.batch_size {batch_size} is not divisible by the {shard_count} jax processes")
  return batch_size // shard_count


# ------------------------------------------------------------------------------------------------ training order


STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class GlobalOrder:
  """The training order: global row q (counted from the start of training, over all hosts) -> record key.

  Rows come in groups of G consecutive records (data.group_size; G = 1 is plain shuffling). Epoch e is a
  permutation of the N // G groups, drawn by Grain's index_shuffle (a keyed bijection: O(1) memory and time per
  row, so a 100M-clip corpus costs no permutation table in any worker) with a seed derived from (seed, e); the
  epochs follow each other without a gap, and global batch b is rows [b B, (b + 1) B). Nothing here depends on
  the number of processes, devices or workers.
  """
  num_records: int
  group_size: int
  seed: int
  shuffle: bool
  num_epochs: int | None

  @property
  def num_groups(self) -> int:
    return self.num_records // self.group_size

  @property
  def rows_per_epoch(self) -> int:
    return self.num_groups * self.group_size

  @property
  def total_rows(self) -> int | None:
    return None if self.num_epochs is None else self.num_epochs * self.rows_per_epoch

  def _epoch_seed(self, epoch: int) -> int:
    return int(np.random.SeedSequence([self.seed, epoch, 0x6f72646572]).generate_state(1)[0])

  def record_of(self, row: int) -> int:
    group, member = divmod(int(row), self.group_size)
    epoch, index = divmod(group, self.num_groups)
    if self.shuffle and self.num_groups > 1:
      index = int(grain.experimental.index_shuffle(index, max_index=self.num_groups - 1,
                                                   seed=self._epoch_seed(epoch), rounds=4))
    return index * self.group_size + member

  def row_rng(self, row: int) -> np.random.Generator:
    """The generator of row q's frame jitter and caption choice: keyed by (seed, q), so a clip gets the same
    augmentation at that position on any topology."""
    return np.random.default_rng([self.seed, int(row), 0x726f77])


class _HostBatch:
  """Element k of the host's batch dataset: this host's rows of global batch (first_batch + k), decoded.

  Picklable (Grain workers rebuild it). Each element is a whole host batch, so worker w of W computes batches
  w, w + W, ... and Grain hands them out in order: the batches are the same for any worker count.
  """

  def __init__(self, source: sources.RecordSource, order: GlobalOrder, example: examples.TrainExample,
               rows: tuple[int, ...], batch_size: int, first_row: int):
    self._source, self._order, self._example = source, order, example
    self._rows, self._batch_size, self._first_row = rows, batch_size, first_row

  def __call__(self, k: int) -> dict[str, np.ndarray]:
    base = self._first_row + int(k) * self._batch_size
    parts, valid = [], []
    for r in self._rows:
      row = base + r
      key = self._order.record_of(row)
      try:
        data = self._source[key]
        data = bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else b""
      except Exception as e:  # noqa: BLE001 — a storage error is a corrupt record: masked, counted, reported
        logging.warning("clip record %d could not be read: %s", key, e)
        data = b""
      example, ok = self._example(key, data, self._order.row_rng(row))
      parts.append(example)
      valid.append(ok)
    batch = {name: np.stack([p[name] for p in parts]) for name in parts[0]}
    batch["valid"] = np.asarray(valid, np.int32)
    return batch


def batch_spec(config_data: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{name: (shape, dtype)} of one global training batch of this data config, read off the example a corrupt
  record becomes (the same shapes and dtypes as every real example, with `valid`), without opening any data."""
  cfg = DataConfig.from_config(config_data)
  example = examples.TrainExample(cfg.example_spec(), examples.DefaultTokenize()).placeholder(0)
  example["valid"] = np.int32(1)
  return {k: ((cfg.batch_size,) + np.shape(v), np.asarray(v).dtype) for k, v in example.items()}


def host_rows(sharding: Any, batch_size: int) -> tuple[int, ...]:
  """The rows of a global batch of `batch_size` that this process's devices hold under `sharding` (a
  jax.sharding.Sharding of the batch's leading axis), ascending. One process: every row."""
  index_map = sharding.addressable_devices_indices_map((batch_size,))
  rows: set[int] = set()
  for index in index_map.values():
    rows.update(range(batch_size)[index[0]] if index else range(batch_size))
  return tuple(sorted(rows))


class ClipBatchIterator:
  """This host's rows of each global training batch, in order, from a position that resumes exactly.

  get_state() -> bytes (JSON): {"next_row": first global row of the next batch, and the settings that define the
  order}; valid for every process and for any process, device or worker count, so one copy in the checkpoint
  serves all hosts. set_state() validates it against this config and restarts the workers at that row: a changed
  batch size continues at the same row (global batches of the new size from there), a changed seed, group size,
  shuffle or dataset size is an error naming the setting.

  Corrupt records stay in their rows with batch["valid"] 0; `num_corrupt` counts them on this host. A run of
  `max_consecutive_corrupt` corrupt rows raises: a wholly unreadable split fails loudly instead of training on
  placeholders.
  """

  def __init__(self, cfg: DataConfig, source: sources.RecordSource, example: examples.TrainExample,
               rows: tuple[int, ...], max_consecutive_corrupt: int = 1000):
    self._cfg, self._source, self._example, self._rows = cfg, source, example, tuple(rows)
    self.order = GlobalOrder(num_records=len(source), group_size=cfg.group_size, seed=cfg.seed,
                             shuffle=cfg.shuffle, num_epochs=cfg.num_epochs)
    self._max_consecutive_corrupt = max_consecutive_corrupt
    self.num_corrupt = 0
    self._consecutive_corrupt = 0
    self._next_row = 0
    self._iterator: Any = None

  def _start(self) -> None:
    self.close()
    cfg, batch = self._cfg, self._cfg.batch_size
    total = self.order.total_rows
    num_batches = (2**62 if total is None else max(total - self._next_row, 0) // batch)
    dataset = grain.MapDataset.range(num_batches).map(
        _HostBatch(self._source, self.order, self._example, self._rows, batch, self._next_row))
    per_thread = max(len(self._rows), 1)
    iterable = dataset.to_iter_dataset(grain.ReadOptions(
        num_threads=cfg.read_threads, prefetch_buffer_size=max(1, -(-cfg.read_buffer // per_thread))))
    if cfg.worker_count:
      allow_grain_workers_outside_absl_app()
      iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count,
                                                                   per_worker_buffer_size=cfg.worker_buffer_size))
    self._iterator = iter(iterable)

  def __iter__(self) -> "ClipBatchIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._start()
    batch = next(self._iterator)
    self._next_row += self._cfg.batch_size
    bad = int(len(batch["valid"]) - batch["valid"].sum())
    if bad:
      self.num_corrupt += bad
      logging.warning("input pipeline: %d corrupt clip record(s) in this host's rows of the batch, masked out of "
                      "the loss (%d so far)", bad, self.num_corrupt)
    if bad == len(batch["valid"]):
      self._consecutive_corrupt += bad
      if self._consecutive_corrupt >= self._max_consecutive_corrupt:
        raise RuntimeError(f"{self._consecutive_corrupt} consecutive corrupt clip records (last: "
                           f"{int(batch['clip_index'][-1])}); the shards are unreadable")
    else:
      self._consecutive_corrupt = 0
    return batch

  def get_state(self) -> bytes:
    o = self.order
    return json.dumps({"version": STATE_VERSION, "next_row": self._next_row, "batch_size": self._cfg.batch_size,
                       "seed": o.seed, "num_records": o.num_records, "group_size": o.group_size,
                       "shuffle": o.shuffle}).encode()

  def set_state(self, state: bytes | str) -> None:
    try:
      saved = json.loads(state)
      next_row = int(saved["next_row"])
    except (ValueError, KeyError, TypeError):
      raise ValueError("the checkpoint's data position is not one this version writes (a checkpoint of an older "
                       "version holds Grain's per-process state, which cannot resume on another topology); "
                       "start a new workdir or restore the parameters with config.init.checkpoint") from None
    o = self.order
    for name, value in (("seed", o.seed), ("num_records", o.num_records), ("group_size", o.group_size),
                        ("shuffle", o.shuffle)):
      if name in saved and saved[name] != value:
        what = "the training split's record count" if name == "num_records" else f"data.{name}"
        raise ValueError(f"the checkpoint's data order was made with {what} = {saved[name]!r}, this config has "
                         f"{value!r}: the same order cannot continue; set it back or start a new workdir")
    if next_row % o.group_size:
      raise ValueError(f"the checkpoint's data position (row {next_row}) is not a multiple of data.group_size "
                       f"{o.group_size}")
    self._next_row = next_row
    self.close()

  @property
  def next_row(self) -> int:
    return self._next_row

  def start_prefetch(self) -> None:
    if self._iterator is None:
      self._start()

  def close(self) -> None:
    """Stops the worker processes (and frees their shared memory) now rather than at garbage collection."""
    iterator, self._iterator = self._iterator, None
    if iterator is not None and hasattr(iterator, "close"):
      iterator.close()

  def __enter__(self) -> "ClipBatchIterator":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def allow_grain_workers_outside_absl_app() -> None:
  """grain 0.2.18 reads its absl flags directly when it starts worker processes, which raises
  UnparsedFlagAccessError unless the program runs under absl.app (pytest, notebooks, plain scripts). Marking the
  flags parsed keeps their defaults; a later absl.app.run still parses the command line as usual."""
  from absl import flags  # pylint: disable=import-outside-toplevel

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_train_iterator(config_data: Any, *, source: sources.RecordSource | None = None,
                        tokenize_fn: TokenizeFn | None = None,
                        rows: Sequence[int] | None = None) -> ClipBatchIterator:
  """This host's part of each global training batch: dict of numpy arrays with R = len(rows) rows:

    video [R,T,S,S,3] (dtype), frame_mask [R,T] int32, text_ids [R,L] int32, text_mask [R,L] int32,
    clip_index [R] int64, valid [R] int32 (0: a corrupt record's placeholder, to be masked out of the loss);
    pretraining adds subtitle_ids/mask, caption_ids/mask [R,L] and image [R,S,S,3].

  rows: which rows of each global batch (of data.batch_size) this host reads: `host_rows(batch_sharding,
  batch_size)`, so that it decodes exactly what its devices hold. Default: one process reads every row; with
  several processes, process i reads the i-th contiguous slice (what a mesh over jax.devices() puts there).
  Wrap with `prefetch_to_device(it, sharding, global_batch=...)` for jax.Arrays. Save/restore with
  get_state()/set_state() (JSON bytes). Close with close() or use as a context manager.
  """
  cfg = DataConfig.from_config(config_data)
  data = _open_source(cfg, source)
  if len(data) < cfg.group_size:
    raise ValueError(f"{len(data)} clip records cannot form one group of data.group_size {cfg.group_size}")
  if rows is None:
    count, index = jax.process_count(), jax.process_index()
    per_host = _per_host_batch(cfg.batch_size, count)
    rows = range(index * per_host, (index + 1) * per_host)
  rows = tuple(int(r) for r in rows)
  if not rows or min(rows) < 0 or max(rows) >= cfg.batch_size:
    raise ValueError(f"host rows {rows[:4]}... do not lie in a global batch of {cfg.batch_size}")
  example = examples.TrainExample(cfg.example_spec(), tokenize_fn or examples.DefaultTokenize())
  return ClipBatchIterator(cfg, data, example, rows)


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
        allow_grain_workers_outside_absl_app()
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
