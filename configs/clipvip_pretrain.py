"""CLIP-ViP post-pretraining on HD-VILA-100M with OFA captions: Omnisource Cross-modal Learning
(the original's pretrain_vip_base_{32,16}.json).

  python -m clipvip_jax.convert openai/clip-vit-base-patch32 --out converted/clip-b32    # an HF CLIP directory
  python -m clipvip_jax.train --config configs/clipvip_pretrain.py:B/32 --workdir runs/pretrain_b32 \
      --config.data.shard_dir=data/hdvila/shards --config.eval.data.shard_dir=data/msrvtt/shards

Recipe: 12 frames + the middle frame as an image, subtitle (ASR) and auxiliary caption texts of length 70,
global batch 1024 (32 GPUs), AdamW lr 5e-6, wd 0.05, clip 5.0, 1% warmup + cosine, 5 epochs, the shipped loss
L_{V<->S,C} + L_{F<->C} ("NCELearnableTempLoss_vsc_fc"; the ablations of Fig. 2 by name, see
clipvip_jax.losses.OMNISOURCE_LOSSES). Starts from OpenAI CLIP: the video proxies are drawn N(0, 1), the temporal
embedding is zero, logit_scale restarts at 4.6 (CLIP's is not taken). Every loss term sees the whole global
batch as negatives. Validation: MSR-VTT `val` shards (zero-shot), never the test split.
On a TPU pod slice or several GPU nodes see docs/training.md; --config.grad_accum=K keeps the global batch on
fewer devices without shrinking the negatives.
"""

import ml_collections

from clipvip_jax.recipes import common


def get_config(variant: str = "B/32") -> ml_collections.ConfigDict:
  c = common.clipvip(variant, init="clip", dataset="hdvila")
  c.mode, c.loss, c.num_epochs = "omnisource", "NCELearnableTempLoss_vsc_fc", 5
  c.data.update(max_text_len=70, batch_size=1024, pretraining=True)
  c.init.skip = (r"^logit_scale$",)  # the original restarts logit_scale at 4.6 rather than take CLIP's
  c.optim = common.clipvip_adamw(5e-6, weight_decay=0.05, grad_clip_norm=5.0)
  c.eval.update(every=2000, batch_size=256, data=dict(shard_dir="data/msrvtt/shards", max_text_len=70,
                                                      paragraph=False))
  c.checkpoint.every = 2000
  return c
