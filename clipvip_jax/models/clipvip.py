"""CLIP-ViP (Xue et al., ICLR 2023): CLIP with video proxy tokens and proxy-guided attention.

The vision tower is CLIP's ViT (`clip.VisionTower`, same parameters under the same names) plus two tensors:
`added_cls` [M-1, D] (proxies 1..M-1; proxy 0 is CLIP's class_embedding) and `temporal_embedding` [1, T0, D].
A clip of T frames becomes [M proxies | T*L patch tokens]; every layer runs proxy-guided attention
(models/proxy_attention.py); the video embedding is proxy 0's output -> post_layernorm -> projection.
The text tower is CLIP's, unchanged. Behaviour follows ../shared/spec/clipvip.md; where this code adds something
(the optional frame_mask) the docstring says so.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clipvip_jax.models import clip, layers, proxy_attention

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class CLIPViPConfig:
  """A CLIP config plus the original's `vision_additional_config` (type "ViP")."""
  clip: clip.CLIPConfig = clip.CLIPConfig()
  num_proxies: int = 4  # M = 1 + add_cls_num
  temporal_size: int = 12  # T0, the frame count temporal_embedding was trained for
  use_temporal_embed: bool = True  # if_use_temporal_embed
  logit_scale_init: float = 4.6  # the original overwrites CLIP's logit_scale with this at construction
  attention_pattern: str = "block_sparse"  # or "dense": the masked S x S reference (same values, more FLOPs)
  # The original zero-initialises the temporal embedding (it starts from a pretrained CLIP). Trained from scratch,
  # zeros make a clip and its time reverse encode identically, a saddle that plain SGD leaves only slowly; a small
  # random init breaks that symmetry. The demo uses 1.0, the scale of the patch embeddings, with
  # vision.position_init_std 1.0: at 0.02 a from-scratch tower barely sees when or where things are, and CLIP-ViP
  # did not learn motion direction in the demo's budget (docs/performance.md section 11).
  temporal_init_std: float = 0.0

  def __post_init__(self):
    if self.num_proxies < 1:
      raise ValueError(f"num_proxies must be >= 1 (proxy 0 is CLIP's class token), got {self.num_proxies}")
    if self.temporal_size < 1:
      raise ValueError(f"temporal_size must be >= 1, got {self.temporal_size}")
    if self.attention_pattern not in proxy_attention.PATTERNS:
      raise ValueError(f"unknown attention_pattern {self.attention_pattern!r}; known: {proxy_attention.PATTERNS}")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CLIPViPConfig":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown CLIP-ViP config key(s) {sorted(unknown)}; known: {sorted(known)}")
    sub = d.pop("clip", {})
    return cls(clip=sub if isinstance(sub, clip.CLIPConfig) else clip.CLIPConfig.from_dict(sub), **d)

  @classmethod
  def for_clip(cls, clip_cfg: clip.CLIPConfig, **fields) -> "CLIPViPConfig":
    """The config around a CLIP's; `fields` set the CLIP-ViP options (num_proxies, temporal_size, ...)."""
    return cls.from_dict({**fields, "clip": clip_cfg})

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any]) -> "CLIPViPConfig":
    """The original's HF CLIPConfig dict with `vision_additional_config`, bare or under the key "clip_config"."""
    from clipvip_jax.convert import hf_clip  # convert/ depends on models/, not the other way round at import
    hf = unwrap_hf_config(hf)
    if "vision_additional_config" not in hf:
      raise ValueError("CLIP-ViP config lacks 'vision_additional_config' (an HF CLIPConfig dict of the original "
                       "holds temporal_size, add_cls_num, if_use_temporal_embed, logit_scale_init_value there)")
    return cls(clip=hf_clip.config_from_hf(hf), **additional_config_fields(hf["vision_additional_config"]))

  def replace(self, **kw) -> "CLIPViPConfig":
    return dataclasses.replace(self, **kw)


def unwrap_hf_config(hf: Mapping[str, Any]) -> dict[str, Any]:
  """The CLIP-ViP fixtures' _config.json nests the HF dict under "clip_config"; accept both forms."""
  if not isinstance(hf, Mapping):
    raise ValueError(f"CLIP-ViP config must be a dict, got {type(hf).__name__}")
  return dict(hf["clip_config"]) if "clip_config" in hf else dict(hf)


