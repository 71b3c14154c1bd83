"""Building an index: inputs -> parts -> index, on every local device and every process, resumable.

    inputs = VideoFiles(find_videos("videos/"), model.recipe, fps=5.0)   # or ShardClips(...), Texts(...)
    build_index(model, inputs, "idx/", meta=...)                            # -> pathlib.Path of the index

The inputs are cut into parts of `part_size` consecutive inputs (part k holds inputs [k * part_size, ...)), so
what a part holds depends only on the input list. Process i of n (jax.process_index()/process_count(), or
explicit arguments) encodes the parts k with k % n == i, each batch split over its local devices
(extraction.device_encoder); every finished part is renamed into the staging folder `.OUT.partial/` as a whole.
A relaunch with the same arguments finds the plan it wrote (`encode.json`: model, options, input fingerprint,
part size) and skips the parts already there; different arguments are refused unless --force starts over. When
every part is there, process 0 writes index.json (and, through `before_publish`, the thumbnails) and renames the
staging folder to OUT, so OUT is an index exactly when the encode finished, and it is the same index however
often, and wherever, it was interrupted.

An encode holds the workdir-style lock `.OUT.lock` beside OUT (clipvip_jax.train.workdir_lock) from start to
publish: a second encode into the same OUT is refused in one sentence naming the holder, and a lock left by a
killed encode is taken over. Holding it, process 0 removes what dead encodes left (temporary parts, thumbnail and
JSON files in the staging folder; `.OUT.tmp-PID` / `.OUT.old-PID` folders of dead processes) before any process
writes, so nothing of theirs is ever published. search/serve/index on an unfinished OUT say so and print the
command that finishes it (recorded in the plan).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import pathlib
import re
import sys
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np

from clipvip_jax.runtime.cli_errors import UsageError
from clipvip_jax.retrieval import index as index_lib
from clipvip_jax.retrieval.model import RetrievalModel

DEFAULT_BATCH_SIZE = 32
DEFAULT_PART_SIZE = 4096  # inputs per part: at most this much work is redone after a kill
PLAN_FILE = "encode.json"
STAGING_SUFFIX = ".partial"
LOCK_SUFFIX = ".lock"
NON_FINITE_REASON = "the model gave NaN or infinite values for it"
_HOW_TO_FINISH = ("command", "cwd")  # in the plan, for unfinished_encode's sentence; not compared on a relaunch
_TEMPORARY = re.compile(r"\..+\.(?:tmp|old)-([0-9]+)")  # write_part, write_json_atomic, thumbnails, publish


class PartRows:
  """What a part's inputs became: rows that encoded and the inputs that did not."""

  def __init__(self, embeddings: np.ndarray, ids: list[str], captions: list[list[str]] | None,
               skipped: list[dict[str, str]], spans: np.ndarray | None = None):
    self.embeddings, self.ids, self.captions, self.skipped = embeddings, ids, captions, skipped
    self.spans = spans  # [rows, 2] (start, end) seconds of moment rows (VideoWindows), else None


class Inputs(Protocol):
  """An ordered input list that can encode any range of itself."""
  modality: str  # "video" | "text"
  unit: str  # what the progress bar counts ("clip", "text")

  def __len__(self) -> int: ...

  def fingerprint(self) -> str: ...

  def names(self) -> list[str]: ...  # the row id each input would get, in order

  def only(self, keep: Sequence[int]) -> "Inputs": ...  # the inputs at these positions, in this order

  def encode(self, encode_fn: Callable[..., Any], start: int, stop: int, batch_size: int, dims: int,
             bar: Any) -> PartRows: ...


def _fingerprint(names: Sequence[str]) -> str:
  digest = hashlib.sha256()
  for name in names:
    digest.update(name.encode("utf-8") + b"\0")
  return digest.hexdigest()[:32]


def _run(encode_fn, batches: Iterator[dict[str, np.ndarray]], batch_size: int, dims: int) -> np.ndarray:
  """extract_embeddings over `batches`, float32 [rows, dims] ([0, dims] when every input was skipped)."""
  from clipvip_jax.retrieval.extraction import extract_embeddings
  seen = []

  def counted():
    for batch in batches:
      seen.append(1)
      yield batch

  try:
    out = extract_embeddings(encode_fn, counted(), batch_size, progress=False)
  except ValueError:
    if seen:
      raise
    return np.zeros((0, dims), np.float32)
  return np.asarray(out, np.float32)


