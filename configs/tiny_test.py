"""A tiny CLIP-ViP on the synthetic shards: the trainer's tests, and a smoke run of the whole stack on a laptop.

  python -m data_pipelines.synthetic --out /tmp/synth --clips 64 --frames 4 --size 32
  python -m clipvip_jax.train --config configs/tiny_test.py --workdir /tmp/tiny --config.data.shard_dir=/tmp/synth
  python -m clipvip_jax.eval --checkpoint /tmp/tiny --split test

`get_config("meanp")` gives the same-size meanP baseline (CLIP4Clip frame mean pooling, no temporal modelling).
"""

import ml_collections

from clipvip_jax.recipes import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  kind = arg or "clipvip"
  c = ml_collections.ConfigDict()
  c.mode = "nce"
  c.total_steps = 8
  c.log_every = 4
  c.max_nonfinite_steps = 3
  c.progress_bar = False

  # Input: the synthetic twin clips (data_pipelines.synthetic), 4 frames of 32 x 32.
  c.data = dict(shard_dir="", num_frames=4, image_size=32, max_text_len=16, batch_size=8, seed=0)

  # Model: 1-layer towers of width 32, 2 video proxies, temporal embedding of 4 frames.
  c.model = dict(kind=kind, variant="tiny", dtype="float32", remat="auto", attention="xla", scan_layers=False,
                 clip=dict(vision=dict(width=32, layers=1, heads=2, mlp_dim=64, patch_size=8, image_size=32),
                           text=dict(width=32, layers=1, heads=2, mlp_dim=64, max_len=16), projection_dim=16),
                 config=dict(num_proxies=2, temporal_size=4) if kind == "clipvip" else {})

  # CLIP-ViP's AdamW with a large lr, so that a few steps move the tiny model.
  c.optim = common.clipvip_adamw(1e-3, weight_decay=0.2, grad_clip_norm=1.0)
  c.optim.update(warmup_fraction=0.1, clamp=None, clamp_when="before_update")

  c.eval = dict(split="val", every=0, batch_size=8)
  c.checkpoint = dict(keep=2, best_metric="val/t2v/R@1")
  return c
