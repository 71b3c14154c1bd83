"""python -m clipvip_jax.encode --checkpoint PATH (--videos DIR | --shards DIR [--split S] | --texts FILE) --out DIR

Embeddings of a folder of videos, a shard set, or a text file (one text per line), for search and any other use:
DIR/embeddings.npy (float32 [N, D]) and DIR/index.json (kind, checkpoint, modality, row ids, captions of shard
clips, dims, options; see clipvip_jax.embedding_index). The checkpoint is a converted directory, a training
workdir or an original checkpoint file (see clipvip_jax.retrieval_model).

Videos are prepared as the model's original does at test time: decoded with data_pipelines.video_io at --fps
(frames resized on the short side, as build_shards stores them), T frames chosen with the test-time rule,
resized (CLIP-ViP: squash to S x S; CLIP2Video and image CLIPs: short side + centre crop) and CLIP-normalised.
A video that cannot be decoded is counted, reported and skipped; the index lists it under "skipped".
Every batch has the same shape (the last one padded), so the model compiles once.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import os
import pathlib
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from clipvip_jax.cli_errors import ArgumentParser, UsageError, quiet_library_logs, run_cli
from clipvip_jax.retrieval_model import RetrievalModel, VideoRecipe

PROG = "python -m clipvip_jax.encode"
DEFAULT_BATCH_SIZE = 32


@dataclasses.dataclass
class Encoded:
  """Rows that were encoded, and the inputs that could not be."""
  embeddings: np.ndarray  # float32 [N, D]
  ids: list[str]
  skipped: list[dict[str, str]]  # {"id", "reason"}
  captions: list[list[str]] | None = None  # shard sets: the captions of each row's clip


# ------------------------------------------------------------------------------------------------ videos


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


def _ordered_map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int, window: int) -> Iterator[Any]:
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


def encode_videos(model: RetrievalModel, videos: Sequence[tuple[str, pathlib.Path]], *,
                  batch_size: int = DEFAULT_BATCH_SIZE, fps: float = 5.0, workers: int = 4,
                  progress: bool = True) -> Encoded:
  """Embeddings of (id, path) videos (from `find_videos`); undecodable ones are skipped and listed."""
  from tqdm.auto import tqdm

  from clipvip_jax.embed import extract_embeddings
  from data_pipelines.video_io import VideoReadError
  recipe = model.recipe
  ids: list[str] = []
  skipped: list[dict[str, str]] = []

  def prepare(item):
    clip_id, path = item
    try:
      return clip_id, load_video(path, recipe, fps), None
    except (VideoReadError, ValueError, OSError) as e:
      return clip_id, None, str(e) or type(e).__name__

  def batches() -> Iterator[dict[str, np.ndarray]]:
    video, mask = [], []
    with tqdm(total=len(videos), desc="videos", unit="video", disable=not progress) as bar:
      for clip_id, prepared, reason in _ordered_map(prepare, videos, workers, window=2 * batch_size):
        bar.update(1)
        if prepared is None:
          skipped.append({"id": clip_id, "reason": reason})
          bar.set_postfix(skipped=len(skipped))
          continue
        ids.append(clip_id)
        video.append(prepared[0])
        mask.append(prepared[1])
        if len(video) == batch_size:
          yield {"video": np.stack(video), "frame_mask": np.stack(mask)}
          video, mask = [], []
      if video:
        yield {"video": np.stack(video), "frame_mask": np.stack(mask)}

  embeddings = _extract(extract_embeddings, model.encode_video, batches(), batch_size, len(videos), skipped)
  return Encoded(embeddings, ids, skipped)


def _extract(extract_embeddings, encode_fn, batches: Iterable, batch_size: int, total: int,
             skipped: list[dict[str, str]]) -> np.ndarray:
  """extract_embeddings over batches; all inputs skipped -> one sentence naming the first reason."""
  rows = []

  def counted():
    for batch in batches:
      rows.append(len(batch["video"]))
      yield batch

  if total == 0:
    raise UsageError("there is nothing to encode")
  embeddings = None
  try:
    embeddings = extract_embeddings(encode_fn, counted(), batch_size, progress=False)
  except ValueError:
    if rows:
      raise
  if embeddings is None:
    first = skipped[0] if skipped else {"id": "?", "reason": "unknown"}
    raise UsageError(f"none of the {total} inputs could be encoded (first: {first['id']}: {first['reason']})")
  return np.asarray(embeddings, np.float32)


# ------------------------------------------------------------------------------------------------ shards


class _CaptionCollector:
  """A tokenize_fn for make_eval_dataset that keeps the texts instead of tokenising them: the pipeline hands it
  every caption in the order of its text table, which is all an index needs (videos are what gets encoded)."""

  def __init__(self):
    self.texts: list[str] = []

  def __call__(self, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    self.texts.extend(texts)
    ids = np.zeros((len(texts), max_len), np.int32)
    return ids, ids


def encode_shards(model: RetrievalModel, shard_dir: str | os.PathLike, split: str = "test", *,
                  batch_size: int = DEFAULT_BATCH_SIZE, workers: int = 0, progress: bool = True) -> Encoded:
  """Embeddings of every clip of a shard split, read with the evaluation pipeline (test-time sampling), with
  each clip's captions; corrupt records are skipped and listed."""
  from clipvip_jax.embed import extract_embeddings
  from data_pipelines import pipeline
  recipe = model.recipe
  collector = _CaptionCollector()
  data = pipeline.make_eval_dataset(
      {"shard_dir": str(shard_dir), "split": split, "num_frames": recipe.num_frames,
       "image_size": recipe.image_size, "resize_mode": recipe.resize_mode, "sampling": recipe.sampling,
       "target_fps": recipe.target_fps, "max_text_len": recipe.max_text_len, "batch_size": batch_size,
       "worker_count": workers, "dtype": "float32"},
      tokenize_fn=collector, process_index=0, process_count=1)
  captions: list[list[str]] = [[] for _ in range(data.num_videos)]
  for text, video_index in zip(collector.texts, data.text_video_index.tolist()):
    captions[video_index].append(text)
  index_rows, valid_rows = [], []

  def batches() -> Iterator[dict[str, np.ndarray]]:
    for batch in data.video_batches():
      index_rows.append(batch["clip_index"])
      valid_rows.append(batch["valid"])
      yield {"video": batch["video"], "frame_mask": batch["frame_mask"]}

  embeddings = extract_embeddings(model.encode_video, batches(), batch_size,
                                  total=data.num_batches() * batch_size, progress=progress, desc="videos")
  clip_index, valid = np.concatenate(index_rows), np.concatenate(valid_rows)
  keep = (valid == 1) & (clip_index >= 0)
  rows = clip_index[keep].tolist()
  encoded = set(rows)
  skipped = [{"id": data.clip_ids[i] or f"record {i}",
              "reason": "corrupt record" if not data.clip_ids[i] else "its frames do not decode"}
             for i in range(data.num_videos) if i not in encoded]
  if not rows:
    raise UsageError(f"none of the {data.num_videos} clips of split {split!r} in {shard_dir} could be decoded")
  return Encoded(np.asarray(embeddings, np.float32)[keep], [data.clip_ids[i] for i in rows], skipped,
                 [captions[i] for i in rows])