class VideoFiles:
  """(id, path) clips from video_files.find_videos, decoded in `workers` threads."""
  modality, unit = "video", "clip"

  def __init__(self, videos: Sequence[tuple[str, pathlib.Path]], recipe, fps: float = 5.0, workers: int = 4):
    self.videos, self.recipe, self.fps, self.workers = list(videos), recipe, fps, workers

  def __len__(self) -> int:
    return len(self.videos)

  def fingerprint(self) -> str:
    return _fingerprint([clip_id for clip_id, _ in self.videos])

  def names(self) -> list[str]:
    return [clip_id for clip_id, _ in self.videos]

  def only(self, keep: Sequence[int]) -> "VideoFiles":
    return VideoFiles([self.videos[i] for i in keep], self.recipe, self.fps, self.workers)

  def encode(self, encode_fn, start, stop, batch_size, dims, bar) -> PartRows:
    from clipvip_jax.retrieval.video_files import load_video, ordered_map
    from data_pipelines.video_io import VideoReadError
    ids: list[str] = []
    skipped: list[dict[str, str]] = []

    def prepare(item):
      clip_id, path = item
      try:
        return clip_id, load_video(path, self.recipe, self.fps), None
      except (VideoReadError, ValueError, OSError) as e:
        return clip_id, None, str(e) or type(e).__name__

    def readable():
      for clip_id, prepared, reason in ordered_map(prepare, self.videos[start:stop], self.workers,
                                                   window=2 * batch_size):
        bar.update(1)
        if prepared is None:
          skipped.append({"id": clip_id, "reason": reason})
          bar.set_postfix(skipped=bar.skipped + len(skipped))
          continue
        ids.append(clip_id)
        yield prepared

    embeddings = _run(encode_fn, _video_batches(readable(), batch_size), batch_size, dims)
    return PartRows(embeddings, ids, None, skipped)


class VideoWindows(VideoFiles):
  """Every video file of (id, path) cut into windows (clipvip_jax.retrieval.windows): one row per window, its id the
  video's, its span (start, end) in seconds. Each video is decoded once, in order, `workers` videos at a time; a
  video that fails part way is skipped whole (its windows already encoded are dropped) and listed."""
  modality, unit = "video", "video"

  def __init__(self, videos: Sequence[tuple[str, pathlib.Path]], recipe, window: float, stride: float,
               fps: float = 5.0, workers: int = 4):
    from clipvip_jax.retrieval.windows import check_window
    check_window(window, stride)
    super().__init__(videos, recipe, fps, workers)
    self.window, self.stride = float(window), float(stride)

  def only(self, keep: Sequence[int]) -> "VideoWindows":
    return VideoWindows([self.videos[i] for i in keep], self.recipe, self.window, self.stride, self.fps,
                        self.workers)

  def encode(self, encode_fn, start, stop, batch_size, dims, bar) -> PartRows:
    from clipvip_jax.retrieval.windows import ordered_streams, video_windows
    from data_pipelines.video_io import VideoReadError
    videos = self.videos[start:stop]
    owners: list[int] = []  # the video (number in `videos`) of every window sent to the model, in order
    spans: list[tuple[float, float]] = []
    failed: dict[int, str] = {}

    def windows_of(item):
      return video_windows(item[1], self.recipe, self.fps, self.window, self.stride)

    def readable():
      for number, window, error in ordered_streams(windows_of, videos, self.workers, buffer=2 * batch_size):
        if window is not None:
          owners.append(number)
          spans.append(window[:2])
          yield window[2], window[3]
          continue
        bar.update(1)  # the video is done
        if error is not None:
          if not isinstance(error, (VideoReadError, ValueError, OSError)):
            raise error
          failed[number] = str(error) or type(error).__name__
          bar.set_postfix(skipped=bar.skipped + len(failed))

    embeddings = _run(encode_fn, _video_batches(readable(), batch_size), batch_size, dims)
    keep = [i for i, owner in enumerate(owners) if owner not in failed]
    rows_of = {n for n in (owners[i] for i in keep)}
    skipped = [{"id": videos[n][0], "reason": failed.get(n, "no window of it holds a decodable frame")}
               for n in range(len(videos)) if n not in rows_of]
    return PartRows(embeddings[keep], [videos[owners[i]][0] for i in keep], None, skipped,
                    np.asarray([spans[i] for i in keep], np.float64).reshape(-1, 2))


