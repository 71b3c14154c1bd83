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

import ml_collections

from clipvip_jax.recipes import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = common.clip2video("msvd", center_k=5)
  c.total_steps = 1906  # 5 epochs over the training captions (see the docstring)
  c.eval.every = c.checkpoint.every = 381
  if arg == "runlocal":
    common.clip2video_runlocal(c)
  return c
