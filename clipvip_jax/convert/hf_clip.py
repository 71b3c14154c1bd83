"""HF `CLIPModel` state dicts <-> our flat parameters, and HF `CLIPConfig` dicts -> CLIPConfig.

Torch Linear weights are [out, in]; ours are [in, out]. q/k/v/out projections are reshaped to [embed, heads, kv]
and [heads, kv, embed] so heads can be sharded. The conv patch kernel [D, C, p, p] becomes [p, p, C, D].
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from clipvip_jax.models.clip import CLIPConfig, TextConfig, VisionConfig


def _vision_config(vc: Mapping[str, Any]) -> VisionConfig:
  return VisionConfig(width=vc["hidden_size"], layers=vc["num_hidden_layers"], heads=vc["num_attention_heads"],
                      mlp_dim=vc["intermediate_size"], patch_size=vc["patch_size"], image_size=vc["image_size"],
                      channels=vc.get("num_channels", 3), act=vc.get("hidden_act", "quick_gelu"),
                      eps=vc.get("layer_norm_eps", 1e-5))


def _text_config(tc: Mapping[str, Any]) -> TextConfig:
  return TextConfig(width=tc["hidden_size"], layers=tc["num_hidden_layers"], heads=tc["num_attention_heads"],
                    mlp_dim=tc["intermediate_size"], vocab_size=tc["vocab_size"],
                    max_len=tc["max_position_embeddings"], act=tc.get("hidden_act", "quick_gelu"),
                    eps=tc.get("layer_norm_eps", 1e-5))


def config_from_hf(hf: Mapping[str, Any]) -> CLIPConfig:
  """HF CLIPConfig dict (as in config.json) -> CLIPConfig. Fills HF's defaults for keys an old file omits."""
  try:
    vc, tc = dict(hf["vision_config"]), dict(hf["text_config"])
  except KeyError as e:
    raise ValueError(f"HF CLIP config lacks {e.args[0]!r}") from None
  vdef = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=32,
              image_size=224)
  tdef = dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048,
              vocab_size=49408, max_position_embeddings=77)
  vc = {**vdef, **{k: v for k, v in vc.items() if v is not None}}
  tc = {**tdef, **{k: v for k, v in tc.items() if v is not None}}
  return CLIPConfig(vision=_vision_config(vc), text=_text_config(tc), projection_dim=hf.get("projection_dim", 512),
                    logit_scale_init=hf.get("logit_scale_init_value", 2.6592))


def config_to_hf(cfg: CLIPConfig) -> dict[str, Any]:
  v, t = cfg.vision, cfg.text
  return {
      "model_type": "clip",
      "architectures": ["CLIPModel"],
      "projection_dim": cfg.projection_dim,
      "logit_scale_init_value": cfg.logit_scale_init,
      "vision_config": {"hidden_size": v.width, "num_hidden_layers": v.layers, "num_attention_heads": v.heads,
                        "intermediate_size": v.mlp_dim, "patch_size": v.patch_size, "image_size": v.image_size,
                        "num_channels": v.channels, "hidden_act": v.act, "layer_norm_eps": v.eps,
                        "projection_dim": cfg.projection_dim},
      "text_config": {"hidden_size": t.width, "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
                      "intermediate_size": t.mlp_dim, "vocab_size": t.vocab_size,
                      "max_position_embeddings": t.max_len, "hidden_act": t.act, "layer_norm_eps": t.eps,
                      "projection_dim": cfg.projection_dim,
                      # CLIP's start/end tokens are the two highest ids (49406, 49407 in the real vocabulary);
                      # HF pools at the first eos_token_id, which is our argmax(ids) only if eos is the top id.
                      "bos_token_id": t.vocab_size - 2, "eos_token_id": t.vocab_size - 1, "pad_token_id": 1},
  }


