"""CLIP2Video (TDB + TAB) trained on MSR-VTT 9k with the CLIP4Clip recipe the original paper follows (the
original release has no training script; this is it).

  python -m clipvip_jax.convert ViT-B-32.pt --out converted/openai-clip-b32     # OpenAI CLIP
  python -m clipvip_jax.train --config configs/clip2video_msrvtt.py --workdir runs/c2v_msrvtt \
      --config.data.shard_dir=data/msrvtt/shards --config.init.checkpoint=converted/openai-clip-b32
  python -m clipvip_jax.eval --checkpoint runs/c2v_msrvtt --which best --split test

Recipe (spec clip2video.md): 12 frames sampled from 5 fps, short side 224 + centre crop, 32 text tokens, global
batch 128, 5 epochs; BertAdam (b1 0.9, b2 0.98, eps 1e-6, no bias correction, weight decay 0.2 on the old
parameters, on all but biases: logit_scale is decayed as in CLIP4Clip), lr 1e-4 for the new modules and
1e-4 x 1e-3 for the CLIP towers, CLIP4Clip's warmup_cosine (10% warmup on the progress of the whole run, the
first update at lr 0), global-norm clip 1.0; frozen: patch embedding, class and visual position embeddings,
pre-LayerNorm, token embedding and text position embedding. Temporal modules start from the CLIP text layers.
Loss 0.5 L_global + 0.5 L_TAB. K = 5 TAB centres (configs/clip2video_vatex.py: 7).

`get_config("runlocal")`: the same recipe on a tiny random CLIP2Video for 4 steps, a CPU smoke run on any shards
(e.g. `python -m data_pipelines.synthetic --out /tmp/synth --clips 64 --frames 4 --size 32`, then
`--config configs/clip2video_msrvtt.py:runlocal --config.data.shard_dir=/tmp/synth --config.init.checkpoint=`).
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
  c.num_epochs = 5
  c.total_steps = 0
  c.grad_accum = 1

  c.data = dict(shard_dir="data/msrvtt/shards", split="train", num_frames=12, image_size=224, max_text_len=32,
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

  # Model selection on a validation split held out of the 9k training videos (the official 497 'validate'
  # videos, built as on the CLIP-ViP MSR-VTT page), every epoch (~71 steps); never on the 1k-A test split, which is
  # evaluated once at the end (CLIP4Clip evaluated, and so selected, on test: docs/recipes/clip2video_msrvtt.md).
  c.eval = dict(split="val", every=71, batch_size=128)
  c.checkpoint = dict(every=1000, keep=3, best_metric="val/t2v/R@1", best_mode="max", async_save=True)
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
