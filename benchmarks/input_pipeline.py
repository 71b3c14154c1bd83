"""Input-pipeline throughput: clips per CPU-second (per core) of the training example op, and clips/s of the
training iterator for 1, 2 and N Grain workers, before and after the host-side changes of issue 17, in one run.

  python -m benchmarks.input_pipeline [--layouts short256,ready] [--workers 1,2] [--seconds 20] [--dtype uint8]

Two shard layouts of the same clips (`--stored-frames` JPEG frames each, smooth gradients, moving shapes and
sensor-like noise, so they compress like video frames), written to a temporary folder:
  short256   frames stored at short side 256, 16:9 (455x256, ~30 KB): the pipeline decodes and resizes each
             sampled frame to image_size (bicubic, `--resize-mode`)
  ready      the same frames stored model-ready (build_shards --frame-size 224 --resize-mode ...: resized once
             at build time): the pipeline only decodes
Per layout, the CPU cost of the per-clip op (time.thread_time, one process: record read, CLIP-ViP frame
sampling, JPEG decode, resize, normalisation, tokenisation) with each decoder (PIL; simplejpeg, used by default
when installed), as ms per stage and clips per CPU-second; then the iterator end to end (decode in the workers,
batching, the transfer to the main process; worker start-up excluded: the first `--warmup` batches). The goal is
150 clips per CPU-second (per core) for 12 frames at 224, uint8 batches.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import platform
import sys
import tempfile
import time

import numpy as np
from PIL import Image, features

from data_pipelines import pipeline, records

GOAL_PER_CORE = 150.0
LAYOUTS = ("short256", "ready")


def synthetic_frames(count: int, height: int = 256, width: int = 455, seed: int = 0) -> list[bytes]:
  """JPEG frames with video-like content: a slowly moving colour gradient, a few moving discs, mild noise."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  discs = [(rng.uniform(0, width), rng.uniform(0, height), rng.uniform(15, 60), rng.uniform(0, 255, 3),
            rng.uniform(-4, 4, 2)) for _ in range(5)]
  frames = []
  for t in range(count):
    phase = t * 0.05
    img = np.stack([128 + 100 * np.sin(xx / 90 + phase), 128 + 100 * np.cos(yy / 70 - phase),
                    128 + 80 * np.sin((xx + yy) / 120 + 2 * phase)], axis=-1)
    for x, y, r, colour, (vx, vy) in discs:
      inside = (xx - (x + vx * t)) ** 2 + (yy - (y + vy * t)) ** 2 < r * r
      img[inside] = colour
    img += rng.normal(0, 6, img.shape)
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    frames.append(buf.getvalue())
  return frames


def _encode(pixels: np.ndarray, quality: int = 90) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
  return buf.getvalue()