def infer_config(sd: Mapping[str, np.ndarray], hf: Mapping[str, Any] | None = None) -> CLIPConfig:
  """Sizes from the weights; head counts (and activation, eps) from `hf` when given, else width // 64."""
  def n_layers(prefix):
    idx = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0
  vw = sd["vision_model.embeddings.class_embedding"].shape[0]
  patch = sd["vision_model.embeddings.patch_embedding.weight"].shape[-1]
  n_pos = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
  grid = int(round((n_pos - 1)**0.5))
  tw = sd["text_model.embeddings.token_embedding.weight"].shape[1]
  base = config_from_hf(hf) if hf is not None else None
  vision = VisionConfig(
      width=vw, layers=n_layers("vision_model.encoder.layers."),
      heads=base.vision.heads if base else max(vw // 64, 1),
      mlp_dim=sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0], patch_size=patch, image_size=grid * patch,
      channels=sd["vision_model.embeddings.patch_embedding.weight"].shape[1],
      act=base.vision.act if base else "quick_gelu", eps=base.vision.eps if base else 1e-5)
  text = TextConfig(
      width=tw, layers=n_layers("text_model.encoder.layers."), heads=base.text.heads if base else max(tw // 64, 1),
      mlp_dim=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
      vocab_size=sd["text_model.embeddings.token_embedding.weight"].shape[0],
      max_len=sd["text_model.embeddings.position_embedding.weight"].shape[0],
      act=base.text.act if base else "quick_gelu", eps=base.text.eps if base else 1e-5)
  return CLIPConfig(vision=vision, text=text, projection_dim=sd["visual_projection.weight"].shape[0],
                    logit_scale_init=base.logit_scale_init if base else 2.6592)


def _layer_pairs(hf_prefix: str, our_prefix: str, n: int, width: int, heads: int):
  """(hf key, our key, to_ours, to_hf) for every tensor of n encoder layers."""
  hd = width // heads
  for i in range(n):
    h, o = f"{hf_prefix}.{i}", f"{our_prefix}/{i}"
    for proj, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
      yield (f"{h}.self_attn.{proj}.weight", f"{o}/attn/{ours}/kernel",
             lambda w: w.T.reshape(width, heads, hd), lambda w: w.reshape(width, width).T)
      yield (f"{h}.self_attn.{proj}.bias", f"{o}/attn/{ours}/bias",
             lambda b: b.reshape(heads, hd), lambda b: b.reshape(width))
    yield (f"{h}.self_attn.out_proj.weight", f"{o}/attn/out/kernel",
           lambda w: w.T.reshape(heads, hd, width), lambda w: w.reshape(width, width).T)
    yield f"{h}.self_attn.out_proj.bias", f"{o}/attn/out/bias", None, None
    for ln in ("layer_norm1", "layer_norm2"):
      ours = "ln_1" if ln == "layer_norm1" else "ln_2"
      yield f"{h}.{ln}.weight", f"{o}/{ours}/scale", None, None
      yield f"{h}.{ln}.bias", f"{o}/{ours}/bias", None, None
    for fc in ("fc1", "fc2"):
      yield f"{h}.mlp.{fc}.weight", f"{o}/mlp/{fc}/kernel", np.transpose, np.transpose
      yield f"{h}.mlp.{fc}.bias", f"{o}/mlp/{fc}/bias", None, None


def key_table(cfg: CLIPConfig, vision_prefix: str = "vision", text_prefix: str = "text"):
  """Every (hf key, our key, to_ours, to_hf) of a CLIPModel. Identity transforms are None."""
  v, t = cfg.vision, cfg.text
  vp, tp = vision_prefix, text_prefix
  table = [
      ("vision_model.embeddings.class_embedding", f"{vp}/class_embedding", None, None),
      ("vision_model.embeddings.patch_embedding.weight", f"{vp}/patch_embedding/kernel",
       lambda w: w.transpose(2, 3, 1, 0), lambda w: w.transpose(3, 2, 0, 1)),
      ("vision_model.embeddings.position_embedding.weight", f"{vp}/position_embedding", None, None),
      ("vision_model.pre_layrnorm.weight", f"{vp}/pre_layrnorm/scale", None, None),
      ("vision_model.pre_layrnorm.bias", f"{vp}/pre_layrnorm/bias", None, None),
      ("vision_model.post_layernorm.weight", f"{vp}/post_layernorm/scale", None, None),
      ("vision_model.post_layernorm.bias", f"{vp}/post_layernorm/bias", None, None),
      ("visual_projection.weight", f"{vp}/projection/kernel", np.transpose, np.transpose),
      ("text_model.embeddings.token_embedding.weight", f"{tp}/token_embedding", None, None),
      ("text_model.embeddings.position_embedding.weight", f"{tp}/position_embedding", None, None),
      ("text_model.final_layer_norm.weight", f"{tp}/final_layer_norm/scale", None, None),
      ("text_model.final_layer_norm.bias", f"{tp}/final_layer_norm/bias", None, None),
      ("text_projection.weight", f"{tp}/projection/kernel", np.transpose, np.transpose),
      ("logit_scale", "logit_scale", lambda x: np.asarray(x).reshape(()), lambda x: np.asarray(x).reshape(())),
  ]
  table += list(_layer_pairs("vision_model.encoder.layers", f"{vp}/encoder/blocks", v.layers, v.width, v.heads))
  table += list(_layer_pairs("text_model.encoder.layers", f"{tp}/encoder/blocks", t.layers, t.width, t.heads))
  return table


# Buffers some HF/CLIP-ViP checkpoints carry that hold no learned value.
IGNORED_SUFFIXES = ("position_ids",)


def to_params(sd: Mapping[str, np.ndarray], cfg: CLIPConfig, *, strict: bool = True,
              source: str = "checkpoint") -> dict[str, np.ndarray]:
  """HF CLIPModel state dict (numpy, float32) -> our flat params. Raises naming missing/unexpected keys."""
  from clipvip_jax.params import ParamMismatchError
  table = key_table(cfg)
  known = {hf for hf, *_ in table}
  missing = [hf for hf in known if hf not in sd]
  unexpected = [k for k in sd if k not in known and not k.endswith(IGNORED_SUFFIXES)]
  if missing or (strict and unexpected):
    msg = [f"{source} is not an HF CLIPModel state dict of this config:"]
    if missing:
      msg.append(f"  missing keys ({len(missing)}): " + ", ".join(sorted(missing)[:20]))
    if strict and unexpected:
      msg.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(sorted(unexpected)[:20]))
    raise ParamMismatchError("\n".join(msg))
  out = {}
  for hf, ours, to_ours, _ in table:
    w = np.asarray(sd[hf], np.float32)
    out[ours] = to_ours(w) if to_ours else w
  return out


