"""The model a run trains: its config from the run config, and its parameters, created directly sharded.

config.model:
  kind        "clipvip" | "clip2video" | "meanp" (CLIP4Clip mean pooling over a per-frame CLIP)
  variant     CLIP variant decoded by clip.clip_config ("B/32", "B/16", "tiny"); ignored when the architecture comes
              from config.init.checkpoint
  clip        nested overrides of the CLIP config ({"vision": {"layers": 1}, "text": {...}})
  config      fields of the kind's own config (CLIPViPConfig: num_proxies, temporal_size, ...; CLIP2VideoConfig:
              center_k, temporal_layers, ...)
  dtype, remat, attention, scan_layers   compute dtype ("bfloat16" for training; parameters stay float32), remat
              policy (layers.REMAT_CHOICES; "auto", the configs' default, picks the fastest measured for the backend:
              "elementwise" on CPU, "none" on GPU/TPU), attention implementation, and whether each transformer runs its
              blocks with jax.lax.scan (layers.Encoder; same parameters and names); applied in every case
config.init:
  checkpoint  None (random init) | anything clipvip_jax.loading reads: a converted directory, a training workdir
              of this project (its latest checkpoint's params), an HF directory or an original checkpoint file
  config      the original's config for converting a raw checkpoint (HF CLIPConfig dict or JSON path, CLIP2Video
              options), as clipvip_jax.load_pretrained takes it
  skip        parameter-name regexes NOT taken from the checkpoint (default: logit_scale when a CLIP-ViP model starts
              from a plain CLIP: the original overwrites CLIP's temperature with 4.6)
  logit_scale None, or a value that replaces logit_scale after loading, whatever the start (CLIP-ViP's
              overload_logit_scale option); the clamp of config.optim still applies at the first update
Same parameters (the same kind, or clip and meanp): the checkpoint fixes the architecture and every parameter must
be present. A plain CLIP ("clip") initialises the CLIP part of a clipvip / clip2video model; the new parameters
start as the originals initialise them (the kind's registry entry, kinds.Kind: base_skip, from_base).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clipvip_jax import kinds
from clipvip_jax.models import clip
from clipvip_jax.train import config_schema

log = logging.getLogger(__name__)

TRAINABLE_KINDS = kinds.TRAINABLE_KINDS
# config.model keys that set how a model computes, not its shapes: applied whatever the checkpoint says.
RUNTIME_KEYS = config_schema.MODEL_RUNTIME_KEYS


def _model_class(kind: str) -> type:
  if kind not in TRAINABLE_KINDS:
    raise ValueError(f"config.model.kind = {kind!r} cannot be trained; known: {TRAINABLE_KINDS}")
  return kinds.model_class(kind)


def _to_dict(x: Any) -> dict[str, Any]:
  if x is None:
    return {}
  return dict(x.to_dict()) if hasattr(x, "to_dict") else dict(x)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
  out = dict(base)
  for k, v in over.items():
    out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
  return out


def _runtime(model_cfg: Any) -> dict[str, Any]:
  return {k: model_cfg[k] for k in RUNTIME_KEYS if model_cfg.get(k) is not None}


def model_config(model_cfg: Any, clip_cfg: clip.CLIPConfig | None = None) -> Any:
  """The kind's config object from config.model; `clip_cfg` (from a CLIP checkpoint) replaces the variant."""
  kind = model_cfg["kind"]
  _model_class(kind)
  if clip_cfg is None:
    clip_cfg = clip.clip_config(model_cfg.get("variant") or "B/32")
  clip_dict = _merge(clip_cfg.to_dict(), _to_dict(model_cfg.get("clip")))
  clip_cfg = clip.CLIPConfig.from_dict(clip_dict)
  try:
    cfg = kinds.config_for_clip(kind, clip_cfg, _to_dict(model_cfg.get("config")))
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.model.config: {e}") from None
  return kinds.replace_in_config(cfg, **_runtime(model_cfg))


