"""python -m clipvip_jax.encode --checkpoint PATH (--videos DIR | --shards DIR [--split S] | --texts FILE) --out DIR

Embeddings of a folder of videos, a shard set, or a text file (one text per line), for search and any other use:
an index folder of memory-mapped parts (ids, captions of shard clips, options; see clipvip_jax.retrieval.index).
The checkpoint is a converted directory, a training workdir or an original checkpoint file (see
clipvip_jax.retrieval.model).

Every batch is split over all local devices; launched as several JAX processes (clipvip_jax.launch_local, or the
multi-host launch of training: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) each process encodes
its share of the parts. A killed encode relaunched with the same arguments skips the parts already written and
gives the same index as an uninterrupted run (clipvip_jax.retrieval.indexer). Videos are prepared as the model's
original does at test time (clipvip_jax.retrieval.video_files); an input that cannot be decoded is counted,
reported and skipped, and the index lists it. Every batch has the same shape (the last one padded), so the model
compiles once.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import sys
from typing import Any, Sequence

from clipvip_jax.runtime import cli_errors
from clipvip_jax.runtime.cli_errors import ArgumentParser, UsageError, quiet_library_logs, run_cli
from clipvip_jax.retrieval import indexer
from clipvip_jax.retrieval.model import RetrievalModel

PROG = "python -m clipvip_jax.encode"
DEFAULT_BATCH_SIZE = indexer.DEFAULT_BATCH_SIZE


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


# ------------------------------------------------------------------------------------------------ command line






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
  cli_errors.add_checkpoint_options(p)
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--videos", metavar="DIR", help="folder of video files and/or frame-image folders")
  source.add_argument("--shards", metavar="DIR",
                      help="shard folder with manifest.json (build_shards, data_pipelines.synthetic)")
  source.add_argument("--texts", metavar="FILE", help="UTF-8 text file, one text per line")
  p.add_argument("--split", default="test", help="split of --shards to encode (default %(default)s)")
  p.add_argument("--out", required=True, metavar="DIR", help="output index folder")
  p.add_argument("--force", action="store_true", help="replace an existing index in --out")
  p.add_argument("--append", action="store_true",
                 help="add the inputs the index in --out does not hold yet (new videos, new shard clips, new texts) "
                      "as new parts, without re-encoding the others; same model and options as the index "
                      "(clipvip_jax.retrieval.growth)")
  p.add_argument("--num-frames", type=cli_errors.positive_int, help="frames per video (default: the model's recipe)")
  p.add_argument("--image-size", type=cli_errors.positive_int,
                 help="frame size; must equal the model's input size (default: that size)")
  p.add_argument("--max-text-len", type=cli_errors.positive_int,
                 help="token length incl. start/end tokens (default: the model's recipe)")
  p.add_argument("--batch-size", type=cli_errors.positive_int, default=DEFAULT_BATCH_SIZE,
                 help="inputs per batch (default %(default)s)")
  p.add_argument("--fps", type=cli_errors.non_negative_float, default=5.0,
                 help="--videos: rate frames are read at before sampling (default %(default)s, as build_shards; "
                      "0 = every frame, CLIP-ViP's exact rule)")
  p.add_argument("--window", nargs="?", const="auto", metavar="SECONDS",
                 help="--videos: cut every video into windows of this many seconds, one row each (a moment index: "
                      "search finds the moment, not just the file); alone: the model's default, 0.5 s per frame "
                      "(6 s for 12 frames; clipvip_jax.retrieval.windows says why)")
  p.add_argument("--stride", type=float, metavar="SECONDS",
                 help="with --window: seconds between window starts (default: half the window)")
  p.add_argument("--workers", type=int, default=None,
                 help="decoding workers: threads for --videos (default min(8, CPUs)), Grain processes for "
                      "--shards (default 0 = in this process)")
  p.add_argument("--part-size", type=cli_errors.positive_int, default=indexer.DEFAULT_PART_SIZE,
                 help="inputs per part: the unit of resuming and of sharing work between processes "
                      "(default %(default)s)")
  p.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                 help="stored embedding type: float16 halves the index; exact search over it is slower on CPU "
                      "(default %(default)s)")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  return p


def _check_inputs(args: argparse.Namespace) -> Any:
  """Everything that can be checked before the (slow) model load; returns the videos list / texts / None."""
  from clipvip_jax.retrieval.index import check_out_dir
  from clipvip_jax.retrieval.video_files import find_videos
  if not pathlib.Path(args.checkpoint).exists():
    raise UsageError(f"checkpoint {args.checkpoint} does not exist")
  if args.config is not None and not pathlib.Path(args.config).is_file():
    raise UsageError(f"config file {args.config} does not exist")
  if args.workers is not None and args.workers < 0:
    raise UsageError(f"--workers must be >= 0, got {args.workers}")
  if args.window is None and args.stride is not None:
    raise UsageError("--stride goes with --window (it is the step between windows)")
  if args.window is not None and args.videos is None:
    raise UsageError("--window cuts video files into moments; it goes with --videos")
  if args.window is not None and args.window != "auto":
    try:
      args.window = float(args.window)
    except ValueError:
      raise UsageError(f"--window {args.window!r} is not a number of seconds") from None
  if args.window not in (None, "auto"):
    from clipvip_jax.retrieval.windows import check_window
    try:
      check_window(args.window, args.window / 2 if args.stride is None else args.stride)
    except ValueError as e:
      raise UsageError(str(e)) from None
  if args.append:
    from clipvip_jax.retrieval.index import INDEX_FILE
    if args.force:
      raise UsageError("--append adds to the index in --out and --force replaces it; give one of them")
    if not (pathlib.Path(args.out) / INDEX_FILE).is_file():
      from clipvip_jax.retrieval.indexer import unfinished_encode
      raise UsageError(unfinished_encode(args.out) or f"--append needs an index at --out {args.out}; there is none "
                                                      "(encode without --append makes it)")
  else:
    check_out_dir(args.out, args.force, finished_ok=True)
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


def _windows(model: RetrievalModel, args: argparse.Namespace, videos) -> tuple[float, float]:
  """--window/--stride resolved for the model; refused (one sentence) when the window is longer than every video of
  --videos whose container declares its length (then no video would be cut at all: a mistake, not a choice)."""
  from clipvip_jax.retrieval import windows
  from data_pipelines import video_io
  window = windows.default_window(model.recipe.num_frames) if args.window == "auto" else float(args.window)
  stride = windows.default_stride(window) if args.stride is None else float(args.stride)
  try:
    windows.check_window(window, stride)
  except ValueError as e:
    raise UsageError(str(e)) from None
  known = [(d, clip_id) for clip_id, path in videos if (d := video_io.declared_seconds(str(path))) is not None]
  if known and max(known)[0] < window:
    longest, clip_id = max(known)
    raise UsageError(f"--window {window:g} s is longer than every video in --videos {args.videos} (the longest, "
                     f"{clip_id}, lasts {longest:.1f} s); pass a shorter --window")
  return window, stride


def _index_meta(model: RetrievalModel, args: argparse.Namespace, modality: str, source: str,
                windows: dict[str, float] | None = None) -> dict[str, Any]:
  extra = {"windows": windows} if windows else {}
  return {**extra, "created_by": "clipvip_jax.encode", "kind": model.kind, "checkpoint": model.checkpoint,
          "step": model.step, "config": model.config_path, "trust_pickle": bool(args.trust_pickle),
          "modality": modality, "source": str(pathlib.Path(source).absolute()),
          "options": {**model.recipe.to_dict(), "fps": args.fps if args.videos is not None else None,
                      "split": args.split if args.shards is not None else None, "batch_size": args.batch_size,
                      **({"window": windows["window"], "stride": windows["stride"]} if windows else {})}}


def _appended(inputs, args: argparse.Namespace, meta: dict[str, Any]):
  """(the new inputs, the index they join, its before_publish) of --append; (None, ...) when nothing is new (the
  append is done: exit 0). Refuses another model or other options in one sentence."""
  from clipvip_jax.retrieval import growth
  base = growth.open_base(args.out)
  growth.check_append(base, {**meta, "dtype": args.dtype})
  new = growth.new_inputs(inputs, base)
  if len(new) == 0:
    print(f"{args.out} is complete: it holds every one of the {len(inputs)} inputs already ({base.count} rows; "
          "nothing to append)")
    return None, base, None
  first_new_row = base.count

  def finish(staging: pathlib.Path) -> None:
    if meta["modality"] == "video":
      growth.carry_thumbnails(staging, base, new_ids=set(new.names()))
    growth.refresh_approximate(staging, base, first_new_row,
                               log=lambda line: print(f"{PROG}: approximate index: {line}", file=sys.stderr))

  print(f"{PROG}: appending {len(new)} new of {len(inputs)} inputs to {args.out} ({base.count} rows)",
        file=sys.stderr)
  return new, base, finish


def _start_processes() -> None:
  """Joins the other JAX processes of a multi-process launch (runtime/distributed.py; no-op for one process)."""
  from clipvip_jax.runtime import distributed
  distributed.initialize("encode")


def _run(argv: Sequence[str] | None) -> int:
  from clipvip_jax.retrieval.model import load_model
  args = _parser().parse_args(argv)
  quiet_library_logs()
  found = _check_inputs(args)
  _start_processes()
  model = load_model(args.checkpoint, args.config, step=args.step, trust_pickle=args.trust_pickle)
  _check_model(model, args)
  windows = None
  if args.videos is not None and args.window is not None:
    window, stride = _windows(model, args, found)
    windows = {"window": window, "stride": stride}
    workers = min(4, os.cpu_count() or 1) if args.workers is None else args.workers
    inputs = indexer.VideoWindows(found, model.recipe, window, stride, fps=args.fps, workers=workers)
    source, what = args.videos, f"windows of {window:g} s every {stride:g} s of {len(found)} videos"
  elif args.videos is not None:
    workers = min(8, os.cpu_count() or 1) if args.workers is None else args.workers
    inputs = indexer.VideoFiles(found, model.recipe, fps=args.fps, workers=workers)
    source, what = args.videos, "videos"
  elif args.shards is not None:
    inputs = indexer.ShardClips(args.shards, args.split, model.recipe, workers=args.workers or 0)
    source, what = args.shards, f"clips of split {args.split!r}"
  else:
    from clipvip_jax.retrieval.search import truncation_warnings
    for note in truncation_warnings(model, found, what="text"):
      print(f"{PROG}: note: {args.texts}: {note}", file=sys.stderr)
    inputs = indexer.Texts(found, model.tokenize)
    source, what = args.texts, "texts"
  # The page of python -m clipvip_jax.serve shows thumbnails, not the sources: written into the finished index
  # before it is published, so that a kill while they are written leaves an encode that a relaunch finishes.
  from clipvip_jax.retrieval.thumbnails import write_thumbnails
  from clipvip_jax.retrieval.index import INDEX_FILE
  existed = (pathlib.Path(args.out) / INDEX_FILE).is_file() and not args.force and not args.append
  meta = _index_meta(model, args, inputs.modality, source, windows)
  before_publish, base = write_thumbnails if inputs.modality == "video" else None, None
  if args.append:
    inputs, base, before_publish = _appended(inputs, args, meta)
    if inputs is None:
      return 0
  out = indexer.build_index(model, inputs, args.out, meta=meta,
                            batch_size=args.batch_size, part_size=args.part_size, dtype=args.dtype,
                            force=args.force, progress=not args.quiet, before_publish=before_publish,
                            command=shlex.join([*PROG.split(), *(sys.argv[1:] if argv is None else argv)]),
                            base=base)
  if out is None:
    return 0  # another process writes the index
  from clipvip_jax.retrieval.index import read_index
  index = read_index(out)
  skipped_inputs = index.skipped()
  for item in skipped_inputs:
    print(f"{PROG}: skipped {item['id']}: {item['reason']}", file=sys.stderr)
  skipped = f", {len(skipped_inputs)} skipped (listed in the parts' part.json)" if skipped_inputs else ""
  step = f" (step {model.step})" if model.step is not None else ""
  if existed:
    print(f"{out} is complete: it holds this encode's {index.count} rows already (nothing to do)")
    return 0
  print(f"encoded {index.count} {what}{skipped} with the {model.kind} model {model.checkpoint}{step} -> {out} "
        f"({index.count} x {index.dims} {index.dtype} in {len(index.parts)} part(s))")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return run_cli(_run, argv, prog=PROG)
