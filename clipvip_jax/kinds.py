"""Model kinds ("clip", "clipvip", "clip2video") -> their model and config classes, imported only when used.

Checkpoints, converters and the public API name a model by its kind; this is the one place that turns a kind
into classes, builds a model from a config, and computes the parameter shapes a config implies.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

# kind -> (module, model class, config class)
KINDS: dict[str, tuple[str, str, str]] = {
    "clip": ("clipvip_jax.models.clip", "CLIP", "CLIPConfig"),
    "clipvip": ("clipvip_jax.models.clipvip", "CLIPViP", "CLIPViPConfig"),
    "clip2video": ("clipvip_jax.models.clip2video", "CLIP2Video", "CLIP2VideoConfig"),
}

# Kinds whose visual input is a video [B, T, H, W, 3] (encode_video); the others take images [B, H, W, 3].
VIDEO_KINDS = ("clipvip", "clip2video")


def _classes(kind: str) -> tuple[type, type]:
  if kind not in KINDS:
    raise ValueError(f"unknown model kind {kind!r}; known: {sorted(KINDS)}")
  module, model_cls, config_cls = KINDS[kind]
  mod = importlib.import_module(module)
  return getattr(mod, model_cls), getattr(mod, config_cls)


def model_class(kind: str) -> type:
  return _classes(kind)[0]


def config_class(kind: str) -> type:
  if kind == "meanp":  # CLIP4Clip's meanP baseline (models/meanp.py) is configured by the CLIP towers' config
    from clipvip_jax.models.clip import CLIPConfig  # pylint: disable=import-outside-toplevel
    return CLIPConfig
  return _classes(kind)[1]


def config_from_dict(kind: str, d: Mapping[str, Any]) -> Any:
  return config_class(kind).from_dict(dict(d))


def _abstract_model(kind: str, cfg: Any) -> nnx.Module:
  return nnx.eval_shape(lambda: model_class(kind)(cfg, rngs=nnx.Rngs(0)))


def param_shapes(kind: str, cfg: Any) -> dict[str, tuple[int, ...]]:
  """{flat key: shape} of every parameter a model of this kind and config has (traced, nothing allocated)."""
  from clipvip_jax.params import flat_params
  return {k: tuple(v.shape) for k, v in flat_params(_abstract_model(kind, cfg)).items()}


def build_model(kind: str, cfg: Any, params: Mapping[str, np.ndarray] | None = None, *,
                source: str = "checkpoint", seed: int = 0) -> nnx.Module:
  """A model of `kind` with `params` written in (checked key by key); random initialisation when None.

  With params, the model is created abstractly (no random initialisation of weights about to be overwritten)
  unless it holds non-parameter state, which then needs its real initial values.
  """
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
