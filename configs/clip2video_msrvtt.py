"""CLIP2Video (TDB + TAB) trained on MSR-VTT 9k with the CLIP4Clip recipe the original paper follows (the
original release has no training script; this is it).

  python -m clipvip_jax.convert ViT-B-32.pt --out converted/openai-clip-b32     # OpenAI CLIP
  python -m clipvip_jax.train --config configs/clip2video_msrvtt.py --workdir runs/c2v_msrvtt \
      --config.data.shard_dir=data/msrvtt/shards --config.init.checkpoint=converted/openai-clip-b32
  python -m clipvip_jax.eval --checkpoint runs/c2v_msrvtt --which best --split test

Recipe (spec clip2video.md): 12 frames sampled from 5 fps, short side 224 + centre crop, 32 text tokens, global
batch 128, 5 epochs; BertAdam (b1 0.9, b2 0.98, eps 1e-6, no bias correction, weight decay 0.2 on the old
parameters, on all but biases: logit_scale is decayed as in CLIP4Clip), lr 1e-4 for the new modules and
1e-4 x 1e-3 for the CLIP towers, CLIP4Clip's warmup_cosine (10% warmup on the progress of the whole run, the
first update at lr 0), global-norm clip 1.0; frozen: patch embedding, class and visual position embeddings,
pre-LayerNorm, token embedding and text position embedding. Temporal modules start from the CLIP text layers.
Loss 0.5 L_global + 0.5 L_TAB. K = 5 TAB centres (configs/clip2video_vatex.py: 7).

`get_config("runlocal")`: the same recipe on a tiny random CLIP2Video for 4 steps, a CPU smoke run on any shards
(e.g. `python -m data_pipelines.synthetic --out /tmp/synth --clips 64 --frames 4 --size 32`, then
`--config configs/clip2video_msrvtt.py:runlocal --config.data.shard_dir=/tmp/synth --config.init.checkpoint=`).
"""

import ml_collections

from clipvip_jax.recipes import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = common.clip2video("msrvtt", center_k=5)
  c.num_epochs = 5
  # Model selection on a validation split held out of the 9k training videos (the official 497 'validate'
  # videos, built as on the CLIP-ViP MSR-VTT page), every epoch (~71 steps); never on the 1k-A test split, which is
  # evaluated once at the end (CLIP4Clip evaluated, and so selected, on test: docs/recipes/clip2video_msrvtt.md).
  c.eval.every = 71
  if arg == "runlocal":
    common.clip2video_runlocal(c)
  return c
