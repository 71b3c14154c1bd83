"""CLIP2Video on MSVD (1,200 train / 100 val / 670 test, multi-caption): the CLIP4Clip recipe, TDB + TAB.

  python -m clipvip_jax.convert weights/ViT-B-32.pt --out converted/clip-b32
  python -m clipvip_jax.train --config configs/clip2video_msvd.py --workdir runs/c2v-msvd \
      --config.data.shard_dir=data/msvd/shards --config.init.checkpoint=converted/clip-b32

`get_config("runlocal")` is the same recipe on a tiny random model for a few steps (a laptop smoke run; give it
any shards with `--config.data.shard_dir`, e.g. `python -m data_pipelines.synthetic`).

Recipe (spec clip2video.md, "Training recipe"; docs/recipes/clip2video_msvd.md):
- input: frames stored at 5 fps, 12 sampled uniformly (interior frames jittered in training), short side 224 then
  a centre crop, CLIP normalisation; captions tokenised to 32 ids; one random caption of the clip (of ~40) per
  example.
- model: OpenAI CLIP ViT-B/32 per frame; global head = 4-layer temporal transformer with the Temporal Difference
  Block (difference tokens encoded by a 1-layer transformer, sigmoid_selfA); Temporal Alignment Block with K = 5
  centres over all frames plus every second frame encoded by TDB + a 1-layer transformer (TAB_TDB); score and
  loss 0.5 global + 0.5 TAB. The temporal modules start from CLIP's text layers (convert.clip2video
  .init_params_from_clip), as the original builds them.
- optimiser: CLIP4Clip's BertAdam (b1 0.9, b2 0.98, eps 1e-6, no bias correction, weight decay 0.2 on every
  parameter whose name has no "bias", logit_scale included), lr 1e-4 for the new modules and 1e-4 x 1e-3 for
  everything under clip/ (coef_lr), its warmup-cosine over the whole run with 10% warmup, gradient clipping 1.0;
  the patch embedding, class embedding, visual positions, ln_pre, token embedding and text positions frozen.
- global batch 128 and 5 epochs as CLIP4Clip counts them on MSVD: its loader has one example per caption
  (48,774 training captions), so 5 epochs are ceil(5 x 48,774 / 128) = 1,906 steps; here each example is a
  training video with one of its captions drawn at random, for the same number of steps.
- evaluation: on the 100 validation videos about once per caption-epoch (381 steps), multi-caption protocol;
  the best checkpoint by val t2v R@1 is then evaluated on the 670 test videos.
"""

import ml_collections

# Parameters CLIP4Clip freezes (freeze_layer_num 0: every resblock trains, the embeddings and ln_pre do not).
FROZEN = (r"^clip/vision/patch_embedding/", r"^clip/vision/class_embedding$", r"^clip/vision/position_embedding$",
          r"^clip/vision/pre_layrnorm/", r"^clip/text/token_embedding$", r"^clip/text/position_embedding$")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  runlocal = arg == "runlocal"
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mode = "clip2video"  # the model's own loss: center_weight * L_global + (1 - center_weight) * L_TAB
  c.loss = ""
  c.total_steps = 1906  # 5 epochs over the training captions (see the docstring)
  c.num_epochs = 0
  c.grad_accum = 1  # micro-batches per step (the loss always sees the whole global batch)

  # Input (data_pipelines.pipeline.DataConfig keys).
  c.data = dict(shard_dir="", split="train", num_frames=12, image_size=224, max_text_len=32, batch_size=128,
                seed=0, worker_count=8, dtype="bfloat16", sampling="clip2video", resize_mode="crop", target_fps=5.0)

  # Model (clipvip_jax.train.model_init): CLIP2VideoConfig fields in `config`; sizes come from the CLIP checkpoint.
  c.model = dict(kind="clip2video", variant="B/32", dtype="bfloat16", remat="none", attention="xla", clip={},
                 config=dict(sim_type="seqTransf", temporal_type="TDB", temporal_proj="sigmoid_selfA",
                             center_type="TAB", center_proj="TAB_TDB", center_k=5, center_weight=0.5,
                             temporal_layers=4, num_frames=12))
  c.init = dict(checkpoint="", config="", skip=())  # checkpoint: a converted OpenAI CLIP ViT-B/32 (required)

  # Optimiser and schedule (clipvip_jax.train.optim).
  c.optim = dict(name="bert_adam", lr=1e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2, grad_clip_norm=1.0,
                 schedule="bert_warmup_cosine", warmup_fraction=0.1, lr_floor=0.0,
                 no_decay=(r"bias$",), lr_multipliers=((r"^clip/", 1e-3),), frozen=FROZEN)

  # Evaluation, checkpoints, logging.
  c.eval = dict(split="val", every=381, batch_size=64)
  c.checkpoint = dict(every=0, keep=2, best_metric="val/t2v/R@1", best_mode="max", async_save=True)
  c.log_every = 10
  c.max_nonfinite_steps = 3
  c.max_nonfinite_total = 0
  c.progress_bar = True
  c.peak_flops_per_device = 0.0
  c.prefetch = 2
  c.mesh = (-1, 1, 1)  # (data, fsdp, tensor); -1: all remaining devices

  if runlocal:
    _runlocal(c)
  return c


def _runlocal(c: ml_collections.ConfigDict) -> None:
  """A 2-layer, 64-wide random CLIP2Video for a few steps on CPU, the recipe otherwise unchanged."""
  c.total_steps, c.num_epochs, c.log_every = 4, 0, 1
  c.data.update(num_frames=4, image_size=32, max_text_len=16, batch_size=8, worker_count=0, dtype="float32")
  c.model.update(variant="tiny", dtype="float32",
                 clip=dict(text=dict(width=64, heads=1, mlp_dim=256), projection_dim=64))
  c.model.config.update(temporal_layers=1, center_k=3, num_frames=4)
  c.optim.lr = 1e-3
  c.eval.update(every=0, batch_size=8)
  c.progress_bar = False
