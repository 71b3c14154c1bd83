"""CLIP-ViP fine-tuning on DiDeMo, paragraph-to-video (the original's didemo_retrieval_vip_base_{32,16}.json).

  python -m clipvip_jax.train --config configs/clipvip_didemo.py:B/32 --workdir runs/didemo_b32 \
      --config.data.shard_dir=data/didemo/shards --config.init.checkpoint=converted/clipvip-b32
  python -m clipvip_jax.eval --checkpoint runs/didemo_b32 --which best --split test

Recipe: 12 frames, 16 clips per GPU (global 128 on 8 devices), lr 1e-6, wd 0.2, clip 1.0, 20 epochs; all
sentences of a video joined into one paragraph (data.paragraph); text length 50 for B/32 and 70 for B/16.
Model selection on DiDeMo's val split; the paper reports test.
"""

import math

import ml_collections

from clipvip_jax.train.sharding import DEFAULT_RULES


def get_config(variant: str = "B/32") -> ml_collections.ConfigDict:
  if variant not in ("B/32", "B/16"):
    raise ValueError(f"variant must be 'B/32' or 'B/16', got {variant!r}")
  c = ml_collections.ConfigDict()
  c.seed = 42
  c.mode = "nce"
  c.loss = ""
  c.num_epochs = 20
  c.total_steps = 0  # 0: from num_epochs, ceil(epochs * clips / batch) as the original counts
  c.grad_accum = 1

  c.data = dict(shard_dir="data/didemo/shards", split="train", num_frames=12, image_size=224, max_text_len=50 if variant == "B/32" else 70,
                batch_size=128, seed=42, worker_count=8, dtype="bfloat16", sampling="clipvip", resize_mode="squash",
                paragraph=True)

  c.model = dict(kind="clipvip", variant=variant, dtype="bfloat16", remat="auto", attention="xla", clip={},
                 config=dict(num_proxies=4, temporal_size=12))
  # The post-pretrained CLIP-ViP (converted); its weights fix the architecture.
  c.init = dict(checkpoint=f"converted/clipvip-{variant.replace('/', '').lower()}", config="", skip=(),
                logit_scale=None)  # a value replaces logit_scale after loading (CLIP-ViP's overload_logit_scale)

  c.optim = dict(name="adamw", lr=1e-6, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2, grad_clip_norm=1.0,
                 schedule="warmup_cosine", warmup_fraction=0.01, lr_floor=1e-8,
                 no_decay=(r"(^|/)bias$", r"(^|/)logit_scale$"),
                 # The original's lr_mul 10 on lr_mul_prefix "logit_scale" (B/16 only).
                 lr_multipliers=((r"(^|/)logit_scale$", 10.0),) if variant == "B/16" else (), frozen=(),
                 # CLIP-ViP's loop: logit_scale clamped to [0, ln 200] after the forward, before the update.
                 clamp=((r"(^|/)logit_scale$", 0.0, math.log(200.0)),), clamp_when="before_update",
                 per_tensor_clip_norm=0.0, per_tensor_clip_units=(), schedule_steps=0.0)

  c.eval = dict(split="val", every=500, batch_size=128)
  c.checkpoint = dict(every=1000, keep=3, best_metric="val/t2v/R@1", best_mode="max", async_save=True)
  c.log_every = 50
  c.max_nonfinite_steps = 20
  c.max_nonfinite_total = 200
  c.progress_bar = True
  c.peak_flops_per_device = 0.0  # 0: from the device table in train/logging.py
  c.prefetch = 2
  c.compilation_cache_dir = ""

  c.mesh = (-1, 1, 1)
  c.sharding_rules = tuple(DEFAULT_RULES)
  return c
