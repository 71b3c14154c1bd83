"""The README demo's recipe (configs/demo.py points here; the demo command reads it from the installed package): a
small CLIP-ViP and the same-size meanP baseline, trained from scratch on the synthetic set.

  python -m clipvip_jax.demo                     # generates the data, trains both, evaluates, prints the table
  python -m clipvip_jax.train --config configs/demo.py:clipvip --workdir runs/demo_clipvip \
      --config.data.shard_dir=demo_out/data

`get_config("clipvip")` / `get_config("meanp")`: identical towers, data, optimiser and step budget; only the video
head differs (video proxies + proxy-guided attention + temporal embedding vs. the mean of frame embeddings).
The synthetic clips come in time-reversed twins whose captions differ only in the motion words, and the twins are
kept in the same batch (data.group_size = 2), so order-blind pooling cannot tell them apart and CLIP-ViP must learn
to read time.
"""

import ml_collections

NUM_FRAMES = 4
IMAGE_SIZE = 32
MAX_TEXT_LEN = 24  # the longest synthetic caption is 21 tokens with its start and end tokens


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  kind = arg or "clipvip"
  if kind not in ("clipvip", "meanp"):
    raise ValueError(f"the demo recipe takes 'clipvip' or 'meanp', got {arg!r}")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.mode = "nce"
  c.total_steps = 2000

  # Input: synthetic shards (data_pipelines.synthetic), twins kept together in a batch.
  c.data = dict(shard_dir="demo_out/data", split="train", num_frames=NUM_FRAMES, image_size=IMAGE_SIZE,
                max_text_len=MAX_TEXT_LEN, batch_size=32, seed=0, worker_count=0, read_threads=0, dtype="uint8",
                sampling="clipvip", resize_mode="squash", group_size=2)

  # Model: 4-layer towers of width 64 on 32 x 32 frames (16 patches of 8 x 8), 8 video proxies: width, batch and
  # step count, and the proxy count were each chosen on measured validation R@1 and step time
  # (docs/performance.md section 11).
  tower = dict(width=64, layers=4, heads=4, mlp_dim=128)
  # Position (and CLIP-ViP's temporal) embeddings start at std 1.0, the scale of the patch embeddings: trained
  # from scratch with the usual 0.02 the towers barely see where and when a shape is, and motion goes unlearned.
  c.model = dict(kind=kind, dtype="float32", remat="auto", attention="xla",
                 clip=dict(vision=dict(**tower, patch_size=8, image_size=IMAGE_SIZE, position_init_std=1.0),
                           text=dict(**tower, max_len=MAX_TEXT_LEN), projection_dim=64),
                 config=(dict(num_proxies=8, temporal_size=NUM_FRAMES, temporal_init_std=1.0) if kind == "clipvip"
                         else {}))
  c.init = dict(checkpoint="", config="", skip=())

  c.optim = dict(name="adamw", lr=1e-3, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.05, grad_clip_norm=1.0,
                 schedule="warmup_cosine", warmup_fraction=0.08, lr_floor=1e-8,
                 no_decay=(r"(^|/)bias$", r"(^|/)logit_scale$"), lr_multipliers=(), frozen=())

  # Model selection on the validation split; the demo reports the held-out test split.
  c.eval = dict(split="val", every=500, batch_size=128)
  c.checkpoint = dict(every=0, keep=1, best_metric="val/t2v/R@1", best_mode="max", async_save=False)
  c.log_every = 25
  c.max_nonfinite_steps = 3
  return c
