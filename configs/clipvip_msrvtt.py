"""CLIP-ViP fine-tuning on MSR-VTT 9k (the original's msrvtt_retrieval_vip_base_{32,16}.json).

  python -m clipvip_jax.convert pretrain_clipvip_base_32.pt --out converted/clipvip-b32
  python -m clipvip_jax.train --config configs/clipvip_msrvtt.py:B/32 --workdir runs/msrvtt_b32 \
      --config.data.shard_dir=data/msrvtt/shards --config.init.checkpoint=converted/clipvip-b32
  python -m clipvip_jax.eval --checkpoint runs/msrvtt_b32 --which best --split test

Recipe (spec "Training recipes"): 12 frames, global batch 128, AdamW lr 1e-6 (b2 0.98, eps 1e-6), wd 0.2,
grad-norm clip 1.0, 1% warmup then cosine to 1e-8, "100 epochs" of one sampled caption per video, text length
50, fine-tuning loss L_{V<->T}. Model selection on the `val` shards (videos held out of the 9k training set,
e.g. the official 497 'validate' videos), never on the 1k-A test split the paper reports.
Parallelism is a config edit: --config.mesh='(1,-1,1)' shards parameters and optimiser state (FSDP),
--config.mesh='(-1,1,2)' adds 2-way tensor parallelism.
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
  c.num_epochs = 100
  c.total_steps = 0  # 0: from num_epochs, ceil(epochs * clips / batch) as the original counts
  c.grad_accum = 1

  c.data = dict(shard_dir="data/msrvtt/shards", split="train", num_frames=12, image_size=224, max_text_len=50,
                batch_size=128, seed=42, worker_count=8, dtype="bfloat16", sampling="clipvip", resize_mode="squash")

  c.model = dict(kind="clipvip", variant=variant, dtype="bfloat16", remat="auto", attention="xla", clip={},
                 scan_layers=False,  # True: jax.lax.scan over each tower's blocks (same weights)
                 config=dict(num_proxies=4, temporal_size=12))
  # The post-pretrained CLIP-ViP (converted); its weights fix the architecture.
  c.init = dict(checkpoint=f"converted/clipvip-{variant.replace('/', '').lower()}", config="", skip=(),
                logit_scale=None)  # a value replaces logit_scale after loading (CLIP-ViP's overload_logit_scale)

  c.optim = dict(name="adamw", lr=1e-6, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2, grad_clip_norm=1.0,
                 schedule="warmup_cosine", warmup_fraction=0.01, lr_floor=1e-8,
                 no_decay=(r"(^|/)bias$", r"(^|/)logit_scale$"), lr_multipliers=(), frozen=(),
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
  c.constrain_activations = False  # True with FSDP: keeps activations batch-split (less memory)
  return c
