"""Videos + a JSON-lines annotation file -> ArrayRecord shards of clip records + manifest.json.

  python -m data_pipelines.build_shards --videos DIR --annotations FILE --out DIR \
      [--fps 5] [--short-side 224] [--workers N] [--shard-size 100] [--split train]

Frame extraction (rate rule, resize, JPEG) is documented in video_io; the annotation format in clip_annotation.

Planning is deterministic: the clips of each split, in annotation-file order, are cut into shards of
`--shard-size` clips (`{split}-{index:05d}-of-{count:05d}.array_record`); splits are taken in sorted order.
A clip whose input is bad is skipped, so a shard may hold fewer records than its clips, but which shard
a clip belongs to never depends on which other clips failed or on the number of workers.

Resuming: one worker task writes one shard. It writes the shard and its status file
(`_progress/{shard}.json`: record count and skipped inputs) under temporary names, renames the status
file, then the shard; so a shard is finished exactly when its final file exists. Re-running the same
command skips finished shards, removes temporary files left by a killed run, and writes the same bytes an
uninterrupted build would have written. The first run stores its settings in `_progress/plan.json`; a
re-run with other settings or other annotations into the same folder is refused. Two builds must not
write into one folder at the same time. manifest.json is written last. Re-running a build that had finished
(a job scheduler relaunching a job that was in fact done) writes nothing, says the folder is complete and
exits 0.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import tqdm

from data_pipelines.clip_annotation import AnnotationLineError, ClipAnnotation, read_annotation_lines
from data_pipelines.manifest import MANIFEST_NAME, make_manifest, write_json_atomic, write_manifest
from data_pipelines.shard_writer import ShardWriter, clip_to_record_or_reason, shard_name, skip_entry
from data_pipelines import worker_pool
from data_pipelines.video_io import FrameOptions

PRODUCER = "data_pipelines.build_shards"
PROGRESS_DIR = "_progress"
DEFAULT_SHARD_SIZE = 100  # ~50-100 MB of 224-px JPEG frames per shard for 10-20 s clips at 5 fps
_TEMPORARY = re.compile(r"\.tmp-\d+$")


class BuildError(Exception):
  """A build that cannot start (bad folder, settings that disagree with a half-finished build)."""


@dataclasses.dataclass(frozen=True)
class ShardTask:
  split: str
  index: int
  count: int
  annotations: tuple[ClipAnnotation, ...]

  @property
  def name(self) -> str:
    return shard_name(self.split, self.index, self.count)


def plan_shards(annotations: Sequence[ClipAnnotation], shard_size: int) -> list[ShardTask]:
  """Splits in sorted order; within a split, consecutive runs of `shard_size` clips in input order."""
  if shard_size < 1:
    raise ValueError(f"shard_size must be >= 1, got {shard_size}")
  by_split: dict[str, list[ClipAnnotation]] = collections.defaultdict(list)
  for ann in annotations:
    by_split[ann.split].append(ann)
  tasks = []
  for split in sorted(by_split):
    clips = by_split[split]
    count = math.ceil(len(clips) / shard_size)
    tasks += [ShardTask(split, i, count, tuple(clips[i * shard_size:(i + 1) * shard_size])) for i in range(count)]
  return tasks


def _fingerprint(annotations: Sequence[ClipAnnotation], options: FrameOptions, shard_size: int) -> dict[str, Any]:
  """Everything that decides the bytes of the shards; a resumed build must agree on all of it."""
  digest = hashlib.sha256(json.dumps([dataclasses.asdict(a) for a in annotations]).encode()).hexdigest()
  return {**options.manifest_fields(), "shard_size": shard_size, "annotations_sha256": digest}


def _status_path(out_dir: str, task_name: str) -> str:
  return os.path.join(out_dir, PROGRESS_DIR, task_name + ".json")


def _is_finished(out_dir: str, task: ShardTask) -> bool:
  return os.path.isfile(os.path.join(out_dir, task.name)) and os.path.isfile(_status_path(out_dir, task.name))


def _write_shard(job: tuple[ShardTask, str, str, FrameOptions]) -> int:
  """Worker: one shard and its status file; returns the number of inputs handled (for the progress bar)."""
  task, videos_dir, out_dir, options = job
  skipped = []
  writer = ShardWriter(os.path.join(out_dir, task.name))
  try:
    for ann in task.annotations:
      record, reason = clip_to_record_or_reason(ann, videos_dir, options)
      if record is None:
        skipped.append(skip_entry(ann, reason))
      else:
        writer.write(record)
    status = {"file": task.name, "split": task.split, "records": writer.num_records, "skipped": skipped}
    write_json_atomic(_status_path(out_dir, task.name), status)
  except BaseException:
    writer.abort()
    raise
  writer.close()  # the rename that marks the shard finished comes after its status file exists
  return len(task.annotations)


def _remove_temporaries(out_dir: str) -> None:
  for folder in (out_dir, os.path.join(out_dir, PROGRESS_DIR)):
    for name in os.listdir(folder):
      if _TEMPORARY.search(name):
        os.remove(os.path.join(folder, name))


def _check_plan(out_dir: str, fingerprint: dict[str, Any]) -> None:
  path = os.path.join(out_dir, PROGRESS_DIR, "plan.json")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      previous = json.load(f)
    differing = sorted(k for k in set(previous) | set(fingerprint) if previous.get(k) != fingerprint.get(k))
    if differing:
      raise BuildError(f"{out_dir} holds a build started with other settings ({', '.join(differing)} differ); "
                       "use an empty --out folder or the original settings")
  else:
    write_json_atomic(path, fingerprint)


def build_shards(annotations: Sequence[ClipAnnotation], videos_dir: str, out_dir: str,
                 options: FrameOptions = FrameOptions(), shard_size: int = DEFAULT_SHARD_SIZE, workers: int = 1,
                 progress: bool = True, source: dict[str, Any] | None = None,
                 on_complete: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Builds (or finishes) the shards of `annotations` in `out_dir`; returns its manifest.

  workers: processes decoding in parallel (1 = in this process); it does not change the output.
  source: extra provenance stored in the manifest's options (e.g. the annotation file's path).
  on_complete: called with one sentence when `out_dir` already held this build, finished; nothing is written then.
  """
  if not os.path.isdir(videos_dir):
    raise BuildError(f"videos directory {videos_dir} does not exist")
  if not annotations:
    raise BuildError("no annotations to build")
  tasks = plan_shards(annotations, shard_size)
  os.makedirs(os.path.join(out_dir, PROGRESS_DIR), exist_ok=True)
  fingerprint = _fingerprint(annotations, options, shard_size)
  _check_plan(out_dir, fingerprint)
  _remove_temporaries(out_dir)

  pending = [t for t in tasks if not _is_finished(out_dir, t)]
  jobs = [(t, videos_dir, out_dir, options) for t in pending]
  total = sum(len(t.annotations) for t in pending)
  with tqdm.tqdm(total=total, unit="clip", desc="build_shards", disable=not progress) as bar:
    if workers <= 1 or len(jobs) <= 1:
      for job in jobs:
        bar.update(_write_shard(job))
    else:
      # Only the parent answers Ctrl-C (worker_pool): one line, then the pool is terminated; temporaries of
      # unfinished shards go at the next run.
      with worker_pool.spawn_pool(min(workers, len(jobs))) as pool:
        for done in pool.imap_unordered(_write_shard, jobs):
          bar.update(done)

  shards, skipped = [], []
  for task in tasks:
    with open(_status_path(out_dir, task.name), encoding="utf-8") as f:
      status = json.load(f)
    shards.append({"file": status["file"], "split": status["split"], "records": status["records"]})
    skipped += status["skipped"]
  options_used = {**fingerprint, **(source or {})}
  manifest = make_manifest(PRODUCER, options_used, shards, skipped)
  if not pending and _written_manifest(out_dir) == manifest:  # finished before: leave every file as it is
    if on_complete is not None:
      on_complete(f"{out_dir} is complete: all {len(tasks)} shards of this build were finished earlier; nothing to do")
    return manifest
  write_manifest(out_dir, manifest)
  return manifest