# ------------------------------------------------------------------------------------------------ texts


def read_text_lines(path: str | os.PathLike) -> list[str]:
  """The non-blank lines of a UTF-8 text file, stripped; UsageError when there are none."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise UsageError(f"--texts {path} does not exist" if not path.exists() else f"--texts {path} is not a file")
  try:
    lines = path.read_text(encoding="utf-8").splitlines()
  except UnicodeDecodeError as e:
    raise UsageError(f"--texts {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
  texts = [line.strip() for line in lines if line.strip()]
  if not texts:
    raise UsageError(f"--texts {path} holds no text (one text per line)")
  return texts


def encode_texts(model: RetrievalModel, texts: Sequence[str], *, batch_size: int = DEFAULT_BATCH_SIZE,
                 progress: bool = True) -> Encoded:
  """Text embeddings, one row per text, tokenised at the recipe's text length."""
  from clipvip_jax.embed import extract_embeddings
  ids, mask = model.tokenize(list(texts))
  embeddings = extract_embeddings(model.encode_text, {"ids": ids, "mask": mask}, batch_size, progress=progress,
                                  desc="texts")
  return Encoded(np.asarray(embeddings, np.float32), list(texts), [])


# ------------------------------------------------------------------------------------------------ command line


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
  return value


def _non_negative_float(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
  if not value >= 0:
    raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
  return value


def _parser() -> argparse.ArgumentParser:
  p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="examples:\n"
                                     f"  {PROG} --checkpoint converted/clipvip-b32 --videos videos/ --out idx/\n"
                                     f"  {PROG} --checkpoint runs/demo --shards data/synthetic --split test "
                                     "--out idx/\n"
                                     f"  {PROG} --checkpoint converted/clipvip-b32 --texts queries.txt --out q/")
  p.add_argument("--checkpoint", required=True,
                 help="converted directory, training workdir, or original checkpoint file / HF directory")
  p.add_argument("--config", help="the original's config JSON, for an original checkpoint file only")
  p.add_argument("--step", help="training workdir only: a step number, 'latest' (default) or 'best'")
  p.add_argument("--trust-pickle", action="store_true",
                 help="allow loading an original checkpoint holding Python objects besides tensors (trusted files)")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--videos", metavar="DIR", help="folder of video files and/or frame-image folders")
  source.add_argument("--shards", metavar="DIR",
                      help="shard folder with manifest.json (build_shards, data_pipelines.synthetic)")
  source.add_argument("--texts", metavar="FILE", help="UTF-8 text file, one text per line")
  p.add_argument("--split", default="test", help="split of --shards to encode (default %(default)s)")
  p.add_argument("--out", required=True, metavar="DIR", help="output folder for embeddings.npy + index.json")
  p.add_argument("--force", action="store_true", help="replace an existing index in --out")
  p.add_argument("--num-frames", type=_positive_int, help="frames per video (default: the model's recipe)")
  p.add_argument("--image-size", type=_positive_int,
                 help="frame size; must equal the model's input size (default: that size)")
  p.add_argument("--max-text-len", type=_positive_int,
                 help="token length incl. start/end tokens (default: the model's recipe)")
  p.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE,
                 help="inputs per batch (default %(default)s)")
  p.add_argument("--fps", type=_non_negative_float, default=5.0,
                 help="--videos: rate frames are read at before sampling (default %(default)s, as build_shards; "
                      "0 = every frame, CLIP-ViP's exact rule)")
  p.add_argument("--workers", type=int, default=None,
                 help="decoding workers: threads for --videos (default min(8, CPUs)), Grain processes for "
                      "--shards (default 0 = in this process)")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  return p