@dataclasses.dataclass
class ModelState:
  """What the trainer needs of the model: graphdef + non-parameter state (split once), sharded params."""
  kind: str
  config: Any
  graphdef: nnx.GraphDef
  rest: Any
  params: Any  # nested pure dict of float32 jax.Arrays, sharded
  shardings: Any  # NamedShardings, same structure
  source: str = "random init"

  def model(self) -> nnx.Module:
    return nnx.merge(self.graphdef, self.params, self.rest)


def abstract_model(kind: str, cfg: Any) -> nnx.Module:
  model_cls = _model_class(kind)
  return nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0)))


def param_shardings(kind: str, cfg: Any, mesh, rules) -> tuple[nnx.GraphDef, Any, Any]:
  """(graphdef, abstract rest, NamedShardings of the params as a pure dict) from logical axis names."""
  from clipvip_jax.train import sharding
  graphdef, params, rest = nnx.split(abstract_model(kind, cfg), nnx.Param, ...)
  shardings = nnx.to_pure_dict(sharding.state_shardings(params, mesh, rules))
  return graphdef, nnx.to_pure_dict(rest), shardings


def place_params(flat: Mapping[str, np.ndarray], shardings: Any) -> Any:
  """A flat {name: numpy} dict onto devices with the given (pure-dict) shardings; works across hosts (every host
  holds the whole array and contributes its addressable shards)."""
  from clipvip_jax.train.optim import path_name

  def put(path, sh):
    value = np.asarray(flat[path_name(path)], np.float32)
    return jax.make_array_from_callback(value.shape, sh, lambda index: value[index])

  return jax.tree_util.tree_map_with_path(put, shardings)


def _random_params(kind: str, cfg: Any, shardings: Any, seed: int) -> tuple[Any, Any]:
  model_cls = _model_class(kind)

  def init():
    model = model_cls(cfg, rngs=nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param)), nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))

  return jax.jit(init, out_shardings=(shardings, None))()


def _override_logit_scale(ms: ModelState, value: Any) -> ModelState:
  """ms with every logit_scale parameter set to `value` (its sharding kept)."""
  from clipvip_jax.train.optim import path_name
  hits = []

  def one(path, x):
    name = path_name(path)
    if name == "logit_scale" or name.endswith("/logit_scale"):
      hits.append(name)
      full = np.full(x.shape, value, np.float32)  # every host holds it: works across hosts, as place_params
      return jax.make_array_from_callback(x.shape, x.sharding, lambda index: full[index])
    return x

  params = jax.tree_util.tree_map_with_path(one, ms.params)
  if not hits:
    raise ValueError(f"config.init.logit_scale is set but the {ms.kind} model has no logit_scale parameter")
  log.info("logit_scale set to %s after loading (config.init.logit_scale)", value)
  return dataclasses.replace(ms, params=params)


def abstract_model_state(config: Any, mesh, rules) -> ModelState:
  """The run's model with parameters as sharded ShapeDtypeStructs: no weights are read or made (the planner's
  path, clipvip_jax.plan). The architecture comes from config.model (variant, clip, config): a plain CLIP or a
  same-variant checkpoint in config.init.checkpoint gives the same shapes, and the checkpoint is not opened."""
  kind = config.model["kind"]
  cfg = model_config(config.model)
  graphdef, rest, shardings = param_shardings(kind, cfg, mesh, rules)
  expected = jax.tree.leaves(nnx.to_pure_dict(nnx.state(abstract_model(kind, cfg), nnx.Param)))
  leaves, treedef = jax.tree.flatten(shardings)
  params = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=sh)
                                        for x, sh in zip(expected, leaves)])
  return ModelState(kind, cfg, graphdef, rest, params, shardings, source="abstract (no weights)")


def init_model(config: Any, mesh, rules, initial_params: Mapping[str, np.ndarray] | None = None) -> ModelState:
  """The model of config.model, initialised per config.init (or from `initial_params`, a flat {name: array} dict
  of the same model held in memory), with parameters sharded over `mesh`; then config.init.logit_scale."""
  init_cfg = config.get("init") or {}
  ms = _init_model(config, mesh, rules, initial_params)
  if init_cfg.get("logit_scale") is not None:
    ms = _override_logit_scale(ms, float(init_cfg.get("logit_scale")))
  return ms


