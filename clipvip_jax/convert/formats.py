"""The registry of checkpoint layouts we convert, and detection of which one a state dict is.

Each layout is one module exposing `detect(sd, path) -> bool` and `convert(sd, config, source) -> Converted`,
imported only when needed (torch-free users of the library never import the converters).
"""

from __future__ import annotations

import importlib
import types
from typing import Any, Mapping

import numpy as np

from clipvip_jax.convert.common import ConversionError, Converted

# name -> module. Detection tries them in this order: the wrapped layouts first, because a CLIP-ViP file
# (`clipmodel.` + added_cls) and a CLIP2Video file (`clip.` + frame_position_embeddings) contain a plain CLIP
# inside them, under a prefix.
FORMATS: dict[str, str] = {
    "clipvip": "clipvip_jax.convert.clipvip",
    "clip2video": "clipvip_jax.convert.clip2video",
    "hf_clip": "clipvip_jax.convert.hf_clip",
    "openai_clip": "clipvip_jax.convert.openai_clip",
}


def format_module(name: str) -> types.ModuleType:
  if name not in FORMATS:
    raise ConversionError(f"unknown checkpoint format {name!r}; known: {', '.join(FORMATS)}")
  return importlib.import_module(FORMATS[name])


def _available_modules():
  for name, module in FORMATS.items():
    try:
      yield name, importlib.import_module(module)
    except ModuleNotFoundError as e:
      if e.name != module:  # a converter that exists but fails to import is a bug: let it surface
        raise


def detect_format(sd: Mapping[str, np.ndarray], path: Any = None) -> str:
  """Name of the first registered layout that recognises `sd`; ConversionError listing a few keys otherwise."""
  for name, module in _available_modules():
    if module.detect(sd, path):
      return name
  sample = ", ".join(sorted(sd)[:5])
  raise ConversionError(f"{path or 'checkpoint'} is in no known format ({', '.join(FORMATS)}); "
                        f"its first keys are: {sample}; pass --format to force one")


def convert(sd: Mapping[str, np.ndarray], config: Mapping[str, Any] | None = None, *, source: str = "checkpoint",
            format: str | None = None) -> Converted:
  """Detect (or take) the layout, convert, and check the result against the model it describes."""
  from clipvip_jax import kinds
  from clipvip_jax.params import check_params
  name = format or detect_format(sd, source)
  result = format_module(name).convert(sd, config, source)
  if isinstance(result, tuple):  # converters written before `Converted` existed return (kind, cfg, params)
    result = Converted(*result)
  result.source, result.source_format = result.source or source, name
  result.params = {k: np.asarray(v, np.float32) for k, v in result.params.items()}
  # Last line of defence: every converter's output must fit its model exactly, key by key.
  check_params(kinds.param_shapes(result.kind, result.config), result.params, source=f"{source} (as {name})")
  return result