def write_shards(folder: str, num_clips: int, stored_frames: int, short_side: int = 256, num_shards: int = 4,
                 frame_size: int = 0, resize_mode: str = "squash") -> float:
  """Writes train shards of 16:9 frames at `short_side`, or model-ready frame_size x frame_size frames made from
  them by `resize_mode` (what build_shards --frame-size stores, with its manifest); returns the mean JPEG KB."""
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
  from data_pipelines import manifest, transforms  # pylint: disable=import-outside-toplevel

  frames = synthetic_frames(stored_frames + num_clips, short_side, int(short_side * 16 / 9))
  if frame_size:
    frames = [_encode(transforms.resize_frame(transforms.decode_jpeg(f), frame_size, resize_mode)) for f in frames]
  per_shard = -(-num_clips // num_shards)
  shards = []
  for s in range(num_shards):
    name = f"train-{s:05d}-of-{num_shards:05d}.array_record"
    writer = ArrayRecordWriter(os.path.join(folder, name), "group_size:1")
    keys = range(s * per_shard, min((s + 1) * per_shard, num_clips))
    for k in keys:
      rec = records.ClipRecord(clip_id=f"bench{k:05d}", frames=frames[k:k + stored_frames], fps=3.0,
                               captions=[f"a person is doing activity number {k} in a room", "a short video clip"])
      writer.write(records.encode_record(rec))
    writer.close()
    shards.append({"file": name, "split": "train", "records": len(keys)})
  options = {"frame_size": frame_size, "resize_mode": resize_mode} if frame_size else {"short_side": short_side}
  manifest.write_manifest(folder, manifest.make_manifest("benchmarks.input_pipeline", options, shards, []))
  return float(np.mean([len(f) for f in frames])) / 1024


def _cpu_seconds() -> float:
  """CPU time (user + system) of this process and its live child processes (the Grain workers), from /proc."""
  total = sum(os.times()[:2])
  ticks = os.sysconf("SC_CLK_TCK")
  for child in multiprocessing.active_children():
    try:
      with open(f"/proc/{child.pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    except (OSError, IndexError, ValueError):
      pass
  return total


def measure(config: dict, seconds: float, warmup: int) -> tuple[float, float, float]:
  """(clips/s, clips per CPU-second of all pipeline processes, start-up seconds) of the training iterator over
  `seconds` after `warmup` batches. The CPU figure is what a core delivers when the pipeline has it to itself."""
  start = time.perf_counter()
  with pipeline.make_train_iterator(config) as it:
    for _ in range(warmup):
      next(it)
    startup = time.perf_counter() - start
    clips, t0, cpu0 = 0, time.perf_counter(), _cpu_seconds()
    while time.perf_counter() - t0 < seconds:
      clips += next(it)["video"].shape[0]
    rate = clips / (time.perf_counter() - t0)
    per_cpu_second = clips / max(_cpu_seconds() - cpu0, 1e-9)
  return rate, per_cpu_second, startup


@contextlib.contextmanager
def decoder(name: str):
  """JPEG decoding in this process by `name`: 'simplejpeg' (transforms' default when installed) or 'pil'."""
  from data_pipelines import transforms  # pylint: disable=import-outside-toplevel
  saved = transforms.simplejpeg
  if name == "pil":
    transforms.simplejpeg = None
  elif saved is None:
    raise RuntimeError("simplejpeg is not installed (pip install simplejpeg)")
  try:
    yield
  finally:
    transforms.simplejpeg = saved


def cpu_cost(shard_dir: str, config: dict, clips: int = 48) -> dict[str, float]:
  """CPU milliseconds per clip of the worker's work, timed with this thread's CPU clock (time.thread_time), so the
  figure holds on a machine shared with other jobs, where wall-clock rates are not: the whole per-clip op, and
  its JPEG decode, resize and normalise parts (best of 3 passes)."""
  from data_pipelines import examples, sampling, sources, transforms  # pylint: disable=import-outside-toplevel

  cfg = pipeline.DataConfig.from_config(config)
  source = sources.open_split(shard_dir, "train")
  payloads = [source[k % len(source)] for k in range(clips)]
  op = examples.TrainExample(cfg.example_spec(), examples.DefaultTokenize())
  rng = np.random.default_rng(0)
  op(0, payloads[0], rng)  # first call loads the tokenizer
  best: dict[str, float] = {}
  for _ in range(3):
    cost = {"read+op": 0.0, "jpeg decode": 0.0, "resize": 0.0, "normalise": 0.0}
    t0 = time.thread_time()
    for k, data in enumerate(payloads):
      op(k, data, rng)
    cost["read+op"] = time.thread_time() - t0
    for data in payloads:
      rec = records.decode_record(data)
      idx, mask = sampling.frame_indices(cfg.sampling, len(rec.frames), cfg.num_frames, True, rng)
      t0 = time.thread_time()
      images = [transforms.decode_jpeg(rec.frames[i], cfg.image_size) for i in idx]
      t1 = time.thread_time()
      video = np.stack([transforms.resize_frame(img, cfg.image_size, cfg.resize_mode) for img in images])
      t2 = time.thread_time()
      transforms.normalize_frames(video, mask, transforms.video_dtype(cfg.dtype))
      t3 = time.thread_time()
      cost["jpeg decode"] += t1 - t0
      cost["resize"] += t2 - t1
      cost["normalise"] += t3 - t2
    best = {k: min(v, best.get(k, v)) for k, v in cost.items()}
  return {name: 1000 * seconds / clips for name, seconds in best.items()}


def machine_lines() -> list[str]:
  import grain  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import PIL  # pylint: disable=import-outside-toplevel

  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return [f"machine: {platform.node()} | {cpu} | {os.cpu_count()} CPUs ({affinity} usable) | {platform.system()}",
          f"versions: python {platform.python_version()}, grain {grain.__version__}, pillow {PIL.__version__} "
          f"(libjpeg-turbo {features.version('libjpeg_turbo')}), numpy {np.__version__}, jax {jax.__version__}"]


def main(argv: list[str] | None = None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated shard layouts of {LAYOUTS}")
  p.add_argument("--decoders", default="pil,simplejpeg", help="JPEG decoders for the CPU-cost rows")
  p.add_argument("--workers", default=f"1,{usable}",
                 help="comma-separated worker counts (0 = in-process); empty: CPU cost only")
  p.add_argument("--clips", type=int, default=256)
  p.add_argument("--short-side", type=int, default=256, help="stored frame height of the short256 layout (16:9)")
  p.add_argument("--stored-frames", type=int, default=45, help="frames per stored clip (15 s at 3 fps)")
  p.add_argument("--frames", type=int, default=12)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--resize-mode", default="squash", choices=["squash", "crop"])
  p.add_argument("--dtype", default="uint8", choices=["float32", "bfloat16", "uint8"])
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--seconds", type=float, default=15.0)
  p.add_argument("--warmup", type=int, default=3, help="batches before timing (covers worker start-up)")
  p.add_argument("--shard-dir", default=None, help="reuse/keep shards here (one sub-folder per layout)")
  args = p.parse_args(argv)
  layouts = [x for x in args.layouts.split(",") if x]
  if any(x not in LAYOUTS for x in layouts):
    p.error(f"--layouts takes {LAYOUTS}")

  for line in machine_lines():
    print(line)
  print(f"pipeline: {args.frames} frames -> {args.image_size}x{args.image_size} ({args.resize_mode}), "
        f"dtype {args.dtype}, batch {args.batch_size}, CLIP-ViP train sampling, CLIP BPE tokenisation")
  print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
  rows: list[dict] = []
  with tempfile.TemporaryDirectory() as tmp:
    folders = {}
    for layout in layouts:
      folder = folders[layout] = os.path.join(args.shard_dir or tmp, layout)
      os.makedirs(folder, exist_ok=True)
      if not any(n.endswith(".array_record") for n in os.listdir(folder)):
        size = args.image_size if layout == "ready" else 0
        kb = write_shards(folder, args.clips, args.stored_frames, args.short_side, frame_size=size,
                          resize_mode=args.resize_mode)
        shape = f"{size}x{size}" if size else f"{int(args.short_side * 16 / 9)}x{args.short_side}"
        print(f"{layout}: {args.clips} clips x {args.stored_frames} frames of {shape} JPEG ({kb:.0f} KB mean)")
    config = dict(split="train", num_frames=args.frames, image_size=args.image_size, resize_mode=args.resize_mode,
                  dtype=args.dtype, batch_size=args.batch_size, max_text_len=32, seed=0)
    print(f"\nCPU per clip (thread CPU time, one process, best of 3), goal {GOAL_PER_CORE:.0f} clips per CPU-second:")
    print("| layout | decoder | per-clip op ms | JPEG decode ms | resize ms | normalise ms | clips per CPU-second |")
    print("|---|---|---|---|---|---|---|")
    for layout in layouts:
      for name in filter(None, args.decoders.split(",")):
        with decoder(name):
          cost = cpu_cost(folders[layout], dict(config, shard_dir=folders[layout]))
        rate = 1000 / cost["read+op"]
        rows.append({"layout": layout, "decoder": name, **cost, "clips_per_cpu_s": rate})
        print(f"| {layout} | {name} | {cost['read+op']:.1f} | {cost['jpeg decode']:.1f} | {cost['resize']:.1f} | "
              f"{cost['normalise']:.1f} | {rate:.0f} |", flush=True)
    worker_counts = [int(w) for w in args.workers.split(",") if w.strip()]
    if worker_counts:
      print(f"\nIterator end to end (default decoder; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; "
            "wall-clock rates are shared with whatever else runs):")
      print("| layout | workers | clips/s | clips/s per worker | clips per CPU-second (main + workers) | start-up s |")
      print("|---|---|---|---|---|---|")
    for layout in layouts:
      for workers in worker_counts:
        rate, per_cpu, startup = measure(dict(config, shard_dir=folders[layout], worker_count=workers),
                                         args.seconds, args.warmup)
        rows.append({"layout": layout, "workers": workers, "clips_per_s": rate, "clips_per_cpu_s": per_cpu})
        print(f"| {layout} | {workers} | {rate:.1f} | {rate / max(workers, 1):.1f} | {per_cpu:.1f} | {startup:.1f} |",
              flush=True)
  return rows


if __name__ == "__main__":
  main()
  sys.exit(0)