def _init_model(config: Any, mesh, rules, initial_params: Mapping[str, np.ndarray] | None) -> ModelState:
  model_cfg, init_cfg = config.model, config.get("init") or {}
  kind, seed = model_cfg["kind"], int(config.get("seed", 0))
  checkpoint = init_cfg.get("checkpoint")
  if initial_params is not None:
    cfg = model_config(model_cfg)
    graphdef, rest, shardings = param_shardings(kind, cfg, mesh, rules)
    from clipvip_jax.params import check_params, shapes
    check_params(shapes(abstract_model(kind, cfg)), initial_params, source="initial_params")
    return ModelState(kind, cfg, graphdef, rest, place_params(initial_params, shardings), shardings,
                      source="initial_params")
  if not checkpoint:
    cfg = model_config(model_cfg)
    graphdef, rest, shardings = param_shardings(kind, cfg, mesh, rules)
    params, rest = _random_params(kind, cfg, shardings, seed)
    return ModelState(kind, cfg, graphdef, rest, params, shardings)

  return _from_checkpoint(config, mesh, rules)


def _from_checkpoint(config: Any, mesh, rules) -> ModelState:
  """The model of config.model started from config.init.checkpoint: every parameter of a checkpoint with the same
  parameters, or the CLIP part of a video model from a plain CLIP (the kind's registry entry says what else)."""
  from clipvip_jax.loading import load_checkpoint
  model_cfg, init_cfg = config.model, config.init
  kind, seed, checkpoint = model_cfg["kind"], int(config.get("seed", 0)), init_cfg.get("checkpoint")
  loaded = load_checkpoint(checkpoint, init_cfg.get("config"))
  src_kind, route = loaded.kind, kinds.init_route(loaded.kind, kind)
  if route == "same":
    cfg = kinds.replace_in_config(loaded.config, **_runtime(model_cfg))
  elif route == "base":
    cfg = model_config(model_cfg, clip_cfg=loaded.config)
  else:
    raise ValueError(f"config.init.checkpoint {checkpoint} holds a {src_kind!r} model, which cannot initialise "
                     f"a {kind!r} model (the same parameters, or a plain CLIP for {', '.join(TRAINABLE_KINDS)})")
  graphdef, rest, shardings = param_shardings(kind, cfg, mesh, rules)
  default_skip = kinds.get(kind).base_skip if route == "base" else ()
  skip = [re.compile(s) for s in init_cfg.get("skip") or default_skip]
  flat = {k: v for k, v in loaded.params.items() if not any(s.search(k) for s in skip)}
  from_base = kinds.get(kind).from_base
  if route == "base" and from_base:
    flat = kinds.resolve(from_base)(flat, cfg, rng=seed)
  from clipvip_jax.params import ParamMismatchError, shapes
  from clipvip_jax.train.optim import path_name
  expected = shapes(abstract_model(kind, cfg))
  unexpected = sorted(set(flat) - set(expected))
  misshaped = [f"{k}: {tuple(np.shape(v))} vs model {expected[k]}" for k, v in flat.items()
               if k in expected and tuple(np.shape(v)) != expected[k]]
  missing = sorted(set(expected) - set(flat))
  if unexpected or misshaped or (missing and route == "same" and not skip):
    raise ParamMismatchError(f"config.init.checkpoint {checkpoint} does not fit the {kind} model: "
                             f"unexpected {unexpected[:10]}, wrong shapes {misshaped[:10]}, missing {missing[:10]}")
  fresh = None
  if missing:  # new parameters (added_cls, temporal_embedding, skipped logit_scale) keep their original init
    fresh, rest = _random_params(kind, cfg, shardings, seed)
    log.info("%d parameters not taken from %s start from their initialisation: %s", len(missing), checkpoint,
             missing)
  # Parameters the checkpoint provides are placed from the host; the others keep their fresh sharded init.
  placed = place_params({**flat, **{m: np.zeros(expected[m], np.float32) for m in missing}}, shardings)
  params = placed if fresh is None else jax.tree_util.tree_map_with_path(
      lambda path, new, init: init if path_name(path) in missing else new, placed, fresh)
  return ModelState(kind, cfg, graphdef, rest, params, shardings, source=str(checkpoint))
