"""Encode throughput (clips/s): CLIP-ViP (and our meanP) through encode's own path against the PyTorch peer.

    nice python -m benchmarks.encode_throughput --variants B/32,B/16 --batch 8 --frames 12 --repeats 5

ours: a CLIP-ViP model (random weights, 4 proxies, block-sparse proxy attention, T = --frames) wrapped as encode
wraps it (retrieval.pretrained.Pretrained -> extraction.device_encoder over the local devices), one jitted
encode_video call per batch of --batch clips, float32; `--models meanp`: our meanP, the peer's own model (CLIP per
frame, mean-pooled) in JAX, for the framework comparison at equal work. peer: transformers' CLIPModel of the same
width and depth, every frame through the vision tower as an image (SDPA attention), frame embeddings
L2-normalised and mean-pooled (CLIP4Clip meanP: what a user without CLIP-ViP would run), torch.no_grad, float32.
The two are timed
interleaved (A B A B) after a warm-up so a change in the shared machine's load hits both; the figure is clips per
second at the median call, with the spread ((max - min) / median) beside it. Decoding is not included (the same
for both: encode decodes in worker threads while the devices run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from benchmarks.common import interleaved, machine_lines


def _ours(variant: str, frames: int, model: str):
  """encode's path for CLIP-ViP, or for our meanP (the peer's own model: the same per-frame CLIP, mean-pooled)."""
  from flax import nnx

  from clipvip_jax import kinds
  from clipvip_jax.models import clip, clipvip
  from clipvip_jax.models.meanp import MeanPoolCLIP
  from clipvip_jax.retrieval.extraction import device_encoder
  from clipvip_jax.retrieval.pretrained import Pretrained
  if model == "meanp":
    cfg = clip.clip_config(variant)
    pretrained = Pretrained(MeanPoolCLIP(cfg, rngs=nnx.Rngs(0)), "meanp", cfg)
    return device_encoder(pretrained, "encode_video"), cfg
  cfg = clipvip.CLIPViPConfig(clip=clip.clip_config(variant), num_proxies=4, temporal_size=frames)
  pretrained = Pretrained(kinds.build_model("clipvip", cfg), "clipvip", cfg)
  return device_encoder(pretrained, "encode_video"), cfg.clip


def _peer(clip_cfg):
  import torch
  from transformers import CLIPConfig as HFConfig, CLIPModel

  from clipvip_jax.convert.hf_clip import config_to_hf
  torch.manual_seed(0)
  hf = HFConfig.from_dict(config_to_hf(clip_cfg))
  model = CLIPModel._from_config(hf, attn_implementation="sdpa")  # pylint: disable=protected-access
  model.eval()

  def encode(video: np.ndarray, mask: np.ndarray):
    with torch.no_grad():
      b, t = video.shape[:2]
      nchw = np.ascontiguousarray(np.transpose(video, (0, 1, 4, 2, 3)))
      pixels = torch.from_numpy(nchw.reshape(b * t, 3, *video.shape[2:4]))
      frames = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
      frames = torch.nn.functional.normalize(frames, dim=-1).view(b, t, -1)
      m = torch.from_numpy(mask.astype(np.float32))[..., None]
      return torch.nn.functional.normalize((frames * m).sum(1) / m.sum(1).clamp(min=1.0), dim=-1)

  return encode


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--variants", default="B/32")
  p.add_argument("--models", default="clipvip", help="ours: clipvip and/or meanp (comma-separated)")
  p.add_argument("--batch", type=int, default=8, help="clips per call")
  p.add_argument("--frames", type=int, default=12)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--image-size", type=int, default=224)
  args = p.parse_args(argv)
  for line in machine_lines(("torch", "transformers")):
    print(line)
  rows = []
  for variant, model in ((v, m) for v in args.variants.split(",") for m in args.models.split(",")):
    ours, clip_cfg = _ours(variant, args.frames, model)
    if args.image_size != clip_cfg.vision.image_size:
      raise SystemExit(f"--image-size {args.image_size}: {variant} takes {clip_cfg.vision.image_size}")
    peer = _peer(clip_cfg)
    rng = np.random.default_rng(0)
    s = clip_cfg.vision.image_size
    video = rng.standard_normal((args.batch, args.frames, s, s, 3), dtype=np.float32)
    mask = np.ones((args.batch, args.frames), np.int32)
    out = interleaved({"ours": lambda: ours(video=video, frame_mask=mask), "peer": lambda: peer(video, mask)},
                      warmup=args.warmup, repeats=args.repeats, track_memory=False)
    row = {"variant": variant, "model": model, "frames": args.frames, "batch": args.batch, "load_avg": os.getloadavg(),
           **{f"{name}_clips_per_s": args.batch / m.median for name, m in out.items()},
           **{f"{name}_spread": m.spread for name, m in out.items()}}
    row["speedup"] = row["ours_clips_per_s"] / row["peer_clips_per_s"]
    rows.append(row)
    print(json.dumps(row), flush=True)
  print("\n| model | frames | batch | ours clips/s (spread) | peer clips/s (spread) | ours / peer |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    name = "CLIP-ViP" if r["model"] == "clipvip" else "meanP"
    print(f"| {name} {r['variant']} | {r['frames']} | {r['batch']} | {r['ours_clips_per_s']:.2f} "
          f"({r['ours_spread']:.0%}) | {r['peer_clips_per_s']:.2f} ({r['peer_spread']:.0%}) | {r['speedup']:.2f}x |")
  return rows


if __name__ == "__main__":
  main()
  sys.exit(0)