class _CaptionCollector:
  """A tokenize_fn for make_eval_dataset that keeps the texts instead of tokenising them: the pipeline hands it
  every caption in the order of its text table, which is all an index needs (videos are what gets encoded)."""

  def __init__(self):
    self.texts: list[str] = []

  def __call__(self, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    self.texts.extend(texts)
    ids = np.zeros((len(texts), max_len), np.int32)
    return ids, ids


class ShardClips:
  """Every clip of a shard split, read as the evaluation pipeline reads it (test-time sampling), with each clip's
  captions; a corrupt record or one whose frames do not decode is skipped and listed."""
  modality, unit = "video", "clip"

  def __init__(self, shard_dir: str | os.PathLike, split: str, recipe, workers: int = 0):
    from data_pipelines import pipeline
    collector = _CaptionCollector()
    self.data = pipeline.make_eval_dataset(
        {"shard_dir": str(shard_dir), "split": split, "num_frames": recipe.num_frames,
         "image_size": recipe.image_size, "resize_mode": recipe.resize_mode, "sampling": recipe.sampling,
         "target_fps": recipe.target_fps, "max_text_len": recipe.max_text_len, "batch_size": 1,
         "worker_count": workers, "dtype": "float32"},
        tokenize_fn=collector, process_index=0, process_count=1)
    self.captions: list[list[str]] = [[] for _ in range(self.data.num_videos)]
    for text, video_index in zip(collector.texts, self.data.text_video_index.tolist()):
      self.captions[video_index].append(text)
    self.workers = workers
    self.order = list(range(self.data.num_videos))  # the records encoded, in order (only() narrows it)

  def __len__(self) -> int:
    return len(self.order)

  def fingerprint(self) -> str:
    return _fingerprint([self.data.clip_ids[i] or f"\0record {i}" for i in self.order])

  def names(self) -> list[str]:
    return [self.data.clip_ids[i] or f"record {i}" for i in self.order]

  def only(self, keep: Sequence[int]) -> "ShardClips":
    import copy
    narrowed = copy.copy(self)
    narrowed.order = [self.order[i] for i in keep]
    return narrowed

  def encode(self, encode_fn, start, stop, batch_size, dims, bar) -> PartRows:
    import grain

    from data_pipelines import examples, pipeline, sources
    data = self.data
    rows: list[int] = []
    skipped: list[dict[str, str]] = []
    videos = grain.MapDataset.source(sources.KeyedSource(data.source, self.order[start:stop])).map(
        examples.EvalVideo(data.config.example_spec())).to_iter_dataset()
    if self.workers:
      pipeline.allow_grain_workers_outside_absl_app()
      videos = videos.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.workers,
                                                               per_worker_buffer_size=2 * batch_size))

    def readable():
      for example in videos:
        bar.update(1)
        i = int(example["clip_index"])
        if not example["valid"]:
          skipped.append({"id": data.clip_ids[i] or f"record {i}",
                          "reason": "corrupt record" if not data.clip_ids[i] else "its frames do not decode"})
          bar.set_postfix(skipped=bar.skipped + len(skipped))
          continue
        rows.append(i)
        yield example["video"], example["frame_mask"]

    embeddings = _run(encode_fn, _video_batches(readable(), batch_size), batch_size, dims)
    return PartRows(embeddings, [data.clip_ids[i] for i in rows], [self.captions[i] for i in rows], skipped)


def _video_batches(clips, batch_size: int):
  """(video, frame_mask) pairs -> {"video", "frame_mask"} batches of batch_size in order, the last one shorter."""
  video, mask = [], []
  for clip_video, clip_mask in clips:
    video.append(clip_video)
    mask.append(clip_mask)
    if len(video) == batch_size:
      yield {"video": np.stack(video), "frame_mask": np.stack(mask)}
      video, mask = [], []
  if video:
    yield {"video": np.stack(video), "frame_mask": np.stack(mask)}


