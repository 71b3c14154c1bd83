"""CLIP-ViP fine-tuning on DiDeMo, paragraph-to-video (the original's didemo_retrieval_vip_base_{32,16}.json).

  python -m clipvip_jax.train --config configs/clipvip_didemo.py:B/32 --workdir runs/didemo_b32 \
      --config.data.shard_dir=data/didemo/shards --config.init.checkpoint=converted/clipvip-b32
  python -m clipvip_jax.eval --checkpoint runs/didemo_b32 --which best --split test

Recipe: 12 frames, 16 clips per GPU (global 128 on 8 devices), lr 1e-6, wd 0.2, clip 1.0, 20 epochs; all
sentences of a video joined into one paragraph (data.paragraph); text length 50 for B/32 and 70 for B/16.
Model selection on DiDeMo's val split; the paper reports test.
"""

import ml_collections

from clipvip_jax.recipes import common


def get_config(variant: str = "B/32") -> ml_collections.ConfigDict:
  c = common.clipvip_finetune(variant, "didemo", max_text_len=50 if variant == "B/32" else 70, paragraph=True)
  c.num_epochs = 20
  if variant == "B/16":  # the original's lr_mul 10 on lr_mul_prefix "logit_scale" (B/16 only)
    c.optim.lr_multipliers = ((r"(^|/)logit_scale$", 10.0),)
  return c