def from_params(flat: Mapping[str, np.ndarray], cfg: CLIPConfig) -> dict[str, np.ndarray]:
  """Our flat params -> HF CLIPModel state dict (numpy float32), the exact inverse of `to_params`."""
  out = {}
  for hf, ours, _, to_hf in key_table(cfg):
    w = np.asarray(flat[ours], np.float32)
    out[hf] = np.array(to_hf(w) if to_hf else w, order="C")
  return out


# ---- converter-registry entry points (clipvip_jax.convert.formats) ----

# Keys only an HF CLIPModel state dict has (unprefixed; CLIP-ViP's released files carry them under `clipmodel.`).
_HF_MARKERS = ("vision_model.embeddings.class_embedding", "text_model.embeddings.token_embedding.weight")


def detect(sd: Mapping[str, np.ndarray], path=None) -> bool:
  return all(k in sd for k in _HF_MARKERS)


def hf_config_dict(config: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
  """The HF CLIPConfig dict inside a user config: bare, or under "clip_config" as CLIP-ViP's JSON files hold it."""
  if config is None:
    return None
  return config.get("clip_config", config)


def expected_hf_shapes(cfg: CLIPConfig) -> dict[str, tuple[int, ...]]:
  """{HF key: shape} a CLIPModel of `cfg` has, derived from our parameter shapes through the key table."""
  from clipvip_jax.kinds import param_shapes
  zeros = {k: np.zeros(s, np.float32) for k, s in param_shapes("clip", cfg).items()}
  return {k: v.shape for k, v in from_params(zeros, cfg).items()}


def check_hf_state_dict(sd: Mapping[str, np.ndarray], cfg: CLIPConfig, *, source: str,
                        ignore_prefixes: tuple[str, ...] = ()) -> None:
  """Every HF key present, none unexpected (position_ids buffers aside), every shape right; names offenders."""
  from clipvip_jax.params import check_params
  given = {k: v for k, v in sd.items() if not k.endswith(IGNORED_SUFFIXES) and not k.startswith(ignore_prefixes)}
  check_params(expected_hf_shapes(cfg), given, source=source)


def infer_checked_config(sd: Mapping[str, np.ndarray], hf: Mapping[str, Any] | None, source: str) -> CLIPConfig:
  """infer_config, with a missing anchor key or an impossible head count reported as a ParamMismatchError."""
  from clipvip_jax.convert.common import ConversionError
  from clipvip_jax.params import ParamMismatchError
  if hf is not None:
    try:
      config_from_hf(hf)
    except (ValueError, TypeError, KeyError) as e:
      raise ConversionError(f"config given for {source} is not an HF CLIPConfig dict: {e}") from None
  try:
    cfg = infer_config(sd, hf)
  except KeyError as e:
    raise ParamMismatchError(f"{source} does not fit the model:\n  missing keys (1): {e.args[0]}") from None
  except (IndexError, ValueError) as e:
    raise ParamMismatchError(f"{source}: cannot infer the CLIP sizes from its weights ({e})") from None
  for name, tower in (("vision", cfg.vision), ("text", cfg.text)):
    if tower.heads < 1 or tower.width % tower.heads:
      raise ParamMismatchError(f"{source}: {name} width {tower.width} is not divisible by {tower.heads} heads "
                               f"(set num_attention_heads in the config)")
  return cfg


def convert(sd: Mapping[str, np.ndarray], config: Mapping[str, Any] | None, source: str):
  """HF CLIPModel state dict (+ optional HF CLIPConfig dict for head counts, activation, eps) -> Converted."""
  from clipvip_jax.convert.common import Converted
  cfg = infer_checked_config(sd, hf_config_dict(config), source)
  check_hf_state_dict(sd, cfg, source=source)
  return Converted("clip", cfg, to_params(sd, cfg, source=source), source=source, source_format="hf_clip")
