"""Moment retrieval on long synthetic videos with known ground truth: windows (encode --window) against
whole-video encoding, for the demo's CLIP-ViP and meanP checkpoints.

    python -m clipvip_jax.demo --out demo_out                      # trains both checkpoints (once)
    nice python -m benchmarks.moment_retrieval --demo demo_out --out /tmp/moments

The long videos: the clips of the demo's synthetic test split, in a seeded random order, concatenated 20-60 per
video (write_long_videos) and written as H.264 at the synthetic set's nominal 4 fps, so a clip of 8 frames spans
2 s and every caption has a true time span (its clip's). Each caption is one query. Moments: the index of
`encode --window` with the model's default window and stride (clipvip_jax.retrieval.windows), searched as the
search command does (merged moments, at most 3 a video); whole video: `encode --videos` of the same files, a
result spanning its whole video. The figures are R@1 and R@5 at IoU >= 0.5 and >= 0.7 (moments.recall_at_iou),
the convention of moment retrieval (Charades-STA, ActivityNet Captions), and windows per second of the encode.
Throughput: windows/s of encode --window on the long videos against clips/s of the whole-clip encode of the same
clips written one file each (each 2 s clip: about one window's worth of frames), CLIP-ViP, same machine, best of
--repeats runs each (interleaved).
The time-reversed twins of the synthetic set are in the same videos: a model blind to frame order (meanP) cannot
tell a clip from its twin, one of the two moments.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

NOMINAL_FPS = 4.0  # data_pipelines.synthetic: T frames are T / 4 seconds
MIN_CLIPS, MAX_CLIPS = 20, 60


def write_frames_video(path: pathlib.Path, frames: list[np.ndarray], fps: float) -> None:
  """uint8 RGB frames -> an H.264 mp4 at `fps` (one frame a 1/fps seconds: its timestamps are exact)."""
  import av
  from fractions import Fraction
  with av.open(str(path), "w") as container:
    stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
    height, width = frames[0].shape[:2]
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"crf": "12"}
    for pixels in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def write_long_videos(shard_dir: str | pathlib.Path, split: str, out: pathlib.Path, *, clips: tuple[int, int] = (
    MIN_CLIPS, MAX_CLIPS), seed: int = 0, every: int = 1) -> list[dict]:
  """The clips of a synthetic shard split concatenated into long videos under `out` (module doc); every: take one
  clip in `every` (2: no time-reversed twin of a clip taken, the twins being written one after the other). Returns
  one truth a clip: {"caption", "clip", "video", "start", "end"} (seconds in its video)."""
  from data_pipelines import manifest, shard_writer, video_io
  records = [r for p in manifest.shard_paths(str(shard_dir), split) for r in shard_writer.read_records(p)][::every]
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(records))
  out.mkdir(parents=True, exist_ok=True)
  truths, start, number = [], 0, 0
  while start < len(order):
    take = int(rng.integers(clips[0], clips[1] + 1))
    chosen = [records[i] for i in order[start:start + take]]
    video = f"long{number:03d}"
    frames, t = [], 0.0
    for record in chosen:
      clip_frames = [video_io.decode_jpeg(f) for f in record.frames]
      truths.append({"caption": record.captions[0], "clip": record.clip_id, "video": video, "start": t,
                     "end": t + len(clip_frames) / NOMINAL_FPS})
      frames += clip_frames
      t += len(clip_frames) / NOMINAL_FPS
    write_frames_video(out / f"{video}.mp4", frames, NOMINAL_FPS)
    start, number = start + take, number + 1
  return truths


def evaluate(index_dir: pathlib.Path, truths: list[dict], model=None, top_k: int = 5) -> dict[str, float]:
  """R@1/R@5 at IoU 0.5/0.7 of every truth's caption as a query against the index (moments, or whole videos)."""
  from clipvip_jax.retrieval import moments
  from clipvip_jax.retrieval.search import Searcher
  searcher = Searcher(index_dir, model=model, backend="exact", warn=False)
  lengths = {t["video"]: max(u["end"] for u in truths if u["video"] == t["video"]) for t in truths}
  found = []
  for start in range(0, len(truths), 64):
    batch = truths[start:start + 64]
    for results in searcher.moments([t["caption"] for t in batch], top_k=top_k):
      found.append([(m.video, m.start if m.start is not None else 0.0,
                     m.end if m.end is not None else lengths[m.video]) for m in results])
  return moments.recall_at_iou(found, [(t["video"], t["start"], t["end"]) for t in truths])


