"""CLIP2Video (and the CLIP4Clip heads it builds on): image CLIP per frame + temporal heads over frame embeddings.

Scores (spec clip2video.md), for a text t and a video v, with s = logit_scale and w = center_weight:
  global  S_g = e^s * L2(sentence) . head(F)      head: TDB (seqTransf + TDB), seqTransf, or meanP
  TAB     S_a = e^s * TAB(text tokens) . TAB(video tokens)
  S = w * S_g + (1 - w) * S_a                     (S = S_g without TAB)
Training loss: w * L_global + (1 - w) * L_TAB, each the symmetric cross entropy of its [Nt, Nv] logits.

Dual-encoder form: S is a sum of two dot products, so it is one dot product of concatenations. `encode_text`
and `encode_video` return [sqrt(w e^s) * g, sqrt((1 - w) e^s) * a] (g, a the L2-normalised global and TAB
embeddings; [sqrt(e^s) * g] without TAB): the scaling is split evenly between the two sides, so both vectors have
norm sqrt(e^s), and `similarity(text, video)` = text @ video^T is exactly the original's inference logits.
Videos are encoded once and indexed like any other embedding.

Frame embeddings are ln_post(CLS) @ proj per frame (not normalised). Text runs with the causal mask only, as
the original (padding follows the end-of-text token, so causality keeps it out of every token that matters);
the sentence embedding is the token feature at argmax(ids), and TAB reads every token feature with the text
mask (start token zeroed).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from clipvip_jax.models import layers
from clipvip_jax.models.clip import CLIP, CLIPConfig, l2_normalize
from clipvip_jax.models.temporal import (DIFFERENCE_ENCODINGS, TEMPORAL_EPS, TemporalAlignmentBlock,
                                         TemporalDifferenceBlock, TemporalTransformer, mean_pool_frames)

Array = jax.Array

SIM_TYPES = ("meanP", "seqTransf")
TEMPORAL_TYPES = ("TDB", "default")
CENTER_TYPES = ("TAB", "default")
CENTER_PROJS = ("TAB_TDB", "TAB", "default")


@dataclasses.dataclass(frozen=True)
class CLIP2VideoConfig:
  """A CLIP2Video model's shapes and options; the option names and values are the original's task options.

  The temporal width is the CLIP embedding width (`clip.projection_dim`): the heads add their outputs to the
  frame embeddings.
  """
  clip: CLIPConfig = CLIPConfig()
  sim_type: str = "seqTransf"  # global head: "meanP" (parameter-free) | "seqTransf" (temporal transformer)
  temporal_type: str = "TDB"  # "TDB": difference tokens interleaved into seqTransf | "default": plain seqTransf
  temporal_proj: str = "sigmoid_selfA"  # TDB difference encoding: "sigmoid_selfA" | "sigmoid_mlp" | "default"
  center_type: str = "TAB"  # "TAB": add the temporal alignment score | "default": global score only
  center_proj: str = "TAB_TDB"  # extra TAB video tokens: "TAB_TDB" | "TAB" (no differences) | "default" (none)
  center_k: int = 5  # K, the number of TAB centres (centerK)
  center_weight: float = 0.5  # w in w * global + (1 - w) * TAB, for scores and loss
  temporal_layers: int = 4  # transformerClip layers (cross_num_hidden_layers)
  difference_layers: int = 1  # frame2t_attention layers (1 in the original)
  action_layers: int = 1  # actionClip layers (1 in the original)
  temporal_heads: int = 8  # CLIP text width // 64 in the original
  temporal_mlp_dim: int = 2048  # 4 x width in the original
  frame_positions: int = 77  # rows of frame_position_embeddings (the CLIP context length): the most frames T
  num_frames: int = 12  # frames per video the model was trained with (max_frames); not a shape constraint
  temporal_eps: float = TEMPORAL_EPS  # LayerNorm eps inside the temporal transformers
  difference_norm_eps: float = 1e-5  # trans_layernorm (torch.nn.LayerNorm default)

  def __post_init__(self):
    for name, allowed in (("sim_type", SIM_TYPES), ("temporal_type", TEMPORAL_TYPES),
                          ("temporal_proj", DIFFERENCE_ENCODINGS), ("center_type", CENTER_TYPES),
                          ("center_proj", CENTER_PROJS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"CLIP2Video config: {name} = {getattr(self, name)!r}; known: {allowed}")
    if not 0.0 <= self.center_weight <= 1.0:
      raise ValueError(f"CLIP2Video config: center_weight = {self.center_weight} is outside [0, 1]")
    if self.width % self.temporal_heads:
      raise ValueError(f"CLIP2Video config: width {self.width} is not divisible by {self.temporal_heads} heads")
    if self.uses_tab and self.center_k < 1:
      raise ValueError(f"CLIP2Video config: center_k = {self.center_k}; TAB needs at least one centre")

  @property
  def width(self) -> int:
    return self.clip.projection_dim

  @property
  def uses_tab(self) -> bool:
    return self.center_type == "TAB"

  @property
  def uses_tdb(self) -> bool:
    """A TDB is built when the global head or the TAB video tokens use it."""
    global_tdb = self.sim_type == "seqTransf" and self.temporal_type == "TDB"
    return global_tdb or (self.uses_tab and self.center_proj == "TAB_TDB")

  @property
  def uses_action_transformer(self) -> bool:
    return self.uses_tab and self.center_proj in ("TAB", "TAB_TDB")

  @property
  def uses_frame_positions(self) -> bool:
    return self.sim_type == "seqTransf" or self.uses_action_transformer

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CLIP2VideoConfig":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown CLIP2Video config key(s) {sorted(unknown)}; known: {sorted(known)}")
    clip_cfg = d.pop("clip", {})
    clip_cfg = clip_cfg if isinstance(clip_cfg, CLIPConfig) else CLIPConfig.from_dict(clip_cfg)
    return cls(clip=clip_cfg, **d)

  def replace(self, **kw) -> "CLIP2VideoConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def for_clip(cls, clip_cfg: CLIPConfig, **fields) -> "CLIP2VideoConfig":
    """The config the original builds around a CLIP: heads = text width // 64, the text layers' MLP width (4 x
    width in every OpenAI CLIP; the temporal blocks start as copies of text blocks), one frame position per CLIP
    text position. `fields` set the task options (center_k, temporal_layers, ...)."""
    width = clip_cfg.projection_dim
    mlp_dim = clip_cfg.text.mlp_dim if clip_cfg.text.width == width else 4 * width
    defaults = dict(temporal_heads=max(clip_cfg.text.width // 64, 1), temporal_mlp_dim=mlp_dim,
                    frame_positions=clip_cfg.text.max_len)
    return cls(clip=clip_cfg, **{**defaults, **fields})


class CLIP2Video(nnx.Module):
  """CLIP towers + frame positions + TDB + seqTransf + TAB. Parameters (original name in brackets):

    clip/...                                   [clip.*]
    frame_position_embeddings [P, D]           [frame_position_embeddings.weight]
    difference/type_embedding [2, D]           [type_position_embeddings.weight]
    difference/attention/blocks/0/...          [frame2t_attention.resblocks.0.*]
    difference/projection/kernel [D, D]        [frame2t_projection]  (temporal_proj "sigmoid_mlp")
    difference/norm/{scale, bias}              [trans_layernorm.*]
    temporal_transformer/blocks/N/...          [transformerClip.resblocks.N.*]
    action_transformer/blocks/0/...            [actionClip.resblocks.0.*]
    alignment/{weight_center, emb_center} [K, D]  [weight_center, emb_center]
  Each exists only when the config's options use it.
  """

  def __init__(self, cfg: CLIP2VideoConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.clip = CLIP(cfg.clip, rngs=rngs)
    width, dtype, remat, scan = cfg.width, jnp.dtype(cfg.clip.dtype), cfg.clip.remat, cfg.clip.scan_layers

    def transformer(num_layers: int) -> TemporalTransformer:
      return TemporalTransformer(width, num_layers, cfg.temporal_heads, cfg.temporal_mlp_dim, eps=cfg.temporal_eps,
                                 remat=remat, scan_layers=scan, rngs=rngs, dtype=dtype)

    self.frame_position_embeddings = (
        layers.param(layers.normal_init(rngs, (cfg.frame_positions, width), 0.02), (None, "embed"))
        if cfg.uses_frame_positions else None)
    self.difference = (TemporalDifferenceBlock(width, cfg.temporal_heads, cfg.temporal_mlp_dim,
                                               encoding=cfg.temporal_proj, attention_layers=cfg.difference_layers,
                                               eps=cfg.temporal_eps,
                                               norm_eps=cfg.difference_norm_eps, remat=remat, scan_layers=scan,
                                               rngs=rngs, dtype=dtype)
                       if cfg.uses_tdb else None)
    self.temporal_transformer = transformer(cfg.temporal_layers) if cfg.sim_type == "seqTransf" else None
    self.action_transformer = transformer(cfg.action_layers) if cfg.uses_action_transformer else None
    self.alignment = TemporalAlignmentBlock(width, cfg.center_k, rngs=rngs) if cfg.uses_tab else None

  # ---- frames ----

  def frame_embeddings(self, video: Array) -> Array:
    """video [B, T, H, W, 3] (CLIP-normalised) -> per-frame ln_post(CLS) @ proj [B, T, D], not normalised."""
    b, t = video.shape[:2]
    return self.clip.vision(video.reshape((b * t,) + video.shape[2:]))["embeds"].reshape(b, t, -1)

  def _positions(self, t: int) -> Array:
    rows = self.cfg.frame_positions
    if t > rows:
      raise ValueError(f"{t} frames exceed the model's {rows} frame positions (frame_position_embeddings)")
    return self.frame_position_embeddings[:t]

  def global_video(self, frames: Array, mask: Array) -> Array:
    """The global head on frame embeddings [B, T, D] -> [B, D], L2-normalised."""
    cfg = self.cfg
    if cfg.sim_type == "meanP":
      return mean_pool_frames(frames, mask)
    t = frames.shape[1]
    positions = self._positions(t)
    if cfg.temporal_type == "TDB":
      tokens, token_mask = self.difference(frames, mask, positions)
      out = self.temporal_transformer(tokens, token_mask)[:, ::2]  # the frame tokens sit at even positions
    else:
      out = self.temporal_transformer(frames + positions.astype(frames.dtype), mask)
    return mean_pool_frames(out + frames, mask)

  def tab_video_tokens(self, frames: Array, mask: Array) -> tuple[Array, Array]:
    """TAB video tokens: all T frames, plus every second frame (0, 2, ...) encoded by the action transformer
    (after the TDB for "TAB_TDB") with those frames added back: T + ceil(T/2) tokens and their mask."""
    proj = self.cfg.center_proj
    if proj == "default":
      return frames, mask
    sub, sub_mask = frames[:, ::2], mask[:, ::2]
    positions = self._positions(sub.shape[1])
    if proj == "TAB_TDB":
      tokens, token_mask = self.difference(sub, sub_mask, positions)
      encoded = self.action_transformer(tokens, token_mask)[:, ::2]
    else:
      encoded = self.action_transformer(sub + positions.astype(sub.dtype), sub_mask)
    return (jnp.concatenate([frames, (encoded + sub).astype(frames.dtype)], axis=1),
            jnp.concatenate([mask, sub_mask], axis=1))

  def video_features(self, video: Array, frame_mask: Array | None = None) -> dict[str, Array]:
    """{"frame_embeds" [B, T, D], "video_global" [B, D] (L2), "tab_video" [B, D] (L2, with TAB)}."""
    frames = self.frame_embeddings(video)
    mask = (jnp.ones(frames.shape[:2], jnp.int32) if frame_mask is None else frame_mask).astype(jnp.float32)
    out = {"frame_embeds": frames.astype(jnp.float32), "video_global": self.global_video(frames, mask)}
    if self.cfg.uses_tab:
      out["tab_video"] = self.alignment(*self.tab_video_tokens(frames, mask))
    return out

  # ---- text ----

  def text_features(self, ids: Array, mask: Array | None = None) -> dict[str, Array]:
    """{"text_embeds" [B, D] (sentence, not normalised), "text_token_embeds" [B, L, D], "text_global" (L2),
    "tab_text" (L2, with TAB)}. `mask` [B, L] only selects TAB's tokens (the text runs with the causal mask)."""
    text = self.clip.text(ids)  # causal mask only, as the original
    tokens = self.clip.text.projection(text["last_hidden"]).astype(jnp.float32)
    sentence = text["embeds"].astype(jnp.float32)
    out = {"text_embeds": sentence, "text_token_embeds": tokens, "text_global": l2_normalize(sentence)}
    if self.cfg.uses_tab:
      token_mask = jnp.ones(ids.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
      out["tab_text"] = self.alignment(tokens, token_mask.at[:, 0].set(0.0))  # the start token is left out
    return out

  # ---- scores ----

  def logits(self, text: dict[str, Array], video: dict[str, Array]) -> dict[str, Array]:
    """[Nt, Nv] logits from text_features / video_features: "logits_global" (TDB / seqTransf / meanP, times
    e^s), "logits_tab" (with TAB) and "logits", the inference score w * global + (1 - w) * TAB."""
    scale = jnp.exp(self.clip.logit_scale[...].astype(jnp.float32))
    hi = jax.lax.Precision.HIGHEST
    out = {"logits_global": scale * jnp.matmul(text["text_global"], video["video_global"].T, precision=hi)}
    if self.cfg.uses_tab:
      out["logits_tab"] = scale * jnp.matmul(text["tab_text"], video["tab_video"].T, precision=hi)
      w = self.cfg.center_weight
      out["logits"] = w * out["logits_global"] + (1.0 - w) * out["logits_tab"]
    else:
      out["logits"] = out["logits_global"]
    return out

  def _dual_encoder_vector(self, global_embed: Array, tab_embed: Array | None) -> Array:
    scale = jnp.exp(self.clip.logit_scale[...].astype(jnp.float32))
    if tab_embed is None:
      return jnp.sqrt(scale) * global_embed
    w = self.cfg.center_weight
    return jnp.concatenate([jnp.sqrt(w * scale) * global_embed, jnp.sqrt((1.0 - w) * scale) * tab_embed], axis=-1)

  def encode_video(self, video: Array, frame_mask: Array | None = None) -> Array:
    """video [B, T, H, W, 3], frame_mask [B, T] or None -> [B, 2D] ([B, D] without TAB); see the module doc."""
    f = self.video_features(video, frame_mask)
    return self._dual_encoder_vector(f["video_global"], f.get("tab_video"))

  def encode_text(self, ids: Array, mask: Array | None = None) -> Array:
    """ids, mask [B, L] -> [B, 2D] ([B, D] without TAB); `similarity` with encode_video's output is the score."""
    f = self.text_features(ids, mask)
    return self._dual_encoder_vector(f["text_global"], f.get("tab_text"))

  def similarity(self, text_emb: Array, video_emb: Array) -> Array:
    """[Nt, Nv] inference logits (the original's get_inference_logits) from encode_text / encode_video."""
    return jnp.matmul(text_emb.astype(jnp.float32), video_emb.astype(jnp.float32).T,
                      precision=jax.lax.Precision.HIGHEST)

  def __call__(self, video: Array, frame_mask: Array | None, ids: Array, mask: Array | None) -> dict[str, Array]:
    """Every named intermediate and the logits of all texts against all videos (text rows)."""
    text, vid = self.text_features(ids, mask), self.video_features(video, frame_mask)
    return {**text, **vid, **self.logits(text, vid)}

  def loss(self, outputs: dict[str, Array], valid: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """The training loss from `__call__`'s outputs (text i paired with video i): w * L_global + (1 - w) * L_TAB,
    each (CE(S) + CE(S^T)) / 2; without TAB, L_global. Returns (loss, {"loss_global", "loss_tab"}).
    valid: optional [B] mask of real samples (losses.mask_columns)."""
    from clipvip_jax import losses
    parts = {"loss_global": losses.symmetric_ce(outputs["logits_global"], valid)}
    if not self.cfg.uses_tab:
      return parts["loss_global"], parts
    parts["loss_tab"] = losses.symmetric_ce(outputs["logits_tab"], valid)
    total = losses.clip2video_loss(outputs["logits_global"], outputs["logits_tab"], self.cfg.center_weight, valid)
    return total, parts
