"""A tiny CLIP-ViP on the synthetic shards: the trainer's tests, and a smoke run of the whole stack on a laptop.

  python -m data_pipelines.synthetic --out /tmp/synth --clips 64 --frames 4 --size 32
  python -m clipvip_jax.train --config configs/tiny_test.py --workdir /tmp/tiny --config.data.shard_dir=/tmp/synth
  python -m clipvip_jax.eval --checkpoint /tmp/tiny --split test

`get_config("meanp")` gives the same-size meanP baseline (CLIP4Clip frame mean pooling, no temporal modelling).
"""

import ml_collections

from clipvip_jax.train.sharding import DEFAULT_RULES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mode = "nce"
  c.loss = ""  # omnisource loss name (mode "omnisource" only)
  c.total_steps = 8
  c.num_epochs = 0
  c.grad_accum = 1

  # Input: the synthetic twin clips (data_pipelines.synthetic), 4 frames of 32 x 32.
  c.data = dict(shard_dir="", split="train", num_frames=4, image_size=32, max_text_len=16, batch_size=8, seed=0,
                worker_count=0, dtype="float32", sampling="clipvip", resize_mode="squash")

  # Model: 1-layer towers of width 32, 2 video proxies, temporal embedding of 4 frames.
  c.model = dict(kind=arg or "clipvip", variant="tiny", dtype="float32", remat="auto", attention="xla",
                 scan_layers=False,
                 clip=dict(vision=dict(width=32, layers=1, heads=2, mlp_dim=64, patch_size=8, image_size=32),
                           text=dict(width=32, layers=1, heads=2, mlp_dim=64, max_len=16), projection_dim=16),
                 config=dict(num_proxies=2, temporal_size=4) if (arg or "clipvip") == "clipvip" else {})
  c.init = dict(checkpoint="", config="", skip=())

  # Optimiser and schedule (CLIP-ViP's AdamW; a large lr so that a few steps move the tiny model).
  c.optim = dict(name="adamw", lr=1e-3, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2, grad_clip_norm=1.0,
                 schedule="warmup_cosine", warmup_fraction=0.1, lr_floor=1e-8,
                 no_decay=(r"(^|/)bias$", r"(^|/)logit_scale$"), lr_multipliers=(), frozen=())

  # Evaluation on the validation split, checkpoints, logging.
  c.eval = dict(split="val", every=0, batch_size=8)
  c.checkpoint = dict(every=0, keep=2, best_metric="val/t2v/R@1", best_mode="max", async_save=True)
  c.log_every = 4
  c.max_nonfinite_steps = 3
  c.max_nonfinite_total = 0  # 0: no limit on the total
  c.progress_bar = False
  c.peak_flops_per_device = 0.0
  c.prefetch = 2
  c.compilation_cache_dir = ""  # a folder enables jax's persistent compilation cache (fast restarts)
  c.record_batches = False  # write every global batch's clip ids to WORKDIR/batches.jsonl (debugging)

  c.mesh = (-1, 1, 1)
  c.sharding_rules = tuple(DEFAULT_RULES)
  c.constrain_activations = False  # pin each block's residual stream to batch sharding (useful under FSDP)
  return c