class Texts:
  """One row per text, tokenised at the model's recipe text length."""
  modality, unit = "text", "text"

  def __init__(self, texts: Sequence[str], tokenize: Callable[[list[str]], tuple[np.ndarray, np.ndarray]]):
    self.texts, self.tokenize = list(texts), tokenize

  def __len__(self) -> int:
    return len(self.texts)

  def fingerprint(self) -> str:
    return _fingerprint(self.texts)

  def names(self) -> list[str]:
    return list(self.texts)

  def only(self, keep: Sequence[int]) -> "Texts":
    return Texts([self.texts[i] for i in keep], self.tokenize)

  def encode(self, encode_fn, start, stop, batch_size, dims, bar) -> PartRows:
    texts = self.texts[start:stop]

    def batches():
      for s in range(0, len(texts), batch_size):
        ids, mask = self.tokenize(texts[s:s + batch_size])
        yield {"ids": ids, "mask": mask}
        bar.update(min(batch_size, len(texts) - s))

    return PartRows(_run(encode_fn, batches(), batch_size, dims), texts, None, [])


# ------------------------------------------------------------------------------------------------ the build


def staging_dir(out: pathlib.Path) -> pathlib.Path:
  out = pathlib.Path(out)
  out = out if out.name else out.resolve()
  return out.with_name(f".{out.name}{STAGING_SUFFIX}")


def encode_lock(out: str | os.PathLike):
  """The lock an encode into `out` holds: `.OUT.lock` beside it (the staging folder and OUT come and go)."""
  from clipvip_jax.train.workdir_lock import WorkdirLock
  out = pathlib.Path(out)
  out = out if out.name else out.resolve()
  return WorkdirLock(out.absolute().parent, lock_name=f".{out.name}{LOCK_SUFFIX}", label=f"--out {out}",
                     holder="the encode", option="--out")


@contextlib.contextmanager
def holding_encode_lock(out: str | os.PathLike, report: Callable[[str], None]):
  """The encode lock on `out` held for the block (encode, append, delete: one writer of an index at a time); a live
  holder is refused in one sentence naming it."""
  from clipvip_jax.train.workdir_lock import WorkdirLockedError
  lock = encode_lock(out)
  try:
    lock.acquire(report=report)
  except WorkdirLockedError as e:
    raise UsageError(str(e)) from None
  try:
    yield lock
  finally:
    lock.release()


def unfinished_encode(out: str | os.PathLike) -> str | None:
  """One sentence when `out` is the --out of an encode that has not finished (its staging folder is there):
  still running (the lock's live holder) or interrupted, with the command that finishes it; None otherwise."""
  out = pathlib.Path(out)
  if not out.resolve().name:  # the root folder: no encode writes it
    return None
  staging = staging_dir(out)
  if not staging.is_dir():
    return None
  holder = encode_lock(out).live_holder()
  if holder:
    return (f"{out} is not an index yet: the encode of {holder} is still writing it (its finished parts are in "
            f"{staging}); wait for it to finish")
  try:
    plan = json.loads((staging / PLAN_FILE).read_text(encoding="utf-8"))
    command, cwd = plan.get("command"), plan.get("cwd")
  except (OSError, ValueError, AttributeError):
    command = cwd = None
  how = "re-run the same encode command to finish it"
  if isinstance(command, str) and command:
    how = f"finish it with: {command}" + (f" (in {cwd})" if isinstance(cwd, str) and cwd != os.getcwd() else "")
  return f"{out} is not an index yet: an encode into it was interrupted (its finished parts are in {staging}); {how}"


def _dead(pid: int) -> bool:
  if pid == os.getpid():
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:
    return False
  return False


def _remove_leftovers(out: pathlib.Path, staging: pathlib.Path, *, everything: bool) -> list[pathlib.Path]:
  """Temporaries of writers that are gone: inside the staging folder (and its parts/) every `.NAME.tmp-PID`
  when `everything` (this process holds the lock and no process of this run writes yet, or every part is done),
  and beside OUT the `.OUT.tmp-PID` / `.OUT.old-PID` folders of dead processes. Returns what it removed."""
  removed = []
  for folder in (staging, staging / index_lib.PARTS_DIR):
    if everything and folder.is_dir() and not folder.is_symlink():
      for entry in folder.iterdir():
        if _TEMPORARY.fullmatch(entry.name):
          index_lib.remove(entry)
          removed.append(entry)
  parent = out.absolute().parent
  for pattern in (f".{glob.escape(out.name)}.tmp-*", f".{glob.escape(out.name)}.old-*"):
    for entry in parent.glob(pattern):
      match = _TEMPORARY.fullmatch(entry.name)
      if match and _dead(int(match.group(1))):
        index_lib.remove(entry)
        removed.append(entry)
  return removed


