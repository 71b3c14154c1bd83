"""CLIP-ViP fine-tuning on LSMDC (the original's lsmdc_retrieval_vip_base_{32,16}.json).

  python -m clipvip_jax.train --config configs/clipvip_lsmdc.py:B/32 --workdir runs/lsmdc_b32 \
      --config.data.shard_dir=data/lsmdc/shards --config.init.checkpoint=converted/clipvip-b32
  python -m clipvip_jax.eval --checkpoint runs/lsmdc_b32 --which best --split test

Recipe: 12 frames, 16 clips per GPU (global 128 on 8 devices), lr 1e-6, wd 0.2, clip 1.0, 10 epochs, text
length 50. Model selection on LSMDC's val split; the paper reports the 1k test.
"""

import ml_collections

from clipvip_jax.recipes import common


def get_config(variant: str = "B/32") -> ml_collections.ConfigDict:
  c = common.clipvip_finetune(variant, "lsmdc", max_text_len=50)
  c.num_epochs = 10
  return c
