"""OpenAI CLIP state dicts (`clip.model.CLIP` naming) <-> our flat params for `clip.CLIP`.

The same naming sits under `clip.` in CLIP4Clip / CLIP2Video checkpoints, so every function takes a source
prefix (`src`) and a destination prefix (`dst`, e.g. "clip/"). The mapping:

  visual.conv1.weight [D, C, p, p]                 -> vision/patch_embedding/kernel [p, p, C, D]
  visual.class_embedding, visual.positional_embedding -> vision/class_embedding, vision/position_embedding
  visual.ln_pre / visual.ln_post                   -> vision/pre_layrnorm / vision/post_layernorm
  visual.proj [D, P] (used as x @ W)               -> vision/projection/kernel (as is)
  visual.transformer.resblocks.N.*                 -> vision/encoder/blocks/N/*
  token_embedding.weight, positional_embedding     -> text/token_embedding, text/position_embedding
  transformer.resblocks.N.*                        -> text/encoder/blocks/N/*
  ln_final, text_projection [W, P] (x @ W)         -> text/final_layer_norm, text/projection/kernel
  logit_scale                                      -> logit_scale
and per residual block: attn.in_proj_weight [3D, D] (q, k, v rows stacked) / in_proj_bias -> attn/{query, key,
value}/{kernel [D, heads, D/heads], bias}; attn.out_proj -> attn/out; ln_1, ln_2; mlp.c_fc / mlp.c_proj -> mlp/fc1 /
mlp/fc2 (torch Linear weights are [out, in], ours [in, out]).

Sizes come from the weights as OpenAI's `build_model` reads them: heads = width // 64 in both towers, layers
counted, patch from conv1, image size from the positional embedding, context length, vocabulary.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

import numpy as np

from clipvip_jax.convert.common import ConversionError, Converted
from clipvip_jax.models.clip import CLIPConfig, TextConfig, VisionConfig
from clipvip_jax.params import ParamMismatchError, check_params

KIND = "clip"
# Scalars OpenAI's TorchScript archives carry beside the weights (build_model deletes them too).
IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size")
# OpenAI's build_model reads these from the weights; a user config naming them must agree.
CONFIG_KEYS_FROM_WEIGHTS = ("embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size",
                            "context_length", "vocab_size", "transformer_width", "transformer_layers")

Transform = Callable[[np.ndarray], np.ndarray]


def resblock_count(sd: Mapping[str, Any], prefix: str) -> int:
  """Number of residual blocks under `{prefix}resblocks.N.` (max index + 1; 0 when none)."""
  head = f"{prefix}resblocks."
  indices = {int(k[len(head):].split(".")[0]) for k in sd if k.startswith(head) and k[len(head):].split(".")[0].isdigit()}
  return max(indices) + 1 if indices else 0


def _get(sd: Mapping[str, Any], key: str, source: str) -> np.ndarray:
  if key not in sd:
    raise ParamMismatchError(f"{source} does not fit the model:\n  missing keys (1): {key}")
  return np.asarray(sd[key])


def infer_config(sd: Mapping[str, Any], src: str = "", *, source: str = "checkpoint") -> CLIPConfig:
  """CLIPConfig of an OpenAI-layout state dict (keys under `src`), everything from the weights."""
  if f"{src}visual.conv1.weight" not in sd and any(k.startswith(f"{src}visual.layer1.") for k in sd):
    raise ConversionError(f"{source}: an OpenAI ResNet CLIP (modified ResNet image tower); only ViT CLIPs convert")
  conv = _get(sd, f"{src}visual.conv1.weight", source)
  if conv.ndim != 4:
    raise ParamMismatchError(f"{source}: {src}visual.conv1.weight has shape {conv.shape}, expected [D, C, p, p]")
  vision_width, channels, patch = conv.shape[0], conv.shape[1], conv.shape[-1]
  n_pos = _get(sd, f"{src}visual.positional_embedding", source).shape[0]
  grid = int(round((n_pos - 1) ** 0.5))
  if grid * grid != n_pos - 1:
    raise ParamMismatchError(f"{source}: {src}visual.positional_embedding has {n_pos} rows, not 1 + a square grid")
  text_width = _get(sd, f"{src}ln_final.weight", source).shape[0]
  token_embedding = _get(sd, f"{src}token_embedding.weight", source)
  vision = VisionConfig(
      width=vision_width, layers=resblock_count(sd, f"{src}visual.transformer."), heads=max(vision_width // 64, 1),
      mlp_dim=_get(sd, f"{src}visual.transformer.resblocks.0.mlp.c_fc.weight", source).shape[0], patch_size=patch,
      image_size=grid * patch, channels=channels)
  text = TextConfig(
      width=text_width, layers=resblock_count(sd, f"{src}transformer."), heads=max(text_width // 64, 1),
      mlp_dim=_get(sd, f"{src}transformer.resblocks.0.mlp.c_fc.weight", source).shape[0],
      vocab_size=token_embedding.shape[0], max_len=_get(sd, f"{src}positional_embedding", source).shape[0])
  cfg = CLIPConfig(vision=vision, text=text, projection_dim=_get(sd, f"{src}text_projection", source).shape[1])
  for name, tower in (("vision", vision), ("text", text)):
    if tower.width % tower.heads:
      raise ParamMismatchError(f"{source}: {name} width {tower.width} is not divisible by width // 64 = {tower.heads} "
                               "heads, as OpenAI CLIP requires")
  return cfg


def check_config_agrees(cfg: CLIPConfig, config: Mapping[str, Any] | None, source: str) -> None:
  """A user config in OpenAI's build_model terms (as CLIP2Video's task options hold them) must agree with the
  weights on every size they determine; head counts are not checked (the original uses width // 64)."""
  if not config:
    return
  actual = {"embed_dim": cfg.projection_dim, "image_resolution": cfg.vision.image_size,
            "vision_layers": cfg.vision.layers, "vision_width": cfg.vision.width,
            "vision_patch_size": cfg.vision.patch_size, "context_length": cfg.text.max_len,
            "vocab_size": cfg.text.vocab_size, "transformer_width": cfg.text.width,
            "transformer_layers": cfg.text.layers}
  clashes = [f"{k} = {config[k]} (weights: {actual[k]})" for k in CONFIG_KEYS_FROM_WEIGHTS
             if config.get(k) is not None and int(config[k]) != actual[k]]
  if clashes:
    raise ConversionError(f"config given for {source} disagrees with the weights: " + "; ".join(clashes))


# ---- the key mapping, in both directions ----

def resblock_items(src: str, dst: str, width: int, heads: int) -> Iterator[tuple[tuple[str, ...], tuple[str, ...],
                                                                                  Transform, Transform]]:
  """(source keys, our keys, to_ours(*src arrays) -> tuple, to_source(*our arrays) -> tuple) for one residual
  block: `src` like "transformer.resblocks.0.", `dst` like "text/encoder/blocks/0/"."""
  hd = width // heads
  qkv = tuple(f"{dst}attn/{n}/" for n in ("query", "key", "value"))
  yield ((f"{src}attn.in_proj_weight",), tuple(p + "kernel" for p in qkv),
         lambda w: tuple(w[i * width:(i + 1) * width].T.reshape(width, heads, hd) for i in range(3)),
         lambda *ks: (np.concatenate([k.reshape(width, width).T for k in ks], axis=0),))
  yield ((f"{src}attn.in_proj_bias",), tuple(p + "bias" for p in qkv),
         lambda b: tuple(b[i * width:(i + 1) * width].reshape(heads, hd) for i in range(3)),
         lambda *bs: (np.concatenate([b.reshape(width) for b in bs]),))
  yield ((f"{src}attn.out_proj.weight",), (f"{dst}attn/out/kernel",),
         lambda w: (w.T.reshape(heads, hd, width),), lambda k: (k.reshape(width, width).T,))
  yield ((f"{src}attn.out_proj.bias",), (f"{dst}attn/out/bias",), _same, _same)
  for ln in ("ln_1", "ln_2"):
    yield ((f"{src}{ln}.weight",), (f"{dst}{ln}/scale",), _same, _same)
    yield ((f"{src}{ln}.bias",), (f"{dst}{ln}/bias",), _same, _same)
  for fc, ours in (("c_fc", "fc1"), ("c_proj", "fc2")):
    yield ((f"{src}mlp.{fc}.weight",), (f"{dst}mlp/{ours}/kernel",), _transpose, _transpose)
    yield ((f"{src}mlp.{fc}.bias",), (f"{dst}mlp/{ours}/bias",), _same, _same)


def _same(x: np.ndarray) -> tuple[np.ndarray]:
  return (x,)


def _transpose(x: np.ndarray) -> tuple[np.ndarray]:
  return (x.T,)


def _scalar(x: np.ndarray) -> tuple[np.ndarray]:
  return (np.asarray(x).reshape(()),)


def resblocks_items(src: str, dst: str, layers: int, width: int, heads: int):
  """Items of `layers` blocks `{src}resblocks.N.` -> `{dst}blocks/N/`."""
  for i in range(layers):
    yield from resblock_items(f"{src}resblocks.{i}.", f"{dst}blocks/{i}/", width, heads)


def key_items(cfg: CLIPConfig, src: str = "", dst: str = ""):
  """Every mapping item of a CLIP: (source keys, our keys, to_ours, to_source)."""
  v, t = cfg.vision, cfg.text
  conv = (lambda w: (w.transpose(2, 3, 1, 0),), lambda k: (k.transpose(3, 2, 0, 1),))
  plain = [
      ("visual.class_embedding", "vision/class_embedding"),
      ("visual.positional_embedding", "vision/position_embedding"),
      ("visual.ln_pre.weight", "vision/pre_layrnorm/scale"), ("visual.ln_pre.bias", "vision/pre_layrnorm/bias"),
      ("visual.ln_post.weight", "vision/post_layernorm/scale"), ("visual.ln_post.bias", "vision/post_layernorm/bias"),
      ("visual.proj", "vision/projection/kernel"),
      ("token_embedding.weight", "text/token_embedding"), ("positional_embedding", "text/position_embedding"),
      ("ln_final.weight", "text/final_layer_norm/scale"), ("ln_final.bias", "text/final_layer_norm/bias"),
      ("text_projection", "text/projection/kernel"),
  ]
  yield (f"{src}visual.conv1.weight",), (f"{dst}vision/patch_embedding/kernel",), *conv
  for s, d in plain:
    yield (src + s,), (dst + d,), _same, _same
  yield (f"{src}logit_scale",), (f"{dst}logit_scale",), _scalar, _scalar
  yield from resblocks_items(f"{src}visual.transformer.", f"{dst}vision/encoder/", v.layers, v.width, v.heads)
  yield from resblocks_items(f"{src}transformer.", f"{dst}text/encoder/", t.layers, t.width, t.heads)


def apply_items(items, sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Source state dict -> our flat params through mapping items (float32)."""
  out = {}
  for src_keys, our_keys, to_ours, _ in items:
    arrays = to_ours(*(np.asarray(sd[k], np.float32) for k in src_keys))
    out.update({k: np.array(a, np.float32, order="C") for k, a in zip(our_keys, arrays)})
  return out


def invert_items(items, flat: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our flat params -> source state dict through mapping items (the exact inverse of apply_items)."""
  out = {}
  for src_keys, our_keys, _, to_source in items:
    arrays = to_source(*(np.asarray(flat[k], np.float32) for k in our_keys))
    out.update({k: np.array(a, np.float32, order="C") for k, a in zip(src_keys, arrays)})
  return out


def expected_shapes(items_fn: Callable[[], Any], our_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple]:
  """{source key: shape} implied by our parameter shapes (derived through the inverse mapping)."""
  zeros = {k: np.zeros(s, np.float32) for k, s in our_shapes.items()}
  return {k: tuple(v.shape) for k, v in invert_items(items_fn(), zeros).items()}


def to_params(sd: Mapping[str, Any], cfg: CLIPConfig, *, src: str = "", dst: str = "",
              source: str = "checkpoint") -> dict[str, np.ndarray]:
  """OpenAI CLIP keys under `src` -> our flat params under `dst`; keys outside `src` are not looked at.

  Raises ParamMismatchError naming every missing, unexpected (under `src`) or mis-shaped key."""
  from clipvip_jax.kinds import param_shapes
  given = {k: _normalised_scalar(k, v, src) for k, v in sd.items()
           if k.startswith(src) and k[len(src):] not in IGNORED_KEYS}
  check_params(expected_shapes(lambda: key_items(cfg, src), param_shapes(KIND, cfg)), given, source=source)
  return apply_items(key_items(cfg, src, dst), given)


def _normalised_scalar(key: str, value: Any, src: str) -> np.ndarray:
  value = np.asarray(value)
  # Some exports store logit_scale as [1] rather than a 0-d tensor.
  return value.reshape(()) if key == f"{src}logit_scale" and value.size == 1 else value


def from_params(flat: Mapping[str, Any], cfg: CLIPConfig, *, src: str = "", dst: str = "") -> dict[str, np.ndarray]:
  """Our flat params (under `dst`) -> an OpenAI CLIP state dict (keys under `src`), float32."""
  return invert_items(key_items(cfg, src, dst), flat)


# ---- converter-registry entry points (clipvip_jax.convert.formats) ----

_MARKERS = ("visual.proj", "text_projection", "token_embedding.weight", "ln_final.weight")


def detect(sd: Mapping[str, Any], path=None) -> bool:
  """A plain (unprefixed) OpenAI CLIP state dict; ResNet ones are recognised so that convert can say why not."""
  return all(k in sd for k in _MARKERS[1:]) and ("visual.proj" in sd or "visual.attnpool.c_proj.weight" in sd)


def convert(sd: Mapping[str, Any], config: Mapping[str, Any] | None = None, source: str = "checkpoint") -> Converted:
  """OpenAI CLIP state dict (a torch.save'd model state dict or a TorchScript archive's) -> Converted.

  `config` is optional: the weights determine everything; a dict in OpenAI's build_model terms (embed_dim,
  vision_width, ...) is checked against them."""
  cfg = infer_config(sd, source=source)
  check_config_agrees(cfg, config, source)
  return Converted(KIND, cfg, to_params(sd, cfg, source=source), source=source, source_format="openai_clip")
