"""Released CLIP-ViP checkpoints -> our flat params, and CLIP-ViP initialised from any converted CLIP.

The original saves `torch.save(model.state_dict())` of a wrapper holding an HF CLIPModel as `clipmodel`, so the
keys are HF CLIPModel keys prefixed `clipmodel.`, plus two tensors of the video embeddings:
  clipmodel.vision_model.embeddings.added_cls           [M-1, D]   -> vision/added_cls
  clipmodel.vision_model.embeddings.temporal_embedding  [1, T0, D] -> vision/temporal_embedding
and possibly `position_ids` buffers (dropped). Everything else goes through the HF CLIP key table.
Sizes (M, T0, patch, widths, layers) come from the weights; head counts, activation and eps from the user's HF
CLIPConfig dict when given (else width // 64); logit_scale_init from its vision_additional_config.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from clipvip_jax import kinds
from clipvip_jax.convert import hf_clip
from clipvip_jax.convert.common import ConversionError, Converted
from clipvip_jax.models import clip
from clipvip_jax.models.clipvip import CLIPViP, CLIPViPConfig, additional_config_fields, unwrap_hf_config

KIND = "clipvip"
PREFIX = "clipmodel."
ADDED_CLS = "vision_model.embeddings.added_cls"
TEMPORAL = "vision_model.embeddings.temporal_embedding"
NEW_PARAMS = {ADDED_CLS: "vision/added_cls", TEMPORAL: "vision/temporal_embedding"}


def detect(sd: Mapping[str, np.ndarray], path=None) -> bool:
  """A CLIP-ViP state dict: the video-proxy tensor beside an HF CLIPModel, `clipmodel.`-prefixed or bare."""
  return PREFIX + ADDED_CLS in sd or (ADDED_CLS in sd and "visual_projection.weight" in sd)


def _strip(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drop the `clipmodel.` prefix and buffers; cast floating tensors to float32 (released files may be fp16)."""
  out = {}
  for key, value in sd.items():
    key = key[len(PREFIX):] if key.startswith(PREFIX) else key
    if key.endswith(hf_clip.IGNORED_SUFFIXES):
      continue
    value = np.asarray(value)
    out[key] = value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value
  return out


def _checked_video_tensors(sd: dict[str, np.ndarray], width: int, source: str) -> tuple[np.ndarray, np.ndarray | None]:
  if ADDED_CLS not in sd:
    raise ConversionError(f"{source} lacks {PREFIX}{ADDED_CLS}: not a CLIP-ViP checkpoint")
  added = sd.pop(ADDED_CLS)
  temporal = sd.pop(TEMPORAL, None)  # absent when the original ran with if_use_temporal_embed = 0
  if added.ndim != 2 or added.shape[1] != width:
    raise ConversionError(f"{source}: {PREFIX}{ADDED_CLS} has shape {added.shape}, expected [add_cls_num, {width}]")
  if temporal is not None and (temporal.ndim != 3 or temporal.shape[0] != 1 or temporal.shape[2] != width):
    raise ConversionError(f"{source}: {PREFIX}{TEMPORAL} has shape {temporal.shape}, expected [1, T0, {width}]")
  return added, temporal


def convert(sd: Mapping[str, np.ndarray], config: Mapping[str, Any] | None, source: str = "checkpoint") -> Converted:
  """CLIP-ViP state dict (+ the original's HF CLIPConfig dict, bare or under "clip_config") -> Converted."""
  hf = unwrap_hf_config(config) if config is not None else None
  sd = _strip(sd)
  clip_sd = {k: v for k, v in sd.items() if k not in NEW_PARAMS}
  clip_cfg = hf_clip.infer_checked_config(clip_sd, hf, source)
  added, temporal = _checked_video_tensors(sd, clip_cfg.vision.width, source)
  extra = additional_config_fields(hf.get("vision_additional_config", {})) if hf else {}
  weights = {"num_proxies": 1 + added.shape[0], "use_temporal_embed": temporal is not None}
  if temporal is not None:
    weights["temporal_size"] = temporal.shape[1]
  clashes = {k: (extra[k], v) for k, v in weights.items() if k in extra and extra[k] != v}
  if clashes:
    warnings.warn(f"{source}: vision_additional_config disagrees with the weights on {clashes} "
                  "(config value, weight value); using the weights", stacklevel=2)
  cfg = CLIPViPConfig(clip=clip_cfg, **{**extra, **weights})
  hf_clip.check_hf_state_dict(clip_sd, clip_cfg, source=source)
  flat = hf_clip.to_params(clip_sd, clip_cfg, source=source)
  flat["vision/added_cls"] = added
  if temporal is not None:
    flat["vision/temporal_embedding"] = temporal
  return Converted(KIND, cfg, flat, source=source, source_format="clipvip")


def init_from_clip(clip_params: Mapping[str, np.ndarray], clip_cfg: clip.CLIPConfig, num_proxies: int = 4,
                   temporal_size: int = 12, rng: int | jax.Array = 0, **config_fields) -> CLIPViP:
  """A CLIP-ViP model whose CLIP part is `clip_params` (flat, as any CLIP converter produces) and whose new
  parameters start as the original's: added_cls ~ N(0, 1) (torch.randn), temporal_embedding = 0, and
  logit_scale = cfg.logit_scale_init (4.6: the original overwrites the loaded CLIP temperature).
  `config_fields` set other CLIPViPConfig fields. Only the new tensors are drawn; the model is built abstractly
  and filled, so no CLIP-sized random initialisation is computed just to be overwritten."""
  cfg = CLIPViPConfig(clip=clip_cfg, num_proxies=num_proxies, temporal_size=temporal_size, **config_fields)
  key = jax.random.key(rng) if isinstance(rng, int) else rng
  width = clip_cfg.vision.width
  new = {"vision/added_cls": np.asarray(jax.random.normal(key, (num_proxies - 1, width), jnp.float32)),
         "logit_scale": np.asarray(cfg.logit_scale_init, np.float32)}
  if cfg.use_temporal_embed:
    new["vision/temporal_embedding"] = np.zeros((1, temporal_size, width), np.float32)
  flat = {k: v for k, v in clip_params.items() if k not in NEW_PARAMS.values() and k != "logit_scale"}
  return kinds.build_model(KIND, cfg, {**flat, **new}, source="CLIP parameters given to init_from_clip")
