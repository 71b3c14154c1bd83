"""CLIP2Video (TDB + TAB) trained on MSVD (1,200 train / 100 val / 670 test, multi-caption) with the CLIP4Clip
recipe of configs/clip2video_msrvtt.py.

  python -m clipvip_jax.convert ViT-B-32.pt --out converted/openai-clip-b32     # OpenAI CLIP
  python -m clipvip_jax.train --config configs/clip2video_msvd.py --workdir runs/c2v_msvd \
      --config.data.shard_dir=data/msvd/shards --config.init.checkpoint=converted/openai-clip-b32
  python -m clipvip_jax.eval --checkpoint runs/c2v_msvd --which best --split test

As configs/clip2video_msrvtt.py (docs/recipes/clip2video_msvd.md), K = 5 centres, except the length: CLIP4Clip's
MSVD loader has one example per caption (48,774 training captions), so its 5 epochs are ceil(5 x 48,774 / 128)
= 1,906 steps of batch 128; here every example is a training video with one of its ~40 captions drawn at
random, for the same 1,906 steps. Validation (100 videos, every caption a query) about once per caption-epoch
(381 steps), checkpoint selection on val t2v R@1. `get_config("runlocal")`: the tiny CPU smoke run.
"""

import math

import ml_collections

from clipvip_jax.train.sharding import DEFAULT_RULES

FROZEN = (r"^clip/vision/patch_embedding/", r"^clip/vision/class_embedding$", r"^clip/vision/position_embedding$",
          r"^clip/vision/pre_layrnorm/", r"^clip/text/token_embedding$", r"^clip/text/position_embedding$")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 42
  c.mode = "clip2video"
  c.loss = ""
  c.num_epochs = 0
  c.total_steps = 1906  # 5 epochs over the training captions (see the docstring)
  c.grad_accum = 1

  c.data = dict(shard_dir="data/msvd/shards", split="train", num_frames=12, image_size=224, max_text_len=32,
                batch_size=128, seed=42, worker_count=8, dtype="bfloat16", sampling="clip2video", target_fps=5.0,
                resize_mode="crop")

  c.model = dict(kind="clip2video", variant="B/32", dtype="bfloat16", remat="auto", attention="xla", clip={},
                 scan_layers=False,  # True: jax.lax.scan over each tower's blocks (same weights)
                 config=dict(sim_type="seqTransf", temporal_type="TDB", center_type="TAB", center_proj="TAB_TDB",
                             center_k=5, center_weight=0.5, temporal_layers=4))
  c.init = dict(checkpoint="converted/openai-clip-b32", config="", skip=(),
                logit_scale=None)  # a value replaces logit_scale after loading (CLIP-ViP's overload_logit_scale)

  c.optim = dict(name="bert_adam", lr=1e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2, grad_clip_norm=1.0,
                 schedule="bert_warmup_cosine", warmup_fraction=0.1, lr_floor=0.0, no_decay=(r"(^|/)bias$",),
                 lr_multipliers=((r"^clip/", 1e-3),), frozen=FROZEN,
                 # CLIP4Clip's loop: logit_scale clamped to at most ln 100 after the update.
                 clamp=((r"(^|/)logit_scale$", None, math.log(100.0)),), clamp_when="after_update",
                 # BertAdam's max_grad_norm: each original tensor (attn.in_proj_* holds query, key and value)
                 # clipped to norm 1.0 inside the optimiser, after the global clip.
                 per_tensor_clip_norm=1.0,
                 per_tensor_clip_units=((r"/attn/(query|key|value)/(kernel|bias)$", r"/attn/in_proj/\2"),),
                 schedule_steps=0.0)

  c.eval = dict(split="val", every=381, batch_size=128)
  c.checkpoint = dict(every=381, keep=3, best_metric="val/t2v/R@1", best_mode="max", async_save=True)
  c.log_every = 50
  c.max_nonfinite_steps = 20
  c.max_nonfinite_total = 200
  c.progress_bar = True
  c.peak_flops_per_device = 0.0
  c.prefetch = 2
  c.compilation_cache_dir = ""

  c.mesh = (-1, 1, 1)
  c.sharding_rules = tuple(DEFAULT_RULES)
  c.constrain_activations = False  # True with FSDP: keeps activations batch-split (less memory)
  if arg == "runlocal":
    runlocal(c)
  return c


def runlocal(c: ml_collections.ConfigDict) -> None:
  """A 64-wide random CLIP2Video (1 temporal layer, 3 centres) for 4 steps on CPU, the recipe otherwise unchanged."""
  c.total_steps, c.num_epochs, c.log_every = 4, 0, 1
  c.data.update(shard_dir="", num_frames=4, image_size=32, max_text_len=16, batch_size=8, worker_count=0,
                dtype="float32")
  c.model.update(variant="tiny", dtype="float32",
                 clip=dict(text=dict(width=64, heads=1, mlp_dim=256), projection_dim=64))
  c.model.config.update(temporal_layers=1, center_k=3)
  c.init.checkpoint = ""
  c.optim.lr = 1e-3
  c.eval.update(every=0, batch_size=8)
  c.checkpoint.update(every=0, async_save=False)
  c.progress_bar = False
