"""GPU training throughput and MFU: bfloat16 CLIP-ViP (cuDNN attention, block-sparse proxy attention, remat
options, Grain input) against the PyTorch peer (CLIPModel as CLIP4Clip meanP, bf16 autocast, SDPA), same run.

  python -m benchmarks.gpu_train_step [--variant B/16] [--batch 32] [--remat none,dots_no_batch,full]
  python -m benchmarks.gpu_train_step --tiny     # CPU smoke run of every code path at a toy size

Steps, per variant of ours (the repository's step, and with config.model.scan_layers) and per remat policy: build the trainer's step (benchmarks/ours.py) in bfloat16 with
float32 parameters (cuDNN attention; XLA's if cuDNN rejects a shape, said in the row),
time `--steps` back-to-back steps on one device-resident batch (no input cost: the model's own rate), then the
same with batches from the Grain pipeline (synthetic JPEG shards written first; data_pipelines.pipeline
.make_train_iterator + prefetch_to_device, as the trainer feeds it): a gap between the two rates is an input
stall. Then the peer on the same batch. Rates are steps/second over the whole back-to-back window (dispatch
overlaps execution), after `--warmup` steps.

MFU = model FLOPs per step (clipvip_jax/train/model_flops.py: 3 x forward matmuls, no remat recomputation) /
(step time x the MEASURED peak bf16 matmul rate of this device: the best of `--peak-repeats` timings of an
n x n x n bfloat16 matmul with float32 accumulation). The vendor peak is printed beside it.
Goals (issue 8): MFU >= 45% and >= 1.5x the peer's clips/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, experiments, ours as ours_lib
from clipvip_jax.train import model_flops

MFU_GOAL, PEER_GOAL = 0.45, 1.5
TINY_CLIP = dict(vision=dict(width=32, layers=1, heads=2, mlp_dim=64, patch_size=8, image_size=32),
                 text=dict(width=32, layers=1, heads=2, mlp_dim=64, max_len=16), projection_dim=16)


def measured_peak_matmul(n: int, repeats: int) -> float:
  """Best FLOP/s of a bfloat16 [n, n] @ [n, n] (float32 accumulation, bfloat16 result) over `repeats` timings
  of 10 back-to-back products (2 n^3 FLOPs each)."""
  key = jax.random.PRNGKey(0)
  a = jax.random.normal(key, (n, n), jnp.bfloat16)
  b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.bfloat16)

  @jax.jit
  def chain(a, b):
    x = a
    for _ in range(10):  # a dependent chain, so XLA cannot drop or merge products
      x = jnp.dot(x, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    return x

  jax.block_until_ready(chain(a, b))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(chain(a, b))
    best = min(best, time.perf_counter() - t0)
  return 10 * 2.0 * n**3 / best


def grain_iterator(args: argparse.Namespace, shard_dir: str, batch_sharding: Any, frames: int, size: int,
                   text_len: int) -> Iterator[dict[str, jax.Array]]:
  """The trainer's input path on synthetic JPEG shards: Grain workers -> host batch -> prefetch to devices."""
  from benchmarks.input_pipeline import write_shards  # pylint: disable=import-outside-toplevel
  from data_pipelines import pipeline  # pylint: disable=import-outside-toplevel
  if not any(n.endswith(".array_record") for n in os.listdir(shard_dir)):
    write_shards(shard_dir, args.grain_clips, args.grain_stored_frames)
  config = dict(shard_dir=shard_dir, split="train", num_frames=frames, image_size=size, resize_mode="squash",
                dtype=args.grain_dtype, batch_size=args.batch, max_text_len=text_len, seed=0,
                worker_count=args.grain_workers, read_threads=args.grain_read_threads,
                read_buffer=args.grain_read_buffer)
  return pipeline.prefetch_to_device(pipeline.make_train_iterator(config), batch_sharding, size=2)


@jax.jit
def normalize_on_device(video: jax.Array, frame_mask: jax.Array) -> jax.Array:
  """uint8 frames from the pipeline -> CLIP-normalised bfloat16, on the accelerator (1 byte per pixel crosses
  the host: a quarter of float32's traffic through worker shared memory and host-to-device copies)."""
  from data_pipelines import transforms  # pylint: disable=import-outside-toplevel
  return transforms.normalize_video(video, frame_mask, xp=jnp).astype(jnp.bfloat16)


