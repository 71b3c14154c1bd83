"""The one registry of model kinds: what each kind is, and everything that differs between kinds.

  kind        classes (model / config)       trains  videos   a plain CLIP starts          test-time recipe
  clip        CLIP / CLIPConfig              no      as meanp -                            CLIP4Clip, T = 12
  meanp       MeanPoolCLIP / CLIPConfig      yes     yes      every parameter (the same)   CLIP4Clip, T = 12
  clipvip     CLIPViP / CLIPViPConfig        yes     yes      the CLIP part, not its       CLIP-ViP, T = temporal_size
                                                              logit_scale
  clip2video  CLIP2Video / CLIP2VideoConfig  yes     yes      the CLIP part + copies of    CLIP4Clip, T = num_frames
                                                              text layers

Checkpoints, converters, the trainer, retrieval, export and the demo name a model by its kind and ask this module
what that kind means; no other module compares a kind with a name (tests/test_loading.py checks). Classes and the
kind-specific functions are named as "module:attribute" and imported only when used, so importing this module costs
no JAX import (export/spec.py, read by the runtime without JAX, derives its tables from it).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Mapping

CLIP4CLIP_FPS = 5.0  # CLIP2Video / CLIP4Clip extract frames at 5 fps before sub-sampling
CLIP4CLIP_FRAMES = 12
COSINE = "dot product = cosine (both embeddings L2-normalised)"


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How the kind's original turns a video into model input at test time (retrieval.model.VideoRecipe's fields)."""
  frames: str | int  # T: the name of a config field, or a fixed count
  sampling: str  # "clipvip" | "clip2video" (data_pipelines.sampling)
  resize_mode: str  # "squash" | "crop" (data_pipelines.transforms)
  target_fps: float | None = None  # clip2video sampling: thin stored frames to this rate first
  max_frames: str | None = None  # the config field bounding T (a frame position table); None: any T


@dataclasses.dataclass(frozen=True)
class Kind:
  """One model kind. References ("module:attribute") are resolved on use."""
  name: str
  title: str  # how tables and the demo name it
  model: str  # the nnx.Module class
  config: str  # its config dataclass (from_dict / to_dict; for_clip when it wraps a CLIP config)
  recipe: Recipe
  video: bool = True  # the model has encode_video
  video_kind: str | None = None  # the kind whose model encodes videos with these parameters (None: itself)
  train_flops: str | None = None  # f(mode, cfg, *, frames, text_len, batch) -> per-clip FLOPs; None: not trainable
  base: str | None = None  # the kind whose checkpoint initialises part of this one (a plain CLIP)
  base_skip: tuple[str, ...] = ()  # parameter regexes not taken from a `base` checkpoint unless config.init.skip says
  from_base: str | None = None  # f(flat base params, cfg, rng) -> flat params: the parts derived from the base's
  dynamic_frames: tuple[str, ...] = ()  # export formats whose video graph takes any frame count
  hf_export: str | None = None  # f(converted) -> (state dict, HF config dict): the original's PyTorch layout
  score: str = COSINE  # what the dot product of a text and a video embedding is (an export's manifest says it)

  @property
  def trainable(self) -> bool:
    return self.train_flops is not None


_FLOPS = "clipvip_jax.train.model_flops"
_CLIP4CLIP = Recipe(CLIP4CLIP_FRAMES, "clip2video", "crop", CLIP4CLIP_FPS)
_CLIP2VIDEO = Recipe("num_frames", "clip2video", "crop", CLIP4CLIP_FPS, max_frames="frame_positions")

# CLIP-ViP's ONNX video graph has a fixed T: jax2onnx cannot convert an index array sized by a symbolic T (its
# temporal-embedding resampling), which StableHLO runs in the graph (clipvip._resample_temporal_traced).
# CLIP2Video's temporal heads are built per T in both.
KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("clip", "CLIP", "clipvip_jax.models.clip:CLIP", "clipvip_jax.models.clip:CLIPConfig", _CLIP4CLIP,
         video=False, video_kind="meanp", dynamic_frames=("onnx", "stablehlo"),
         hf_export="clipvip_jax.convert.export_hf:clip_to_hf"),
    Kind("meanp", "meanP baseline", "clipvip_jax.models.meanp:MeanPoolCLIP", "clipvip_jax.models.clip:CLIPConfig",
         _CLIP4CLIP, train_flops=f"{_FLOPS}:meanp_train", dynamic_frames=("onnx", "stablehlo")),
    Kind("clipvip", "CLIP-ViP", "clipvip_jax.models.clipvip:CLIPViP", "clipvip_jax.models.clipvip:CLIPViPConfig",
         Recipe("temporal_size", "clipvip", "squash"), train_flops=f"{_FLOPS}:clipvip_train", base="clip",
         # the original overwrites CLIP's temperature with its own logit_scale_init (4.6)
         base_skip=("^logit_scale$",), dynamic_frames=("stablehlo",),
         hf_export="clipvip_jax.convert.export_hf:clipvip_to_hf"),
    Kind("clip2video", "CLIP2Video", "clipvip_jax.models.clip2video:CLIP2Video",
         "clipvip_jax.models.clip2video:CLIP2VideoConfig", _CLIP2VIDEO,
         train_flops=f"{_FLOPS}:clip2video_train", base="clip",
         from_base="clipvip_jax.convert.clip2video:init_params_from_clip",
         score="dot product = the original's inference logits (CLIP2Video's dual-encoder form: "
               "[sqrt(w e^s) global, sqrt((1 - w) e^s) TAB]), not normalised"),
)}

