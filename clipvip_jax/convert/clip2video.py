"""CLIP2Video / CLIP4Clip checkpoints (`pytorch_model.bin.N`) -> our flat params, and CLIP2Video from a CLIP.

The original saves a flat state dict: the OpenAI CLIP under `clip.` (often float16; cast to float32 on load)
and its new modules beside it:
  frame_position_embeddings.weight [P, D]  -> frame_position_embeddings
  type_position_embeddings.weight [2, D]   -> difference/type_embedding
  frame2t_attention.resblocks.N.*          -> difference/attention/blocks/N/*
  frame2t_projection [D, D]                -> difference/projection/kernel   (temporal_proj "sigmoid_mlp")
  trans_layernorm.{weight, bias}           -> difference/norm/{scale, bias}
  transformerClip.resblocks.N.*            -> temporal_transformer/blocks/N/*
  actionClip.resblocks.N.*                 -> action_transformer/blocks/N/*
  weight_center, emb_center [K, D]         -> alignment/weight_center, alignment/emb_center
Resblocks map as in openai_clip (in_proj split into q/k/v, heads = CLIP text width // 64 as the original).

What the weights fix comes from them: all CLIP sizes, the temporal widths and layer counts (resblock indices of
transformerClip / frame2t_attention / actionClip), K (weight_center rows), the frame positions. The user's
config, a dict or JSON file of the original's task options (the fixtures' `_config.json` format), gives the
rest: center_weight (default 0.5), num_frames / max_frames, and the head options sim_type, temporal_type,
temporal_proj, center_type, center_proj (inferred from which modules the weights hold when absent). Sizes the
config states (vocab_size, centerK, cross_num_hidden_layers, widths) must agree with the weights.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import numpy as np
from flax import nnx

from clipvip_jax import params as params_lib
from clipvip_jax.convert import openai_clip
from clipvip_jax.convert.common import ConversionError, Converted, read_config
from clipvip_jax.models.clip import CLIPConfig
from clipvip_jax.models.clip2video import CLIP2Video, CLIP2VideoConfig
from clipvip_jax.models.temporal import TemporalAlignmentBlock

KIND = "clip2video"
PREFIX = "clip."

# Original module -> our module prefix, for the resblock stacks.
TRANSFORMERS = {"transformerClip.": "temporal_transformer/", "frame2t_attention.": "difference/attention/",
                "actionClip.": "action_transformer/"}
# Every top-level source key that belongs to a CLIP2Video / CLIP4Clip head (used or not by a given config).
HEAD_KEYS = ("frame_position_embeddings.weight", "type_position_embeddings.weight", "frame2t_projection",
             "trans_layernorm.weight", "trans_layernorm.bias", "weight_center", "emb_center")


def detect(sd: Mapping[str, Any], path=None) -> bool:
  """An OpenAI CLIP under `clip.` (CLIP4Clip / CLIP2Video), with or without temporal heads."""
  return f"{PREFIX}text_projection" in sd and (f"{PREFIX}visual.proj" in sd or f"{PREFIX}visual.conv1.weight" in sd)


def _is_head_key(key: str) -> bool:
  return key in HEAD_KEYS or any(key.startswith(p + "resblocks.") for p in TRANSFORMERS)


# ---- the key mapping ----

def head_items(cfg: CLIP2VideoConfig):
  """Mapping items (source keys, our keys, to_ours, to_source) of the temporal modules `cfg` uses."""
  same, width, heads = openai_clip._same, cfg.width, cfg.temporal_heads
  if cfg.uses_frame_positions:
    yield ("frame_position_embeddings.weight",), ("frame_position_embeddings",), same, same
  if cfg.sim_type == "seqTransf":
    yield from openai_clip.resblocks_items("transformerClip.", "temporal_transformer/", cfg.temporal_layers, width,
                                           heads)
  if cfg.uses_tdb:
    yield ("type_position_embeddings.weight",), ("difference/type_embedding",), same, same
    if cfg.temporal_proj == "sigmoid_selfA":
      yield from openai_clip.resblocks_items("frame2t_attention.", "difference/attention/", cfg.difference_layers,
                                             width, heads)
    if cfg.temporal_proj == "sigmoid_mlp":
      yield ("frame2t_projection",), ("difference/projection/kernel",), same, same
    if cfg.temporal_proj != "default":
      yield ("trans_layernorm.weight",), ("difference/norm/scale",), same, same
      yield ("trans_layernorm.bias",), ("difference/norm/bias",), same, same
  if cfg.uses_action_transformer:
    yield from openai_clip.resblocks_items("actionClip.", "action_transformer/", cfg.action_layers, width, heads)
  if cfg.uses_tab:
    yield ("weight_center",), ("alignment/weight_center",), same, same
    yield ("emb_center",), ("alignment/emb_center",), same, same


def key_items(cfg: CLIP2VideoConfig):
  yield from openai_clip.key_items(cfg.clip, PREFIX, "clip/")
  yield from head_items(cfg)


def from_params(flat: Mapping[str, Any], cfg: CLIP2VideoConfig) -> dict[str, np.ndarray]:
  """Our flat params -> the original's state dict (float32): the exact inverse of `convert`'s mapping."""
  return openai_clip.invert_items(key_items(cfg), flat)


# ---- options: the user's task options, else what the weights hold ----

def _option(options: Mapping[str, Any], name: str, inferred: str) -> str:
  value = options.get(name)
  return inferred if value is None else str(value)


def infer_config(sd: Mapping[str, Any], options: Mapping[str, Any] | None = None, *,
                 source: str = "checkpoint") -> CLIP2VideoConfig:
  """CLIP2VideoConfig of a checkpoint: sizes from the weights, options from `options` (the original's task
  options) or, when it lacks them, from which modules the weights hold."""
  options = dict(options or {})
  clip_cfg = openai_clip.infer_config(sd, PREFIX, source=source)
  openai_clip.check_config_agrees(clip_cfg, options, source)
  has = lambda key: key in sd  # noqa: E731
  layers = {p: openai_clip.resblock_count(sd, p) for p in TRANSFORMERS}
  tdb = has("type_position_embeddings.weight")
  sim_type = _option(options, "sim_type", "seqTransf" if layers["transformerClip."] else "meanP")
  temporal_type = _option(options, "temporal_type", "TDB" if tdb else "default")
  proj = ("sigmoid_selfA" if layers["frame2t_attention."] else "sigmoid_mlp" if has("frame2t_projection")
          else "default")
  temporal_proj = _option(options, "temporal_proj", proj)
  center_type = _option(options, "center_type", "TAB" if has("weight_center") else "default")
  center_proj = _option(options, "center_proj",
                        ("TAB_TDB" if tdb else "TAB") if layers["actionClip."] else "default")
  fields: dict[str, Any] = dict(sim_type=sim_type, temporal_type=temporal_type, temporal_proj=temporal_proj,
                                center_type=center_type, center_proj=center_proj)
  weight_sizes = {"temporal_layers": ("transformerClip.", "cross_num_hidden_layers"),
                  "difference_layers": ("frame2t_attention.", None), "action_layers": ("actionClip.", None)}
  for field, (prefix, option) in weight_sizes.items():
    if layers[prefix]:
      fields[field] = layers[prefix]
      if option and options.get(option) is not None and int(options[option]) != layers[prefix]:
        raise ConversionError(f"config given for {source}: {option} = {options[option]}, but the weights hold "
                              f"{layers[prefix]} {prefix}resblocks")
  if has("weight_center"):
    fields["center_k"] = int(np.shape(sd["weight_center"])[0])
    if options.get("centerK") is not None and int(options["centerK"]) != fields["center_k"]:
      raise ConversionError(f"config given for {source}: centerK = {options['centerK']}, but weight_center has "
                            f"{fields['center_k']} rows")
  if has("frame_position_embeddings.weight"):
    fields["frame_positions"] = int(np.shape(sd["frame_position_embeddings.weight"])[0])
  block = next((f"{p}resblocks.0.mlp.c_fc.weight" for p in TRANSFORMERS if layers[p]), None)
  if block is not None:
    fields["temporal_mlp_dim"] = int(np.shape(sd[block])[0])
  if options.get("center_weight") is not None:
    fields["center_weight"] = float(options["center_weight"])
  frames = options.get("num_frames", options.get("max_frames"))
  if frames is not None:
    fields["num_frames"] = int(frames)
  try:
    return CLIP2VideoConfig.for_clip(clip_cfg, **fields)
  except ValueError as e:
    raise ConversionError(f"{source}: {e}") from None


def convert(sd: Mapping[str, Any], config: Mapping[str, Any] | str | None = None,
            source: str = "checkpoint") -> Converted:
  """CLIP2Video / CLIP4Clip state dict (+ the original's task options) -> Converted.

  Head keys the configured options do not use (the original builds `trans_layernorm` even when nothing reads
  it, for instance) are dropped with a warning naming them; any other unknown key is an error."""
  from clipvip_jax.kinds import param_shapes
  cfg = infer_config(sd, read_config(config), source=source)
  items = list(key_items(cfg))
  used = {k for src_keys, *_ in items for k in src_keys}
  ignored = {PREFIX + k for k in openai_clip.IGNORED_KEYS}
  unused = sorted(k for k in sd if k not in used and _is_head_key(k))
  if unused:
    warnings.warn(f"{source}: dropping head weights the configured options do not use: {', '.join(unused)}",
                  stacklevel=2)
  given = {k: openai_clip._normalised_scalar(k, v, PREFIX) for k, v in sd.items()
           if k not in ignored and k not in unused}
  expected = openai_clip.expected_shapes(lambda: key_items(cfg), param_shapes(KIND, cfg))
  params_lib.check_params(expected, given, source=source)
  return Converted(KIND, cfg, openai_clip.apply_items(items, given), source=source, source_format="clip2video")


# ---- training from CLIP ----

def init_params_from_clip(clip_params: Mapping[str, Any], cfg: CLIP2VideoConfig, rng: int | Any = 0
                          ) -> dict[str, np.ndarray]:
  """Flat CLIP2Video params whose CLIP part is `clip_params` (flat, unprefixed, as any CLIP converter gives) and
  whose heads start as the original initialises them from CLIP:
    frame_position_embeddings <- text position_embedding[:frame_positions]; type embedding <- its first 2 rows;
    temporal_transformer block i <- text block i; difference attention and action transformer block i <- text
    block i (block 0 for the original's single layer); difference projection <- vision projection[:D];
    centres N(0, 64^-0.5) and the difference LayerNorm (1, 0) freshly initialised from `rng`."""
  text_positions = np.asarray(clip_params["text/position_embedding"])
  if cfg.frame_positions > text_positions.shape[0]:
    raise ValueError(f"frame_positions = {cfg.frame_positions} exceeds the CLIP's {text_positions.shape[0]} text "
                     "positions it is copied from")
  if cfg.clip.text.width != cfg.width:
    raise ValueError(f"the temporal modules copy the CLIP text layers, so the text width {cfg.clip.text.width} must "
                     f"equal the embedding width {cfg.width}")
  for field in ("temporal_layers", "difference_layers", "action_layers"):
    if getattr(cfg, field) > cfg.clip.text.layers:
      raise ValueError(f"{field} = {getattr(cfg, field)} exceeds the CLIP's {cfg.clip.text.layers} text layers")
  shapes = params_lib.shapes(nnx.eval_shape(lambda: CLIP2Video(cfg, rngs=nnx.Rngs(0))))
  flat: dict[str, np.ndarray] = {f"clip/{k}": np.asarray(v, np.float32) for k, v in clip_params.items()}
  if cfg.uses_tab:
    centres = TemporalAlignmentBlock(cfg.width, cfg.center_k, rngs=nnx.Rngs(rng))
    flat["alignment/weight_center"] = np.asarray(centres.weight_center[...])
    flat["alignment/emb_center"] = np.asarray(centres.emb_center[...])
  for key in shapes:
    if key.startswith(("clip/", "alignment/")):
      continue
    if key == "frame_position_embeddings":
      flat[key] = text_positions[:cfg.frame_positions]
    elif key == "difference/type_embedding":
      flat[key] = text_positions[:2]
    elif key == "difference/projection/kernel":
      flat[key] = np.asarray(clip_params["vision/projection/kernel"])[:cfg.width]
    elif key.startswith("difference/norm/"):  # trans_layernorm keeps torch's LayerNorm init
      flat[key] = (np.ones if key.endswith("scale") else np.zeros)(shapes[key], np.float32)
    else:  # a temporal transformer block: the text block of the same index
      flat[key] = np.asarray(clip_params["text/encoder/blocks/" + key.split("/blocks/", 1)[1]])
  return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def init_from_clip(clip_params: Mapping[str, Any], cfg: CLIP2VideoConfig | CLIPConfig, rng: int | Any = 0,
                   **options) -> CLIP2Video:
  """A CLIP2Video model initialised from a CLIP as the original does (see init_params_from_clip). `cfg` is a
  CLIP2VideoConfig, or the CLIP's CLIPConfig with `options` (center_k, temporal_layers, ...) for `for_clip`."""
  if isinstance(cfg, CLIPConfig):
    cfg = CLIP2VideoConfig.for_clip(cfg, **options)
  elif options:
    cfg = cfg.replace(**options)
  from clipvip_jax.kinds import build_model
  return build_model(KIND, cfg, init_params_from_clip(clip_params, cfg, rng),
                     source="CLIP parameters for init_from_clip")
