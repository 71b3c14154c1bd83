"""CLIP-ViP post-pretraining on HD-VILA-100M with OFA captions: Omnisource Cross-modal Learning
(the original's pretrain_vip_base_{32,16}.json).

  python -m clipvip_jax.convert openai/clip-vit-base-patch32 --out converted/clip-b32    # an HF CLIP directory
  python -m clipvip_jax.train --config configs/clipvip_pretrain.py:B/32 --workdir runs/pretrain_b32 \
      --config.data.shard_dir=data/hdvila/shards --config.eval.data.shard_dir=data/msrvtt/shards

Recipe: 12 frames + the middle frame as an image, subtitle (ASR) and auxiliary caption texts of length 70,
global batch 1024 (32 GPUs), AdamW lr 5e-6, wd 0.05, clip 5.0, 1% warmup + cosine, 5 epochs, the shipped loss
L_{V<->S,C} + L_{F<->C} ("NCELearnableTempLoss_vsc_fc"; the ablations of Fig. 2 by name, see
clipvip_jax.losses.OMNISOURCE_LOSSES). Starts from OpenAI CLIP: the video proxies are drawn N(0, 1), the temporal
embedding is zero, logit_scale restarts at 4.6 (CLIP's is not taken). Every loss term sees the whole global
batch as negatives. Validation: MSR-VTT `val` shards (zero-shot), never the test split.
On a TPU pod slice or several GPU nodes see docs/training.md; --config.grad_accum=K keeps the global batch on
fewer devices without shrinking the negatives.
"""

import math

import ml_collections

from clipvip_jax.train.sharding import DEFAULT_RULES


def get_config(variant: str = "B/32") -> ml_collections.ConfigDict:
  if variant not in ("B/32", "B/16"):
    raise ValueError(f"variant must be 'B/32' or 'B/16', got {variant!r}")
  c = ml_collections.ConfigDict()
  c.seed = 42
  c.mode = "omnisource"
  c.loss = "NCELearnableTempLoss_vsc_fc"
  c.num_epochs = 5
  c.total_steps = 0  # 0: from num_epochs, ceil(epochs * clips / batch) as the original counts
  c.grad_accum = 1

  c.data = dict(shard_dir="data/hdvila/shards", split="train", num_frames=12, image_size=224, max_text_len=70,
                batch_size=1024, seed=42, worker_count=8, dtype="bfloat16", sampling="clipvip", resize_mode="squash",
                pretraining=True)

  c.model = dict(kind="clipvip", variant=variant, dtype="bfloat16", remat="auto", attention="xla", clip={},
                 scan_layers=False,  # True: jax.lax.scan over each tower's blocks (same weights)
                 config=dict(num_proxies=4, temporal_size=12))
  # OpenAI CLIP (converted); the CLIP part of the architecture comes from its weights.
  c.init = dict(checkpoint=f"converted/clip-{variant.replace('/', '').lower()}", config="", skip=(r"^logit_scale$",),
                logit_scale=None)  # a value replaces logit_scale after loading (CLIP-ViP's overload_logit_scale)

  c.optim = dict(name="adamw", lr=5e-6, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.05, grad_clip_norm=5.0,
                 schedule="warmup_cosine", warmup_fraction=0.01, lr_floor=1e-8,
                 no_decay=(r"(^|/)bias$", r"(^|/)logit_scale$"), lr_multipliers=(), frozen=(),
                 # CLIP-ViP's loop: logit_scale clamped to [0, ln 200] after the forward, before the update.
                 clamp=((r"(^|/)logit_scale$", 0.0, math.log(200.0)),), clamp_when="before_update",
                 per_tensor_clip_norm=0.0, per_tensor_clip_units=(), schedule_steps=0.0)

  c.eval = dict(split="val", every=2000, batch_size=256,
                 data=dict(shard_dir="data/msrvtt/shards", max_text_len=70, paragraph=False))
  c.checkpoint = dict(every=2000, keep=3, best_metric="val/t2v/R@1", best_mode="max", async_save=True)
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