def _encode(checkpoint: pathlib.Path, videos: pathlib.Path, out: pathlib.Path, window: bool) -> float:
  from clipvip_jax import encode
  argv = ["--checkpoint", str(checkpoint), "--step", "best", "--videos", str(videos), "--out", str(out), "--quiet",
          "--force"]
  begin = time.perf_counter()
  assert encode.main(argv + (["--window"] if window else [])) == 0
  return time.perf_counter() - begin


def _throughput(checkpoint: pathlib.Path, videos: pathlib.Path, out: pathlib.Path, truths: list[dict],
                repeats: int) -> str:
  """windows/s of encode --window on the long videos against clips/s of encode of the clips one file each."""
  from clipvip_jax.retrieval.index import read_index
  from data_pipelines import video_io
  clips = out / "clips"
  if not clips.is_dir():
    import av
    clips.mkdir()
    for truth in truths:  # the clip's frames cut from its long video: the very pixels the windows see
      with av.open(str(videos / f"{truth['video']}.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
      first = round(truth["start"] * NOMINAL_FPS)
      write_frames_video(clips / f"{truth['clip']}.mp4", frames[first:round(truth["end"] * NOMINAL_FPS)],
                         NOMINAL_FPS)
  del video_io
  from clipvip_jax.retrieval import indexer, windows
  from clipvip_jax.retrieval.model import load_model
  from clipvip_jax.retrieval.video_files import find_videos
  model = load_model(checkpoint, step="best")
  window = windows.default_window(model.recipe.num_frames)
  inputs = {"windows": indexer.VideoWindows(find_videos(videos), model.recipe, window, windows.default_stride(window),
                                            workers=2),
            "clips": indexer.VideoFiles(find_videos(clips), model.recipe, workers=2)}
  meta = {"kind": model.kind, "checkpoint": model.checkpoint, "modality": "video"}
  rates: dict[str, list[float]] = {"windows": [], "clips": []}
  for attempt in range(repeats + 1):  # the first round compiles
    for name, encoded in inputs.items():
      index = out / f"throughput-{name}"
      begin = time.perf_counter()
      indexer.build_index(model, encoded, index, meta=meta, force=True, progress=False)
      if attempt:
        rates[name].append(read_index(index).count / (time.perf_counter() - begin))
  w, c = max(rates["windows"]), max(rates["clips"])
  return (f"throughput (CLIP-ViP demo, best of {repeats} after a compiling round, decoding included, 2 decode "
          f"threads): encode --window {w:.1f} windows/s on {len(list(videos.glob('*.mp4')))} long videos, "
          f"whole-clip encode {c:.1f} clips/s on {len(truths)} clip files: windows at {100 * w / c:.0f}% of the clip "
          "rate")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--demo", required=True, help="the demo's --out (data/ and the two checkpoints)")
  p.add_argument("--out", required=True, help="working folder: the long videos and the indexes")
  p.add_argument("--split", default="test")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--repeats", type=int, default=2, help="throughput runs of each encode")
  args = p.parse_args(argv)
  from benchmarks.common import machine_lines
  from clipvip_jax.retrieval.index import read_index
  demo, out = pathlib.Path(args.demo), pathlib.Path(args.out)
  videos = out / "videos"
  truths_path = out / "truths.json"
  if not truths_path.is_file():
    truths = write_long_videos(demo / "data", args.split, videos, seed=args.seed)
    truths_path.write_text(json.dumps(truths))
  truths = json.loads(truths_path.read_text())
  print("\n".join(machine_lines()))
  print(f"{len(truths)} queries in {len({t['video'] for t in truths})} videos of "
        f"{sum(t['end'] - t['start'] for t in truths) / 60:.1f} min")
  print(_throughput(demo / "clipvip", videos, out, truths, args.repeats), flush=True)
  rows = []
  for kind in ("clipvip", "meanp"):
    checkpoint = demo / kind
    for window in (True, False):
      index = out / f"{kind}-{'moments' if window else 'whole'}"
      seconds = _encode(checkpoint, videos, index, window)
      count = read_index(index).count
      scores = evaluate(index, truths)
      rows.append({"model": kind, "index": "moments" if window else "whole video", "rows": count,
                   "rows/s": count / seconds, **scores})
      print(json.dumps(rows[-1]), flush=True)
  keys = [k for k in rows[0] if k.startswith("R@")]
  print("| model | index | rows | rows/s | " + " | ".join(keys) + " |")
  print("|---|---|---|---|" + "---|" * len(keys))
  for r in rows:
    print(f"| {r['model']} | {r['index']} | {r['rows']} | {r['rows/s']:.1f} | "
          + " | ".join(f"{100 * r[k]:.1f}" for k in keys) + " |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
