"""CLIP2Video (TDB + TAB, K = 7) trained on VATEX (25,991 train / 1,500 HGR test, 10 English captions per clip)
with the CLIP4Clip recipe of configs/clip2video_msrvtt.py.

  python -m clipvip_jax.convert ViT-B-32.pt --out converted/openai-clip-b32     # OpenAI CLIP
  python -m clipvip_jax.train --config configs/clip2video_vatex.py --workdir runs/c2v_vatex \
      --config.data.shard_dir=data/vatex/shards --config.init.checkpoint=converted/openai-clip-b32
  python -m clipvip_jax.eval --checkpoint runs/c2v_vatex --which best --split test

As configs/clip2video_msrvtt.py (docs/recipes/clip2video_vatex.md) with K = 7 alignment centres, except the
length: epochs counted over captions as CLIP4Clip's multi-caption loaders do, 25,991 x 10 = 259,910 examples,
ceil(5 x 259,910 / 128) = 10,153 steps of batch 128; here every example is a training video with one of its
captions drawn at random, for the same 10,153 steps. Validation on the official validation videos outside the
HGR test list about once per caption-epoch (2,031 steps), checkpoint selection on val t2v R@1.
`get_config("runlocal")`: the tiny CPU smoke run.
"""

import ml_collections

from clipvip_jax.recipes import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = common.clip2video("vatex", center_k=7)
  c.total_steps = 10153  # 5 epochs over the training captions (see the docstring)
  c.eval.every = c.checkpoint.every = 2031
  if arg == "runlocal":
    common.clip2video_runlocal(c)
  return c