def _check_inputs(args: argparse.Namespace) -> Any:
  """Everything that can be checked before the (slow) model load; returns the videos list / texts / None."""
  from clipvip_jax.embedding_index import check_out_dir
  if not pathlib.Path(args.checkpoint).exists():
    raise UsageError(f"checkpoint {args.checkpoint} does not exist")
  if args.config is not None and not pathlib.Path(args.config).is_file():
    raise UsageError(f"config file {args.config} does not exist")
  if args.workers is not None and args.workers < 0:
    raise UsageError(f"--workers must be >= 0, got {args.workers}")
  check_out_dir(args.out, args.force)
  if args.videos is not None:
    root = pathlib.Path(args.videos)
    if not root.is_dir():
      raise UsageError(f"--videos {root} is not a folder" if root.exists() else f"--videos {root} does not exist")
    videos = find_videos(root)
    if not videos:
      raise UsageError(f"--videos {root} holds no video files or frame folders")
    return videos
  if args.shards is not None:
    from data_pipelines import sources
    sources.shard_paths(args.shards, args.split)  # FileNotFoundError / ValueError naming the folder and split
    return None
  return read_text_lines(args.texts)


def _check_model(model: RetrievalModel, args: argparse.Namespace) -> None:
  """Options against what the loaded model takes; then the recipe gets the user's overrides."""
  size = model.input_size
  if args.image_size is not None and args.image_size != size:
    raise UsageError(f"--image-size {args.image_size} does not fit the model ({model.kind}), which takes "
                     f"{size}x{size} frames")
  if args.num_frames is not None and model.max_frames is not None and args.num_frames > model.max_frames:
    raise UsageError(f"--num-frames {args.num_frames} is more than the {model.max_frames} frames this "
                     f"{model.kind} model has positions for")
  positions = model.text_positions
  if args.max_text_len is not None and not 2 <= args.max_text_len <= positions:
    raise UsageError(f"--max-text-len {args.max_text_len} must be in 2..{positions} (the model's text positions)")
  model.recipe = model.recipe.replace(num_frames=args.num_frames, max_text_len=args.max_text_len)


