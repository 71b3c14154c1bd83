"""clipvip_jax: CLIP-ViP and CLIP2Video in JAX/Flax NNX.

    import clipvip_jax
    model = clipvip_jax.load_pretrained(path)       # converted dir, training workdir, HF CLIP dir or PyTorch file
    ckpt = clipvip_jax.load_checkpoint(path)        # the same, unbuilt: kind, config, flat float32 params
    ids, mask = clipvip_jax.tokenize(["a cat"])     # CLIP BPE, [N, 77] int32
    clipvip_jax.Searcher("idx/").search(["a cat"])   # an index from python -m clipvip_jax.encode, model loaded once

Names are imported on first use, so `import clipvip_jax` stays cheap (no JAX, torch or transformers import).
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_EXPORTS = {
    "load_pretrained": "clipvip_jax.retrieval.pretrained",
    "load_checkpoint": "clipvip_jax.loading",
    "Pretrained": "clipvip_jax.retrieval.pretrained",
    "tokenize": "clipvip_jax.tokenizer",
    "extract_embeddings": "clipvip_jax.retrieval.extraction",
    "Searcher": "clipvip_jax.retrieval.search",
    "CLIP": "clipvip_jax.models.clip",
    "CLIPConfig": "clipvip_jax.models.clip",
    "clip_config": "clipvip_jax.models.clip",
    "CLIPViP": "clipvip_jax.models.clipvip",
    "CLIPViPConfig": "clipvip_jax.models.clipvip",
    "CLIP2Video": "clipvip_jax.models.clip2video",
    "CLIP2VideoConfig": "clipvip_jax.models.clip2video",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name not in _EXPORTS:
    raise AttributeError(f"module 'clipvip_jax' has no attribute {name!r}")
  value = getattr(importlib.import_module(_EXPORTS[name]), name)
  globals()[name] = value  # cache: later lookups skip __getattr__
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))