def time_steps(step, batches: Iterator[Any] | Any, *, warmup: int, steps: int, wait=common.block) -> float:
  """Seconds per step over `steps` back-to-back steps; `batches` is an iterator, or one batch reused;
  `wait(out)` returns once the step that produced `out` (and so every earlier one) has finished."""
  get = (lambda: next(batches)) if hasattr(batches, "__next__") else (lambda: batches)
  for _ in range(warmup):
    wait(step(get()))
  t0 = time.perf_counter()
  out = None
  for _ in range(steps):
    out = step(get())
  wait(out)
  return (time.perf_counter() - t0) / steps


def build_with_fallback(section: dict[str, Any], batch: dict[str, np.ndarray],
                        variant_name: str) -> tuple[ours_lib.OursStep, str]:
  """Our step for `section`; if cuDNN rejects an attention shape at compile time, the same step with XLA's
  attention (the row says which one ran). "scan_layers" is the config option; other names are
  benchmarks/experiments.py variants."""
  if variant_name == "scan_layers":
    section, variant_name = dict(section, scan_layers=True), "base"
  try:
    with experiments.variant(variant_name):
      return ours_lib.build(section, batch, devices=jax.devices()[:1]), section["attention"]
  except Exception as e:  # noqa: BLE001 — reported, then retried with the portable implementation
    if section["attention"] == "xla":
      raise
    print(f"  {section['attention']} attention failed to compile ({type(e).__name__}: {str(e)[:200]}); using xla")
    with experiments.variant(variant_name):
      return ours_lib.build(dict(section, attention="xla"), batch, devices=jax.devices()[:1]), "xla"


