"""Analytic FLOP counts of one training step per clip, for CLIP-ViP, CLIP2Video and the per-frame meanP peer.

Counted: every matrix product (a multiply-add is 2 FLOPs) — q/k/v/out projections and the MLP (2n(4d^2 + 2dm)
per layer of n tokens), attention scores and the weighted sum (2 x 2 x pairs x d per layer, pairs = the
(query, key) pairs the implementation actually computes), the patch embedding, the two projections and the
contrastive logits. Not counted: LayerNorm, softmax, activations, the optimiser (O(params) element-wise, under
1% here). Training = 3 x forward: the backward pass computes a gradient for the activations and one for the
weights, each as expensive as the forward product ("model FLOPs": recomputation under remat is not counted).

Attention pairs per clip of T frames with L patches each:
  CLIP-ViP block-sparse  M*S + T*L*(M+L), S = M + T*L   (proxies see all tokens; patches see proxies + own frame)
  CLIP-ViP dense mask    S^2                            (the reference computes every pair, then masks)
  meanP peer             T*(1+L)^2                      (each frame is its own [CLS + L] sequence)
  text                   n^2                            (the causal mask is applied to a full n x n product)
"""

from __future__ import annotations

import dataclasses

from clipvip_jax.models.clip import CLIPConfig


@dataclasses.dataclass(frozen=True)
class StepFlops:
  vision: float
  text: float
  loss: float

  @property
  def forward(self) -> float:
    return self.vision + self.text + self.loss

  @property
  def train(self) -> float:
    return 3.0 * self.forward


def _layer_flops(tokens: int, pairs: int, width: int, mlp: int) -> float:
  return 2.0 * tokens * (4 * width * width + 2 * width * mlp) + 4.0 * pairs * width


def text_forward(cfg: CLIPConfig, text_len: int) -> float:
  t = cfg.text
  return t.layers * _layer_flops(text_len, text_len * text_len, t.width, t.mlp_dim) + 2.0 * t.width * cfg.projection_dim


def _patch_embed(cfg: CLIPConfig, frames: int) -> float:
  v = cfg.vision
  return 2.0 * frames * v.num_patches * v.patch_size**2 * v.channels * v.width


def clipvip_vision_forward(cfg: CLIPConfig, frames: int, num_proxies: int, pattern: str = "block_sparse") -> float:
  v = cfg.vision
  m, l = num_proxies, v.num_patches
  s = m + frames * l
  pairs = m * s + frames * l * (m + l) if pattern == "block_sparse" else s * s
  return (_patch_embed(cfg, frames) + v.layers * _layer_flops(s, pairs, v.width, v.mlp_dim)
          + 2.0 * v.width * cfg.projection_dim)


def meanp_vision_forward(cfg: CLIPConfig, frames: int) -> float:
  v = cfg.vision
  n = 1 + v.num_patches
  return (_patch_embed(cfg, frames) + frames * v.layers * _layer_flops(n, n * n, v.width, v.mlp_dim)
          + frames * 2.0 * v.width * cfg.projection_dim)


def clipvip_step(cfg: CLIPConfig, *, frames: int, text_len: int, num_proxies: int, batch: int,
                 pattern: str = "block_sparse") -> StepFlops:
  """Per-clip FLOPs of a CLIP-ViP train step (the B x B logits shared out over the batch)."""
  return StepFlops(clipvip_vision_forward(cfg, frames, num_proxies, pattern), text_forward(cfg, text_len),
                   2.0 * batch * cfg.projection_dim)


def meanp_step(cfg: CLIPConfig, *, frames: int, text_len: int, batch: int) -> StepFlops:
  return StepFlops(meanp_vision_forward(cfg, frames), text_forward(cfg, text_len), 2.0 * batch * cfg.projection_dim)


def clip2video_step(cfg, *, frames: int, text_len: int, batch: int) -> StepFlops:
  """Per-clip FLOPs of a CLIP2Video train step: per-frame CLIP vision (as meanP), the text tower, and the temporal
  transformers (TDB's interleaved difference tokens: 2T - 1 tokens in seqTransf, plus its difference and action
  layers on T tokens; TAB's K-centre pooling is under 1% and not counted); the logits of both heads."""
  c = cfg.clip
  width, mlp = c.projection_dim, cfg.temporal_mlp_dim
  tokens = 2 * frames - 1 if cfg.temporal_type == "TDB" else frames
  temporal = cfg.temporal_layers * _layer_flops(tokens, tokens * tokens, width, mlp)
  temporal += (cfg.difference_layers + cfg.action_layers) * _layer_flops(frames, frames * frames, width, mlp)
  return StepFlops(meanp_vision_forward(c, frames) + temporal, text_forward(c, text_len), 4.0 * batch * width)


def clipvip_train(mode: str, cfg, *, frames: int, text_len: int, batch: int) -> float:
  """Per-clip train FLOPs of a CLIP-ViP model (cfg: CLIPViPConfig) in training mode `mode`."""
  clip_cfg, proxies = cfg.clip, cfg.num_proxies
  per_clip = clipvip_step(clip_cfg, frames=frames, text_len=text_len, num_proxies=proxies, batch=batch)
  if mode == "omnisource":  # + the subtitle (a second text) and the middle frame as a 1-frame video
    extra = text_forward(clip_cfg, text_len) + clipvip_vision_forward(clip_cfg, 1, proxies)
    return per_clip.train + 3.0 * (extra + 4.0 * batch * clip_cfg.projection_dim)
  return per_clip.train


def meanp_train(mode: str, cfg, *, frames: int, text_len: int, batch: int) -> float:
  return meanp_step(cfg, frames=frames, text_len=text_len, batch=batch).train


def clip2video_train(mode: str, cfg, *, frames: int, text_len: int, batch: int) -> float:
  return clip2video_step(cfg, frames=frames, text_len=text_len, batch=batch).train


def train_step_flops(mode: str, kind: str, cfg, data_cfg) -> float:
  """Model FLOPs of one training step on the whole global batch (3 x forward, no recomputation): the MFU basis
  of the trainer's log and of the planner. `cfg` is the kind's model config, `data_cfg` the data section; the
  kind's registry entry (kinds.Kind.train_flops) names its per-clip count."""
  from clipvip_jax import kinds
  batch, frames, text_len = int(data_cfg["batch_size"]), int(data_cfg["num_frames"]), int(data_cfg["max_text_len"])
  count = kinds.get(kind).train_flops
  if count is None:
    raise ValueError(f"a {kind} model is not trained; it has no training FLOP count")
  return batch * kinds.resolve(count)(mode, cfg, frames=frames, text_len=text_len, batch=batch)