def _index_meta(model: RetrievalModel, args: argparse.Namespace, modality: str, encoded: Encoded,
                source: str) -> dict[str, Any]:
  meta = {"created_by": "clipvip_jax.encode", "kind": model.kind, "checkpoint": model.checkpoint,
          "step": model.step, "config": model.config_path, "trust_pickle": bool(args.trust_pickle),
          "modality": modality, "source": str(pathlib.Path(source).absolute()), "ids": encoded.ids,
          "skipped": encoded.skipped,
          "options": {**model.recipe.to_dict(), "fps": args.fps if args.videos is not None else None,
                      "split": args.split if args.shards is not None else None, "batch_size": args.batch_size}}
  if encoded.captions is not None:
    meta["captions"] = encoded.captions
  return meta


def _run(argv: Sequence[str] | None) -> int:
  from clipvip_jax.embedding_index import write_index
  from clipvip_jax.retrieval_model import load_model
  args = _parser().parse_args(argv)
  quiet_library_logs()
  inputs = _check_inputs(args)
  model = load_model(args.checkpoint, args.config, step=args.step, trust_pickle=args.trust_pickle)
  _check_model(model, args)
  progress = not args.quiet
  if args.videos is not None:
    workers = min(8, os.cpu_count() or 1) if args.workers is None else args.workers
    encoded = encode_videos(model, inputs, batch_size=args.batch_size, fps=args.fps, workers=workers,
                            progress=progress)
    modality, source, what = "video", args.videos, "videos"
  elif args.shards is not None:
    encoded = encode_shards(model, args.shards, args.split, batch_size=args.batch_size,
                            workers=args.workers or 0, progress=progress)
    modality, source, what = "video", args.shards, f"clips of split {args.split!r}"
  else:
    encoded = encode_texts(model, inputs, batch_size=args.batch_size, progress=progress)
    modality, source, what = "text", args.texts, "texts"
  for item in encoded.skipped:
    print(f"{PROG}: skipped {item['id']}: {item['reason']}", file=sys.stderr)
  out = write_index(args.out, encoded.embeddings, _index_meta(model, args, modality, encoded, source),
                    force=args.force)
  skipped = f", {len(encoded.skipped)} skipped (listed in index.json)" if encoded.skipped else ""
  step = f" (step {model.step})" if model.step is not None else ""
  print(f"encoded {len(encoded.ids)} {what}{skipped} with the {model.kind} model {model.checkpoint}{step} -> "
        f"{out}/embeddings.npy {tuple(encoded.embeddings.shape)}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return run_cli(_run, argv, prog=PROG)


if __name__ == "__main__":
  sys.exit(main())