def additional_config_fields(extra: Mapping[str, Any]) -> dict[str, Any]:
  """vision_additional_config -> CLIPViPConfig fields (only the keys present)."""
  if extra.get("type", "ViP") != "ViP":
    raise ValueError(f"vision_additional_config.type is {extra['type']!r}; only 'ViP' is CLIP-ViP")
  out = {}
  if "add_cls_num" in extra:
    out["num_proxies"] = 1 + int(extra["add_cls_num"])
  if "temporal_size" in extra:
    out["temporal_size"] = int(extra["temporal_size"])
  if "if_use_temporal_embed" in extra:
    out["use_temporal_embed"] = bool(extra["if_use_temporal_embed"])
  if "logit_scale_init_value" in extra:
    out["logit_scale_init"] = float(extra["logit_scale_init_value"])
  return out


def linear_resample_indices(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """PyTorch F.interpolate(mode='linear', align_corners=False) as (lower index, upper index, upper weight).

  Source position of output i: (i + 0.5) * src/dst - 0.5, clamped at 0 (float32, as torch computes it);
  the upper neighbour is clamped to the last input. For src=12, dst=1 this is 5.5: 0.5*(e[5]+e[6]).
  """
  scale = np.float32(src) / np.float32(dst)
  pos = np.maximum(scale * (np.arange(dst, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
  lo = np.minimum(np.floor(pos).astype(np.int64), src - 1)
  hi = np.minimum(lo + 1, src - 1)
  return lo, hi, np.clip(pos - lo, 0, 1).astype(np.float32)


def resample_temporal(embed: Array, num_frames: int) -> Array:
  """Temporal embedding [T0, D] -> [T, D] by explicit linear interpolation (jax.image.resize antialiases)."""
  if not isinstance(num_frames, (int, np.integer)):
    return _resample_temporal_traced(embed, num_frames)
  if embed.shape[0] == num_frames:
    return embed
  lo, hi, w = linear_resample_indices(embed.shape[0], num_frames)
  w = jnp.asarray(w, embed.dtype)[:, None]
  return embed[lo] * (1 - w) + embed[hi] * w


def _resample_temporal_traced(embed: Array, num_frames: Any) -> Array:
  """`linear_resample_indices` computed in the graph, for a frame count known only when it runs (a symbolic T:
  the StableHLO export of clipvip_jax.export). The same float32 arithmetic, so the same weights; at T = T0 every
  weight is 0 and the embedding comes out unchanged."""
  src = embed.shape[0]
  scale = jnp.float32(src) / jnp.asarray(num_frames, jnp.float32)
  pos = jnp.maximum(scale * (jnp.arange(num_frames, dtype=jnp.float32) + 0.5) - 0.5, 0.0)
  lo = jnp.minimum(jnp.floor(pos).astype(jnp.int32), src - 1)
  hi = jnp.minimum(lo + 1, src - 1)
  w = jnp.clip(pos - lo.astype(jnp.float32), 0, 1).astype(embed.dtype)[:, None]
  return embed[lo] * (1 - w) + embed[hi] * w


class VideoProxyVisionTower(clip.VisionTower):
  """CLIP's ViT fed [M proxies | T frames x L patches], with proxy-guided attention in every layer."""

  def __init__(self, cfg: CLIPViPConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg.clip, rngs=rngs)
    width = cfg.clip.vision.width
    self.video_cfg = cfg
    # Proxies 1..M-1: a new parameter drawn N(0, 1) as the original does (not a copy of the class token).
    self.added_cls = layers.param(layers.normal_init(rngs, (cfg.num_proxies - 1, width), 1.0), (None, "embed"))
    self.temporal_embedding = (
        layers.param(layers.normal_init(rngs, (1, cfg.temporal_size, width), cfg.temporal_init_std)
                     if cfg.temporal_init_std else jnp.zeros((1, cfg.temporal_size, width), jnp.float32),
                     (None, None, "embed"))
        if cfg.use_temporal_embed else None)

  def embed_video(self, video: Array) -> Array:
    """video [B, T, H, W, C] -> tokens [B, M + T*L, D] (before pre_layrnorm)."""
    if video.ndim != 5:
      raise ValueError(f"video must be [batch, frames, height, width, channels], got shape {video.shape}")
    b, t = video.shape[:2]
    x = self.patch_embedding(video.reshape(b * t, *video.shape[2:]))
    x = x.reshape(b, t, x.shape[1], x.shape[2])
    pos = self.position_embedding[...].astype(x.dtype)
    if pos.shape[0] != 1 + x.shape[2]:
      raise ValueError(f"frames of {video.shape[2]}x{video.shape[3]} give {x.shape[2]} patches; the model has "
                       f"{pos.shape[0] - 1} patch positions")
    if self.temporal_embedding is not None:  # patch (t, l) += temporal[t] first, then position[1 + l]
      x = x + resample_temporal(self.temporal_embedding[0].astype(x.dtype), t)[None, :, None, :]
    x = x + pos[1:]
    # Every proxy gets the class token's spatial position and no temporal embedding.
    proxies = jnp.concatenate([self.class_embedding[...][None], self.added_cls[...]], axis=0).astype(x.dtype) + pos[0]
    proxies = jnp.broadcast_to(proxies, (b, *proxies.shape))
    return jnp.concatenate([proxies, x.reshape(b, -1, x.shape[-1])], axis=1)

  def __call__(self, video: Array, frame_mask: Array | None = None) -> dict[str, Array]:
    """video [B, T, H, W, 3] (CLIP-normalised), frame_mask [B, T] or None ->
    {"last_hidden" [B, M+T*L, D] (encoder output, before post_layernorm), "pooled", "embeds" (unnormalised)}."""
    cfg = self.video_cfg
    if frame_mask is not None and tuple(frame_mask.shape) != tuple(video.shape[:2]):
      raise ValueError(f"frame_mask shape {tuple(frame_mask.shape)} does not match video [B, T] {video.shape[:2]}")
    x = self.pre_layrnorm(self.embed_video(video))  # over the whole sequence, proxies included
    attention_fn = proxy_attention.proxy_attention_fn(
        cfg.attention_pattern, num_proxies=cfg.num_proxies, num_frames=video.shape[1], frame_mask=frame_mask,
        implementation=self.attention)
    x = self.encoder(x, attention_fn)
    pooled = self.post_layernorm(x[:, 0])  # proxy 0 only; proxies 1..M-1 are dropped at the output
    return {"last_hidden": x, "pooled": pooled, "embeds": self.projection(pooled)}


class CLIPViP(nnx.Module):
  """Video-text CLIP-ViP: video-proxy vision tower, CLIP text tower, learnable temperature."""

  def __init__(self, cfg: CLIPViPConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.vision = VideoProxyVisionTower(cfg, rngs=rngs)
    self.text = clip.TextTower(cfg.clip, rngs=rngs)
    self.logit_scale = layers.param(jnp.asarray(cfg.logit_scale_init, jnp.float32), ())

  def vision_features(self, video: Array, frame_mask: Array | None = None) -> dict[str, Array]:
    """Named intermediates of the vision tower: {"last_hidden", "pooled", "embeds"}."""
    return self.vision(video, frame_mask)

  def encode_video(self, video: Array, frame_mask: Array | None = None) -> Array:
    """video [B, T, H, W, 3], any T; frame_mask [B, T] (1 = real frame) or None -> L2-normalised [B, proj]."""
    return clip.l2_normalize(self.vision(video, frame_mask)["embeds"])

  def encode_image(self, images: Array) -> Array:
    """Images go through the video encoder as 1-frame videos, as in the original's pretraining."""
    return self.encode_video(images[:, None])

  def encode_text(self, ids: Array, mask: Array | None = None) -> Array:
    return clip.l2_normalize(self.text(ids, mask)["embeds"])

  def similarity(self, text_emb: Array, visual_emb: Array) -> Array:
    """[Nt, Nv] raw cosine similarity (evaluation does not scale by the temperature)."""
    return jnp.dot(text_emb.astype(jnp.float32), visual_emb.astype(jnp.float32).T)

  def __call__(self, video: Array, ids: Array, mask: Array | None = None,
               frame_mask: Array | None = None) -> dict[str, Array]:
    return {"video": self.encode_video(video, frame_mask), "text": self.encode_text(ids, mask),
            "logit_scale": self.logit_scale[...]}