def _written_manifest(out_dir: str) -> dict[str, Any] | None:
  try:
    with open(os.path.join(out_dir, MANIFEST_NAME), encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None  # none yet, or damaged: written again


def summary_line(manifest: dict[str, Any]) -> str:
  counts = manifest["counts"]
  per_split = ", ".join(f"{name} {s['records']}" for name, s in manifest["splits"].items())
  line = f"wrote {counts['records']} records in {counts['shards']} shards ({per_split}); skipped {counts['skipped']}"
  if counts["skipped"]:
    # Group by the reason's kind (the text before its details): "truncated", "empty file", ...
    reasons = collections.Counter(re.split(r":| \(", item["reason"])[0] for item in manifest["skipped"])
    line += " (" + "; ".join(f"{n} x {r}" for r, n in reasons.most_common(5)) + "; all listed in manifest.json)"
  return line


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m data_pipelines.build_shards", description=__doc__.split("\n\n")[0])
  p.add_argument("--videos", required=True, help="folder the annotations' 'video' paths are relative to")
  p.add_argument("--annotations", required=True,
                 help="JSON-lines annotation file (format: data_pipelines/clip_annotation.py)")
  p.add_argument("--out", required=True, help="output folder for shards and manifest.json (resumable)")
  p.add_argument("--fps", type=float, default=FrameOptions.fps,
                 help="rate of kept frames, default %(default)s; 0 keeps every frame (rule: video_io.py)")
  p.add_argument("--short-side", type=int, default=FrameOptions.short_side,
                 help="stored short side in pixels (bicubic, never upscaled), default %(default)s; 0 = original")
  p.add_argument("--frame-size", type=int, default=0,
                 help="store model-ready S x S frames (the recipe's data.image_size), resized from the full "
                      "decode by --resize-mode, instead of --short-side: training then only decodes JPEG")
  p.add_argument("--resize-mode", default="squash", choices=["squash", "crop"],
                 help="with --frame-size: the recipe's data.resize_mode (squash: CLIP-ViP, crop: CLIP2Video)")
  p.add_argument("--jpeg-quality", type=int, default=FrameOptions.jpeg_quality,
                 help="JPEG quality of stored frames, default %(default)s")
  p.add_argument("--folder-fps", type=float, default=FrameOptions.folder_fps,
                 help="rate frame-image folders were extracted at, default %(default)s = unknown (keep all)")
  p.add_argument("--max-missing-seconds", type=float, default=FrameOptions.max_missing_seconds,
                 help="skip a video as truncated when its frames end this many seconds before its declared "
                 "duration, default %(default)s")
  p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="clips per shard, default %(default)s")
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                 help="decoding processes, default %(default)s (the CPU count)")
  p.add_argument("--split", default="train",
                 help="split of annotation lines that have no 'split' field, default %(default)s")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    options = FrameOptions(fps=args.fps, short_side=args.short_side, jpeg_quality=args.jpeg_quality,
                           folder_fps=args.folder_fps, max_missing_seconds=args.max_missing_seconds,
                           frame_size=args.frame_size, resize_mode=args.resize_mode)
    if not os.path.isdir(args.videos):
      raise BuildError(f"--videos {args.videos} is not a directory")
    annotations = read_annotation_lines(args.annotations, default_split=args.split)
    source = {"videos": os.path.abspath(args.videos), "annotations": os.path.abspath(args.annotations)}
    manifest = build_shards(annotations, args.videos, args.out, options, shard_size=args.shard_size,
                            workers=args.workers, progress=not args.quiet, source=source,
                            on_complete=lambda message: print(f"build_shards: {message}"))
  except (AnnotationLineError, BuildError, ValueError, OSError) as e:
    print(f"build_shards: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"build_shards: interrupted; finished shards are kept in {args.out}: run the same command again to "
          "resume", file=sys.stderr)
    return 130  # the shell's code for Ctrl-C (128 + SIGINT)
  print(summary_line(manifest))
  return 0


if __name__ == "__main__":
  sys.exit(main())
