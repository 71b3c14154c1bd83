"""CLIP-ViP fine-tuning on MSR-VTT 9k (the original's msrvtt_retrieval_vip_base_{32,16}.json).

  python -m clipvip_jax.convert pretrain_clipvip_base_32.pt --out converted/clipvip-b32
  python -m clipvip_jax.train --config configs/clipvip_msrvtt.py:B/32 --workdir runs/msrvtt_b32 \
      --config.data.shard_dir=data/msrvtt/shards --config.init.checkpoint=converted/clipvip-b32
  python -m clipvip_jax.eval --checkpoint runs/msrvtt_b32 --which best --split test

Recipe (spec "Training recipes"): 12 frames, global batch 128, AdamW lr 1e-6 (b2 0.98, eps 1e-6), wd 0.2,
grad-norm clip 1.0, 1% warmup then cosine to 1e-8, "100 epochs" of one sampled caption per video, text length
50, fine-tuning loss L_{V<->T}. Model selection on the `val` shards (videos held out of the 9k training set,
e.g. the official 497 'validate' videos), never on the 1k-A test split the paper reports.
Parallelism is a config edit: --config.mesh='(1,-1,1)' shards parameters and optimiser state (FSDP),
--config.mesh='(-1,1,2)' adds 2-way tensor parallelism.
"""

import ml_collections

from clipvip_jax.recipes import common


def get_config(variant: str = "B/32") -> ml_collections.ConfigDict:
  c = common.clipvip_finetune(variant, "msrvtt", max_text_len=50)
  c.num_epochs = 100  # of one sampled caption per video; steps = ceil(epochs * clips / batch) as the original counts
  return c
