"""CLIP-ViP fine-tuning on ActivityNet Captions, paragraph-to-video (actnet_retrieval_vip_base_{32,16}.json).

  python -m clipvip_jax.train --config configs/clipvip_activitynet.py:B/32 --workdir runs/anet_b32 \
      --config.data.shard_dir=data/activitynet/shards --config.init.checkpoint=converted/clipvip-b32
  python -m clipvip_jax.eval --checkpoint runs/anet_b32 --which best --split val1

Recipe: 32 frames (the 12-frame temporal embedding is resampled by linear interpolation), 16 or 8 clips per
GPU (global 64 here), lr 1e-6, wd 0.2, clip 1.0, 20 epochs, text length 70, all sentences joined into one
paragraph (the original's users report R@1 near 20 when they are not). The paper reports val1; select the
checkpoint on a split held out of train (`val`), and evaluate val1 once at the end. 32 frames x 50 tokens per
clip make activations large: remat "full" trades one extra forward pass for them.
"""

import ml_collections

from clipvip_jax.recipes import common


def get_config(variant: str = "B/32") -> ml_collections.ConfigDict:
  c = common.clipvip_finetune(variant, "activitynet", num_frames=32, max_text_len=70, batch_size=64, paragraph=True)
  c.num_epochs = 20
  c.model.remat = "full"
  c.eval.batch_size = 64
  return c