def _finite_only(rows: PartRows) -> PartRows:
  """The part's rows without those the model gave NaN or infinite values for: they are listed as skipped (an
  index never holds a row that cannot be ranked)."""
  bad = index_lib.non_finite_rows(rows.embeddings)
  if not len(bad):
    return rows
  keep = np.setdiff1d(np.arange(len(rows.ids)), bad)
  skipped = rows.skipped + [{"id": rows.ids[i], "reason": NON_FINITE_REASON} for i in bad.tolist()]
  return PartRows(np.asarray(rows.embeddings)[keep], [rows.ids[i] for i in keep.tolist()],
                  None if rows.captions is None else [rows.captions[i] for i in keep.tolist()], skipped,
                  None if rows.spans is None else rows.spans[keep])


def _plan(model: RetrievalModel, inputs: Inputs, meta: Mapping[str, Any], part_size: int, dtype: str,
          dims: int) -> dict[str, Any]:
  """Everything that decides the index's content; a relaunch must match it to reuse parts."""
  return {"meta": json.loads(json.dumps(dict(meta))), "inputs": len(inputs), "fingerprint": inputs.fingerprint(),
          "part_size": part_size, "dtype": dtype, "dims": dims, "kind": model.kind,
          "checkpoint": model.checkpoint, "step": model.step, "recipe": model.recipe.to_dict()}


def _prepare_staging(staging: pathlib.Path, plan: dict[str, Any], force: bool, is_first: bool,
                     barrier: Callable[[str], None]) -> None:
  """Creates the staging folder with its plan, or checks the one there; process 0 alone writes. The plan's
  "command" and "cwd" (how to finish the encode) are not compared: --quiet or another spelling resumes it."""
  plan_path = staging / PLAN_FILE
  plan_with_command = plan
  if is_first:
    if plan_path.is_file():
      try:
        previous = json.loads(plan_path.read_text(encoding="utf-8"))
      except (json.JSONDecodeError, UnicodeDecodeError):
        previous = None
      if isinstance(previous, dict):
        previous = {k: v for k, v in previous.items() if k not in _HOW_TO_FINISH}
      plan = {k: v for k, v in plan.items() if k not in _HOW_TO_FINISH}
      if previous != plan:
        if not force:
          raise UsageError(f"{staging} holds an unfinished encode with other arguments ({_differences(previous, plan)} "
                           "differ); re-run it as it was, or pass --force to start over")
        index_lib.remove(staging)
    elif staging.exists():
      index_lib.remove(staging)  # a staging folder without its plan: nothing in it can be trusted
    if not staging.exists():
      staging.mkdir()
    index_lib.write_json_atomic(plan_path, plan_with_command)
  barrier("clipvip_jax.encode: plan")


def _barrier(process_count: int) -> Callable[[str], None]:
  if process_count <= 1:
    return lambda name: None
  import jax
  if jax.process_count() <= 1:  # simulated processes (tests): nothing to wait for
    return lambda name: None
  from jax.experimental import multihost_utils
  return multihost_utils.sync_global_devices