# Derived views, for the modules that list kinds (trainer checks, Pretrained, export).
TRAINABLE_KINDS = tuple(k for k, v in KINDS.items() if v.trainable)
VIDEO_KINDS = tuple(k for k, v in KINDS.items() if v.video)  # encode_video of their own model
HF_EXPORTABLE_KINDS = tuple(k for k, v in KINDS.items() if v.hf_export)


def dynamic_frame_kinds(export_format: str) -> tuple[str, ...]:
  return tuple(k for k, v in KINDS.items() if export_format in v.dynamic_frames)


def get(kind: str) -> Kind:
  if kind not in KINDS:
    raise ValueError(f"unknown model kind {kind!r}; known: {sorted(KINDS)}")
  return KINDS[kind]


def resolve(reference: str) -> Any:
  """"module:attribute" -> the attribute (the module imported now)."""
  module, _, name = reference.partition(":")
  return getattr(importlib.import_module(module), name)


def model_class(kind: str) -> type:
  return resolve(get(kind).model)


def config_class(kind: str) -> type:
  return resolve(get(kind).config)


def config_from_dict(kind: str, d: Mapping[str, Any]) -> Any:
  return config_class(kind).from_dict(dict(d))


def video_kind(kind: str) -> str:
  """The kind whose model encodes videos with `kind`'s parameters (a plain CLIP: meanP's frame mean pooling)."""
  return get(kind).video_kind or kind


def config_for_clip(kind: str, clip_cfg: Any, fields: Mapping[str, Any] | None = None) -> Any:
  """The kind's config around a CLIP config; `fields` are the kind's own (CLIPViPConfig: num_proxies, ...)."""
  cls = config_class(kind)
  if isinstance(clip_cfg, cls):  # the kind is configured by the CLIP config itself (meanp)
    if fields:
      raise ValueError(f"a {kind} model has no options of its own beyond the CLIP config; got {sorted(fields)}")
    return clip_cfg
  return cls.for_clip(clip_cfg, **dict(fields or {}))


def init_route(source_kind: str, kind: str) -> str | None:
  """How a `source_kind` checkpoint initialises a `kind` model: "same" (the same parameters, every one present:
  kinds sharing a config class share their parameters, as meanp and clip do), "base" (a plain CLIP starting the
  CLIP part of a video model) or None (it cannot)."""
  src, dst = get(source_kind), get(kind)
  if src.config == dst.config:
    return "same"
  if dst.base == source_kind:
    return "base"
  return None


def recipe_values(kind: str, cfg: Any) -> tuple[int, str, str, float | None]:
  """(frames, sampling, resize_mode, target_fps) of the kind's test-time recipe for a model of config `cfg`."""
  r = get(kind).recipe
  frames = getattr(cfg, r.frames) if isinstance(r.frames, str) else r.frames
  return int(frames), r.sampling, r.resize_mode, r.target_fps


def max_frames(kind: str, cfg: Any) -> int | None:
  """The most frames a model of this kind and config takes (None: unbounded)."""
  field = get(kind).recipe.max_frames
  return None if field is None else int(getattr(cfg, field))


def _abstract_model(kind: str, cfg: Any):
  from flax import nnx
  return nnx.eval_shape(lambda: model_class(kind)(cfg, rngs=nnx.Rngs(0)))


def param_shapes(kind: str, cfg: Any) -> dict[str, tuple[int, ...]]:
  """{flat key: shape} of every parameter a model of this kind and config has (traced, nothing allocated)."""
  from clipvip_jax.params import flat_params
  return {k: tuple(v.shape) for k, v in flat_params(_abstract_model(kind, cfg)).items()}


def build_model(kind: str, cfg: Any, params: Mapping[str, Any] | None = None, *,
                source: str = "checkpoint", seed: int = 0):
  """A model of `kind` with `params` written in (checked key by key); random initialisation when None.

  With params, the model is created abstractly (no random initialisation of weights about to be overwritten)
  unless it holds non-parameter state, which then needs its real initial values.
  """
  import jax
  from flax import nnx

  from clipvip_jax.params import assign_params
  if params is None:
    return model_class(kind)(cfg, rngs=nnx.Rngs(seed))
  model = _abstract_model(kind, cfg)
  if jax.tree_util.tree_leaves(nnx.state(model, nnx.Not(nnx.Param))):
    model = model_class(kind)(cfg, rngs=nnx.Rngs(seed))
  return assign_params(model, params, source=source)


def replace_in_config(cfg: Any, **fields) -> Any:
  """cfg with `fields` replaced wherever a (nested) config dataclass declares them; e.g. dtype="bfloat16" reaches
  the CLIP config inside a video model's config. Fields nobody declares raise ValueError."""
  found: set[str] = set()

  def visit(c):
    if not dataclasses.is_dataclass(c):
      return c
    names = {f.name for f in dataclasses.fields(c)}
    changes = {k: v for k, v in fields.items() if k in names}
    found.update(changes)
    for f in dataclasses.fields(c):
      if f.name not in changes and dataclasses.is_dataclass(getattr(c, f.name)):
        sub = visit(getattr(c, f.name))
        if sub is not getattr(c, f.name):
          changes[f.name] = sub
    return dataclasses.replace(c, **changes) if changes else c

  out = visit(cfg)
  missing = set(fields) - found
  if missing:
    raise ValueError(f"{type(cfg).__name__} has no field(s) {sorted(missing)}")
  return out


def find_in_config(cfg: Any, cls_name: str) -> Any | None:
  """The first (nested) field of `cfg` whose class is named `cls_name` ("TextConfig", "VisionConfig"), or None."""
  if type(cfg).__name__ == cls_name:
    return cfg
  if dataclasses.is_dataclass(cfg):
    for f in dataclasses.fields(cfg):
      hit = find_in_config(getattr(cfg, f.name), cls_name)
      if hit is not None:
        return hit
  return None
