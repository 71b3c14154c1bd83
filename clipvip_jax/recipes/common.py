"""What the paper recipes (configs/clipvip_*.py, configs/clip2video_*.py) share; each recipe states only what
differs from its original here.

  from clipvip_jax.recipes import common
  c = common.clipvip_finetune("B/32", "msrvtt", max_text_len=50)   # then the dataset's own settings
  c.num_epochs = 100

Keys a recipe leaves out take the schema's defaults (clipvip_jax/train/config_schema.py).
"""

from __future__ import annotations

import math

import ml_collections

VARIANTS = ("B/32", "B/16")

# The originals' logit_scale clamps: CLIP-ViP's [0, ln 200] after the forward, before the update; CLIP4Clip's at
# most ln 100 after optimizer.step().
CLIPVIP_CLAMP = ((r"(^|/)logit_scale$", 0.0, math.log(200.0)),)
CLIP4CLIP_CLAMP = ((r"(^|/)logit_scale$", None, math.log(100.0)),)

# CLIP4Clip's freeze_layer_num block: patch embedding, class and visual position embeddings, pre-LayerNorm, token
# embedding and text position embedding never change.
CLIP4CLIP_FROZEN = (r"^clip/vision/patch_embedding/", r"^clip/vision/class_embedding$",
                    r"^clip/vision/position_embedding$", r"^clip/vision/pre_layrnorm/", r"^clip/text/token_embedding$",
                    r"^clip/text/position_embedding$")


def base() -> ml_collections.ConfigDict:
  """The run settings every paper recipe shares: seed 42, bfloat16 input on 224 px frames with 8 reading workers,
  validation every 500 steps on `val` (never the test split the papers report) with the best checkpoint kept by
  val t2v R@1, and a stop after 20 consecutive or 200 skipped non-finite updates."""
  c = ml_collections.ConfigDict()
  c.seed = 42
  c.data = dict(split="train", num_frames=12, image_size=224, batch_size=128, seed=42, worker_count=8,
                dtype="bfloat16")
  c.eval = dict(split="val", every=500, batch_size=128)
  c.checkpoint = dict(every=1000, keep=3, best_metric="val/t2v/R@1", best_mode="max", async_save=True)
  c.max_nonfinite_steps = 20
  c.max_nonfinite_total = 200
  return c


def clipvip_adamw(lr: float, *, weight_decay: float, grad_clip_norm: float) -> dict:
  """CLIP-ViP's optimiser (the HF/ClipBERT AdamW it ships): b2 0.98, eps 1e-6, 1% warmup then cosine to 1e-8,
  biases and logit_scale not decayed, logit_scale clamped before the update."""
  return dict(name="adamw", lr=lr, b1=0.9, b2=0.98, eps=1e-6, weight_decay=weight_decay,
              grad_clip_norm=grad_clip_norm, schedule="warmup_cosine", warmup_fraction=0.01, lr_floor=1e-8,
              no_decay=(r"(^|/)bias$", r"(^|/)logit_scale$"), lr_multipliers=(), frozen=(), clamp=CLIPVIP_CLAMP,
              clamp_when="before_update", per_tensor_clip_norm=0.0, per_tensor_clip_units=())


def clip4clip_bert_adam() -> dict:
  """CLIP4Clip's BertAdam recipe, which CLIP2Video follows: lr 1e-4 for the new modules and 1e-4 x 1e-3 for the
  CLIP towers, b2 0.98, eps 1e-6, weight decay 0.2 on all but biases (logit_scale is decayed, as in CLIP4Clip),
  its warmup_cosine (10% warmup on the whole run's progress, the first update at lr 0), global-norm clip 1.0 and
  BertAdam's own per-tensor clip; CLIP's input layers frozen."""
  return dict(name="bert_adam", lr=1e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2, grad_clip_norm=1.0,
              schedule="bert_warmup_cosine", warmup_fraction=0.1, lr_floor=0.0, no_decay=(r"(^|/)bias$",),
              lr_multipliers=((r"^clip/", 1e-3),), frozen=CLIP4CLIP_FROZEN, clamp=CLIP4CLIP_CLAMP,
              clamp_when="after_update",
              # BertAdam's max_grad_norm: each original tensor (attn.in_proj_* holds query, key and value)
              # clipped to norm 1.0 inside the optimiser, after the global clip.
              per_tensor_clip_norm=1.0,
              per_tensor_clip_units=((r"/attn/(query|key|value)/(kernel|bias)$", r"/attn/in_proj/\2"),),
              schedule_steps=0.0)


def _short(variant: str) -> str:
  return variant.replace("/", "").lower()  # "B/32" -> "b32"


def clipvip(variant: str, *, init: str, dataset: str) -> ml_collections.ConfigDict:
  """A CLIP-ViP run of `variant` (4 video proxies, a 12-frame temporal embedding) from converted/{init}-{b32|b16},
  on data/{dataset}/shards with CLIP-ViP's frame sampling and squashed frames; the optimiser is the recipe's."""
  if variant not in VARIANTS:
    raise ValueError(f"variant must be 'B/32' or 'B/16', got {variant!r}")
  c = base()
  c.mode = "nce"
  c.data.update(shard_dir=f"data/{dataset}/shards", sampling="clipvip", resize_mode="squash")
  c.model = dict(kind="clipvip", variant=variant, dtype="bfloat16", remat="auto", attention="auto",
                 scan_layers=False,  # True: jax.lax.scan over each tower's blocks (same weights)
                 config=dict(num_proxies=4, temporal_size=12))
  c.init = dict(checkpoint=f"converted/{init}-{_short(variant)}")
  return c


def clipvip_finetune(variant: str, dataset: str, **data) -> ml_collections.ConfigDict:
  """CLIP-ViP fine-tuning from the post-pretrained CLIP-ViP (its weights fix the architecture): AdamW lr 1e-6,
  weight decay 0.2, global clip 1.0, the fine-tuning loss L_{V<->T}; `data` sets the dataset's own data keys."""
  c = clipvip(variant, init="clipvip", dataset=dataset)
  c.data.update(data)
  c.optim = clipvip_adamw(1e-6, weight_decay=0.2, grad_clip_norm=1.0)
  return c


def clip2video(dataset: str, *, center_k: int) -> ml_collections.ConfigDict:
  """CLIP2Video (TDB + TAB with `center_k` alignment centres, 4 temporal layers started from CLIP's text layers)
  from OpenAI CLIP B/32 on data/{dataset}/shards with CLIP4Clip's recipe: 12 frames sampled from 5 fps, short
  side 224 + centre crop, 32 text tokens, global batch 128, loss 0.5 L_global + 0.5 L_TAB."""
  c = base()
  c.mode = "clip2video"
  c.data.update(shard_dir=f"data/{dataset}/shards", max_text_len=32, sampling="clip2video", target_fps=5.0,
                resize_mode="crop")
  c.model = dict(kind="clip2video", variant="B/32", dtype="bfloat16", remat="auto", attention="auto",
                 scan_layers=False,
                 config=dict(sim_type="seqTransf", temporal_type="TDB", center_type="TAB", center_proj="TAB_TDB",
                             center_k=center_k, center_weight=0.5, temporal_layers=4))
  c.init = dict(checkpoint="converted/openai-clip-b32")
  c.optim = clip4clip_bert_adam()
  return c


def clip2video_runlocal(c: ml_collections.ConfigDict) -> None:
  """A 64-wide random CLIP2Video (1 temporal layer, 3 centres) for 4 steps on CPU, the recipe otherwise unchanged:
  `get_config("runlocal")` of the clip2video recipes."""
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
