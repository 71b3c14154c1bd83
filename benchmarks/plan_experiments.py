"""Configs for planner experiments (`python -m clipvip_jax.plan --config benchmarks/plan_experiments.py:ARG`):
B/16 pretraining cut to ONE layer per tower at 16 clips per chip, so that a variant of the step compiles in ~4
minutes instead of ~20 and the per-layer bytes can be compared. ARG is the attention implementation: "xla" or
"pallas" (this project's proxy-attention TPU kernel, models/proxy_attention_kernel.py; what "auto" gives on TPU),
optionally followed by ",N" for N vision layers (one layer's bytes are the difference: benchmarks/plan_bytes.py).
Results: benchmarks/results/plans/experiments/ (b16_1layer_v5p4_jaxflash.json is an earlier try, jax's own Pallas
flash-attention kernel, since removed), docs/performance.md section 4 ("Where the time goes").

  python -m clipvip_jax.plan --config benchmarks/plan_experiments.py:pallas --topology v5p:2x2x1 --no-search \
      --no-eval --json /tmp/pallas.json
"""

from configs import clipvip_pretrain


def get_config(arg: str = "xla"):
  attention, _, vision_layers = arg.partition(",")  # "pallas,2": two vision layers (benchmarks/plan_bytes.py)
  c = clipvip_pretrain.get_config("B/16")
  c.model.clip = dict(vision=dict(layers=int(vision_layers or 1)), text=dict(layers=1))
  c.model.attention = attention
  c.data.batch_size = 64  # 16 per chip on v5p:2x2x1
  return c