def build_index(model: RetrievalModel, inputs: Inputs, out_dir: str | os.PathLike, *, meta: Mapping[str, Any],
                batch_size: int = DEFAULT_BATCH_SIZE, part_size: int = DEFAULT_PART_SIZE,
                dtype: str = "float32", force: bool = False, progress: bool = True, devices: list | None = None,
                process_index: int | None = None, process_count: int | None = None,
                after_part: Callable[[str], None] | None = None,
                before_publish: Callable[[pathlib.Path], Any] | None = None,
                command: str | None = None, base: index_lib.EmbeddingIndex | None = None) -> pathlib.Path | None:
  """Encodes `inputs` into the index `out_dir` (module doc); returns its path, or None in a process that left the
  finishing step to process 0 (or, with simulated processes, while other processes' parts are still missing).

  meta: what index.json records besides the rows (kind, checkpoint, step, config, modality, source, options).
  devices: the devices one process splits its batches over (default jax.local_devices()); the batch size is
  rounded up to a multiple of their number. after_part(name) runs after each part is written (tests use it to
  simulate a kill). before_publish(staging) runs on the finished index in its staging folder, before the rename
  that publishes it (encode writes the thumbnails there: a kill during them leaves an unfinished encode, which a
  relaunch finishes). command: how to finish this encode, recorded for search/serve to print on an unfinished
  --out. Rows the model gives non-finite values for are skipped and listed, never written.
  base: the index in out_dir that `inputs` are appended to (clipvip_jax.retrieval.growth; encode --append): the new
  parts are numbered after its parts, which the new index shares (hard links), and it is published in one exchange.
  """
  import jax
  if dtype not in index_lib.DTYPES:
    raise UsageError(f"--dtype {dtype!r} is not one of {index_lib.DTYPES}")
  if part_size < 1 or batch_size < 1:
    raise UsageError(f"--part-size and --batch-size must be >= 1, got {part_size} and {batch_size}")
  if len(inputs) == 0:
    raise UsageError("there is nothing to encode")
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  out = index_lib.check_out_dir(out_dir, force, finished_ok=True) if base is None else pathlib.Path(out_dir)
  with holding_encode_lock(out, lambda line: print(f"clipvip_jax.encode: {line}", file=sys.stderr)):
    return _build_locked(model, inputs, out_dir, meta=meta, batch_size=batch_size, part_size=part_size, dtype=dtype,
                         force=force, progress=progress, devices=devices, process_index=process_index,
                         process_count=process_count, after_part=after_part, before_publish=before_publish,
                         command=command, base=base)