def device_peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variant", default="B/16")
  p.add_argument("--batch", type=int, default=32, help="clips per step (one device)")
  p.add_argument("--frames", type=int, default=12)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--text-len", type=int, default=50)
  p.add_argument("--num-proxies", type=int, default=4)
  p.add_argument("--remat", default="none,dots_no_batch,full", help="remat policies to compare")
  p.add_argument("--ours-variants", default="base,scan_layers",
                 help="our step as in the repository (base), with config.model.scan_layers (scan_layers), or "
                      "with a benchmarks/experiments.py variant")
  p.add_argument("--attention", default="", help="cudnn (default on GPU) or xla (default elsewhere)")
  p.add_argument("--attention-pattern", default="block_sparse", choices=["block_sparse", "dense"])
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--no-grain", action="store_true", help="skip the Grain-fed timing")
  p.add_argument("--grain-workers", type=int, default=max(common.usable_cores() - 2, 1))
  p.add_argument("--grain-dtype", default="uint8", choices=["uint8", "bfloat16", "float32"],
                 help="what the pipeline hands over; uint8 is normalised on the device")
  p.add_argument("--grain-read-threads", type=int, default=2, help="read threads per worker (data.read_threads)")
  p.add_argument("--grain-read-buffer", type=int, default=64, help="clips read ahead per worker (data.read_buffer)")
  p.add_argument("--grain-warmup-rounds", type=int, default=2,
                 help="untimed batches per worker before timing (start-up is not throughput)")
  p.add_argument("--grain-clips", type=int, default=512)
  p.add_argument("--grain-stored-frames", type=int, default=36)
  p.add_argument("--shard-dir", default="", help="reuse shards here instead of writing a temporary set")
  p.add_argument("--no-peer", action="store_true")
  p.add_argument("--peer-compile", action="store_true", help="torch.compile the peer's loss (off by default)")
  p.add_argument("--peer-remat", action="store_true", help="HF gradient checkpointing for the peer")
  p.add_argument("--peak-n", type=int, default=8192, help="matmul size for the measured peak")
  p.add_argument("--peak-repeats", type=int, default=5)
  p.add_argument("--tiny", action="store_true", help="CPU smoke run: 1-layer width-32 model, 2 frames of 32x32")
  p.add_argument("--json", default="")
  args = p.parse_args(argv)

  on_gpu = jax.devices()[0].platform == "gpu"
  attention = args.attention or ("cudnn" if on_gpu else "xla")
  frames, size, text_len, overrides = args.frames, args.image_size, args.text_len, {}
  if args.tiny:
    frames, size, text_len, overrides = 2, 32, 8, TINY_CLIP
    args.peak_n, args.grain_clips, args.grain_stored_frames = min(args.peak_n, 256), 16, 6
    args.grain_workers = 0
  for line in common.machine_lines(("torch", "transformers", "grain")):
    print(line)
  peak = measured_peak_matmul(args.peak_n, args.peak_repeats)
  from clipvip_jax.train.logging import peak_flops_per_device  # pylint: disable=import-outside-toplevel
  vendor = peak_flops_per_device()
  print(f"measured peak bf16 matmul ({args.peak_n}^3): {peak / 1e12:.1f} TFLOP/s"
        + (f"; vendor dense bf16 peak {vendor / 1e12:.0f} TFLOP/s" if vendor else ""))

  base = ours_lib.model_section(args.variant, frames=frames, num_proxies=args.num_proxies, dtype="bfloat16",
                                attention=attention, attention_pattern=args.attention_pattern,
                                clip_overrides=overrides)
  from clipvip_jax.train import model_init  # pylint: disable=import-outside-toplevel
  cfg = model_init.model_config(base).clip
  batch = ours_lib.synthetic_batch(args.batch, frames, size, text_len, cfg.text.vocab_size,
                                   dtype=jnp.bfloat16)
  flops_ours = args.batch * model_flops.clipvip_step(cfg, frames=frames, text_len=text_len,
                                                     num_proxies=args.num_proxies, batch=args.batch,
                                                     pattern=args.attention_pattern).train
  flops_peer = args.batch * model_flops.meanp_step(cfg, frames=frames, text_len=text_len, batch=args.batch).train
  print(f"{args.variant}{' (tiny overrides)' if args.tiny else ''}: batch {args.batch}, {frames} frames {size}x{size}, text {text_len}, bf16 compute, "
        f"attention {attention} / {args.attention_pattern}; model GFLOP per step: ours {flops_ours / 1e9:.0f}, "
        f"peer {flops_peer / 1e9:.0f}", flush=True)

  rows: list[dict[str, Any]] = []
  shard_ctx = tempfile.TemporaryDirectory() if not args.shard_dir else None
  shard_dir = args.shard_dir or shard_ctx.name
  os.makedirs(shard_dir, exist_ok=True)
  try:
    for variant_name in filter(None, args.ours_variants.split(",")):
      impl = "ours" if variant_name == "base" else f"ours+{variant_name}"
      for remat in filter(None, args.remat.split(",")):
        try:
          ours, used_attention = build_with_fallback(dict(base, remat=remat), batch, variant_name)
          device_batch = ours.put(batch)
          step = lambda b: ours.step(b)  # noqa: E731
          seconds = time_steps(step, device_batch, warmup=args.warmup, steps=args.steps)
        except Exception as e:  # noqa: BLE001 — e.g. out of memory at this batch: report it, go on with the rest
          print(f"  {impl} remat={remat}: failed ({type(e).__name__}: {str(e)[:300]})", flush=True)
          rows.append({"impl": impl, "remat": remat, "attention": attention, "input": "failed", "step_s": float("nan"),
                       "clips_per_s": float("nan"), "mfu": float("nan"), "xla_flops": None, "xla_temp": None,
                       "device_peak": None, "compile_s": None, "error": f"{type(e).__name__}: {str(e)[:300]}"})
          continue
        row = {"impl": impl, "remat": remat, "attention": used_attention, "input": "device-resident",
               "step_s": seconds, "clips_per_s": args.batch / seconds, "mfu": flops_ours / (seconds * peak),
               "xla_flops": ours.cost_flops, "xla_temp": ours.memory.temp_size_in_bytes,
               "device_peak": device_peak_bytes(), "compile_s": ours.compile_seconds}
        rows.append(row)
        print(f"  {impl} remat={remat} ({used_attention}): {1000 * seconds:.1f} ms/step, MFU {100 * row['mfu']:.1f}%",
              flush=True)
        if not args.no_grain:
          it = grain_iterator(args, shard_dir, ours.batch_sharding, frames, size, text_len)
          keys = ours.objective.batch_keys

          def grain_step(b):
            if b["video"].dtype == jnp.uint8:
              b = dict(b, video=normalize_on_device(b["video"], b["frame_mask"]))
            return ours.step({k: b[k] for k in keys})

          # Every worker hands out batches in turn and the first of each includes its start-up (imports, first
          # reads): time only once each worker has delivered some, or the figure is start-up, not throughput.
          warmup = max(args.warmup, args.grain_warmup_rounds * max(args.grain_workers, 1))
          seconds = time_steps(grain_step, it, warmup=warmup, steps=args.steps)
          source = (f"grain ({args.grain_dtype}{', normalised on device' if args.grain_dtype == 'uint8' else ''}, "
                    f"{args.grain_workers} workers x {args.grain_read_threads} threads)")
          rows.append(dict(row, input="grain", input_detail=source, step_s=seconds, clips_per_s=args.batch / seconds,
                           mfu=flops_ours / (seconds * peak)))
          print(f"  {impl} remat={remat} + {source}: {1000 * seconds:.1f} ms/step", flush=True)
          if hasattr(it, "close"):
            it.close()
        del ours, device_batch
  finally:
    if shard_ctx is not None:
      shard_ctx.cleanup()

  if not args.no_peer:
    from benchmarks.torch_peer import MeanPPeer  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = ("peer (torch bf16 autocast, SDPA" + (", torch.compile" if args.peer_compile else "")
            + (", HF gradient checkpointing" if args.peer_remat else "") + ")")
    try:
      peer = MeanPPeer(cfg, device=device, autocast_dtype="bfloat16")
      if args.peer_remat:
        peer.model.gradient_checkpointing_enable()
      if args.peer_compile:
        peer.loss = torch.compile(peer.loss)
      tb = peer.to_torch({k: np.asarray(v, np.float32) if k == "video" else v for k, v in batch.items()})
      if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
      seconds = time_steps(peer.step, tb, warmup=args.warmup, steps=args.steps, wait=float)  # float(): a sync
      rows.append({"impl": name, "remat": "-", "attention": "sdpa", "input": "device-resident", "step_s": seconds,
                   "clips_per_s": args.batch / seconds, "mfu": flops_peer / (seconds * peak), "xla_flops": None,
                   "xla_temp": None, "compile_s": None,
                   "device_peak": torch.cuda.max_memory_allocated() if device == "cuda" else None})
      peer_rate = rows[-1]["clips_per_s"]
      for r in rows[:-1]:
        if r["input"] != "failed":
          r["vs_peer"] = r["clips_per_s"] / peer_rate
    except Exception as e:  # noqa: BLE001 — e.g. out of memory: say so; --peer-remat may fit
      print(f"  peer failed ({type(e).__name__}: {str(e)[:300]}); try --peer-remat", flush=True)

  header = ["impl", "remat", "attention", "input", "step ms", "clips/s", "MFU (model FLOPs)", "vs peer", "XLA temp",
            "device peak (process so far)"]
  print(common.markdown_table(header, [
      [r["impl"], r["remat"], r.get("attention", "-"), r.get("input_detail", r["input"]), f"{1000 * r['step_s']:.1f}", f"{r['clips_per_s']:.2f}",
       f"{100 * r['mfu']:.1f}%", f"{r['vs_peer']:.2f}x" if r.get("vs_peer") else "",
       common.fmt_bytes(r["xla_temp"]), common.fmt_bytes(r["device_peak"])] for r in rows]))
  best = max((r for r in rows if r["impl"].startswith("ours") and r["input"] != "failed"),
             key=lambda r: r["clips_per_s"], default=None)
  if best is not None:
    print(f"best: {best['impl']} remat={best['remat']} ({best['input']}): MFU {100 * best['mfu']:.1f}% (goal "
          f"{100 * MFU_GOAL:.0f}%), {best.get('vs_peer', float('nan')):.2f}x the peer (goal {PEER_GOAL}x)")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({"peak_flops": peak, "vendor_peak": vendor, "rows": rows}, f, indent=2, default=float)
  return rows


if __name__ == "__main__":
  main()
  sys.exit(0)