def _build_locked(model, inputs, out_dir, *, meta, batch_size, part_size, dtype, force, progress, devices,
                  process_index, process_count, after_part, before_publish, command,
                  base=None) -> pathlib.Path | None:
  """build_index's work, with the lock on --out held (by process 0 for the whole run)."""
  import jax
  from tqdm.auto import tqdm

  from clipvip_jax.retrieval.extraction import device_encoder, round_batch_size
  # Again: another encode may have published it while we waited.
  out = index_lib.check_out_dir(out_dir, force, finished_ok=True) if base is None else pathlib.Path(out_dir)
  dims = model.embedding_dim()
  plan = _plan(model, inputs, meta, part_size, dtype, dims)
  first_part = 0
  if base is not None:
    from clipvip_jax.retrieval import growth
    growth.check_unchanged(base)  # another writer may have changed it while we waited for the lock
    first_part = growth.next_part_number(base)
    plan.update(append_to=growth.identity(base), first_part=first_part)
  elif not force and (out / index_lib.INDEX_FILE).is_file():
    _check_finished(out, plan)  # the same encode, finished already (a job re-run): nothing to do
    return out
  staging = staging_dir(out)
  barrier = _barrier(process_count)
  if process_index == 0:  # before the plan barrier: no process of this run writes yet
    _remove_leftovers(out, staging, everything=True)
  if command:
    plan.update(command=command, cwd=os.getcwd())
  # An append's staging folder made for another state of the index (or other arguments) is only work to redo: the
  # index itself is untouched until the publishing exchange, so it is started over rather than refused.
  _prepare_staging(staging, plan, force or base is not None, process_index == 0, barrier)
  method = "encode_video" if inputs.modality == "video" else "encode_text"
  encode_fn = device_encoder(model.pretrained, method, devices)
  batch_size = round_batch_size(batch_size, len(encode_fn.devices))
  num_parts = math.ceil(len(inputs) / part_size)
  names = [index_lib.part_name(first_part + k) for k in range(num_parts)]
  done = index_lib.finished_parts(staging)
  mine = [k for k in range(num_parts) if k % process_count == process_index and names[k] not in done]
  todo = sum(min(part_size, len(inputs) - k * part_size) for k in mine)
  with tqdm(total=todo, desc=f"encoding (process {process_index + 1}/{process_count})" if process_count > 1
            else "encoding", unit=inputs.unit, disable=not progress, dynamic_ncols=True) as bar:
    bar.skipped = 0
    for k in mine:
      start, stop = k * part_size, min((k + 1) * part_size, len(inputs))
      rows = _finite_only(inputs.encode(encode_fn, start, stop, batch_size, dims, bar))
      bar.skipped += len(rows.skipped)
      index_lib.write_part(staging, names[k], rows.embeddings, rows.ids, rows.captions,
                           {"first_input": start, "inputs": stop - start, "skipped": rows.skipped}, dtype,
                           rows.spans)
      if after_part is not None:
        after_part(names[k])
  barrier("clipvip_jax.encode: parts")
  if process_index != 0 and jax.process_count() > 1:
    barrier("clipvip_jax.encode: published")
    return None
  missing = [n for n in names if n not in index_lib.finished_parts(staging)]
  if missing:
    if process_count > 1:
      print(f"clipvip_jax.encode: process {process_index}: {len(missing)} of {num_parts} parts are still being "
            "encoded by other processes; the last to finish writes the index", file=sys.stderr)
      return None
    raise RuntimeError(f"parts {missing[:3]} are missing after encoding them")  # a bug, not an input error
  all_names, inputs_seen, extra = names, len(inputs), {}
  if base is not None:
    all_names = growth.link_parts(base, staging) + names
    inputs_seen += int(base.meta.get("inputs", base.count))
    extra = growth.carried_meta(base)
  full = index_lib.finish_index(staging, {**meta, **extra, "dims": dims, "dtype": dtype, "inputs": inputs_seen,
                                          "part_size": part_size}, all_names)
  if full["count"] == 0:
    skipped = _first_skipped(staging, names)
    index_lib.remove(staging)  # nothing to publish, and nothing left behind
    raise UsageError(f"none of the {len(inputs)} inputs could be encoded (first: {skipped['id']}: "
                     f"{skipped['reason']})")
  if before_publish is not None:
    before_publish(staging)
  _remove_leftovers(out, staging, everything=True)  # every part is there: any temporary left is garbage
  # The plan stays in the index, without the command (a path and cwd of no use there): a relaunch of the same
  # encode compares with it and exits 0 (_check_finished). A kill before the rename leaves a resumable encode.
  index_lib.write_json_atomic(staging / PLAN_FILE, {k: v for k, v in plan.items() if k not in _HOW_TO_FINISH})
  index_lib.publish(staging, out)
  if process_count > 1 and jax.process_count() > 1:
    barrier("clipvip_jax.encode: published")
  return out


def _check_finished(out: pathlib.Path, plan: Mapping[str, Any]) -> None:
  """Returns when `out` holds the index this very plan writes (the encode finished before); UsageError otherwise,
  naming what differs: an existing index is replaced only with --force."""
  plan = {k: v for k, v in plan.items() if k not in _HOW_TO_FINISH}
  try:
    previous = json.loads((out / PLAN_FILE).read_text(encoding="utf-8"))
  except (OSError, ValueError):
    previous = None
  if previous == plan:
    return
  differ = f" ({_differences(previous, plan)} differ)" if isinstance(previous, dict) else ""
  raise UsageError(f"--out {out} already exists and holds another index{differ} (pass --force to replace it)")


def _differences(previous: Any, plan: Mapping[str, Any], prefix: str = "") -> str:
  """The plan's fields that differ, dotted into meta and options ("meta.options.window, checkpoint")."""
  previous = previous if isinstance(previous, dict) else {}
  names = []
  for k in sorted(set(plan) | set(previous)):
    a, b = previous.get(k), plan.get(k)
    if a == b:
      continue
    names.append(_differences(a, b, f"{prefix}{k}.") if isinstance(a, dict) and isinstance(b, dict)
                 else f"{prefix}{k}")
  return ", ".join(names)


def _first_skipped(staging: pathlib.Path, names: Sequence[str]) -> dict[str, str]:
  for name in names:
    info = json.loads((staging / index_lib.PARTS_DIR / name / index_lib.PART_FILE).read_text(encoding="utf-8"))
    if info.get("skipped"):
      return info["skipped"][0]
  return {"id": "?", "reason": "unknown"}
