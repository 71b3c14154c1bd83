"""The run config's schema: every key of every section, declared once with its default, its type and its meaning.

  config = config_schema.complete(get_config(), "config file configs/clipvip_msrvtt.py")   # checked, locked
  config_schema.MODEL_RUNTIME_KEYS                                  # model keys a checkpoint does not fix

A recipe (configs/*.py) states only the keys it sets; `complete` refuses a key the schema does not declare, in one
sentence that names it and the closest declared key (`config.optim.warmup_fractoin is not a config key; did you
mean config.optim.warmup_fraction?`), checks each value's type, fills in every default and returns a locked
ConfigDict, so a command-line override (`--config.a.b=v`) can only change a key that exists (the mappings passed
on whole stay open to code, their readers check them). The data section is
data_pipelines.pipeline.DataConfig (its fields are the declaration); `eval.data` holds data keys that override
config.data for evaluation. `model.clip`, `model.config` and `init.config` are passed on whole: the model's
config dataclasses (models/*.py) refuse their unknown fields, and init.config is the original's own config.

`fixed` marks the settings a checkpoint was trained under that a resumed run cannot change (run_config): the
model's architecture (every model key but the runtime ones) and what shapes the optimiser state.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

import ml_collections

from clipvip_jax.train.sharding import DEFAULT_RULES

REQUIRED = object()  # a key without a default: the recipe must set it
_ANY = object()


@dataclasses.dataclass(frozen=True)
class Key:
  default: Any
  doc: str
  types: tuple[type, ...] | object = ()  # accepted value types; () = those of the default (None: any)
  fixed: bool = False  # a resumed run must keep the checkpoint's value (run_config.check_resumable)
  runtime: bool = False  # model keys: how the model computes, applied whatever the checkpoint says
  also: tuple[str, ...] = ()  # other spellings a user may type: only for the suggestion of an unknown key
  free: bool = False  # a mapping passed on whole (checked by whoever reads it)

  def accepts(self, value: Any) -> bool:
    if value is None or self.types is _ANY:
      return True
    types = self.types or _types_of(self.default)
    if not types:
      return True
    if isinstance(value, bool) and bool not in types:
      return False  # True is an int to Python, not a step count to us
    return isinstance(value, types)


def _types_of(default: Any) -> tuple[type, ...]:
  if default is None or default is REQUIRED:
    return ()
  if isinstance(default, bool):
    return (bool,)
  if isinstance(default, (int, float)):
    return (int, float) if isinstance(default, float) else (int,)
  if isinstance(default, (tuple, list)):
    return (tuple, list)
  if isinstance(default, Mapping):
    return (Mapping, ml_collections.ConfigDict)
  return (type(default),)


TOP: dict[str, Key] = {
    "seed": Key(0, "parameter initialisation seed"),
    "mode": Key(REQUIRED, "training objective: nce | omnisource | clip2video (step.MODES)", (str,)),
    "loss": Key("", "omnisource loss name (mode omnisource; losses.OMNISOURCE_LOSSES)"),
    "num_epochs": Key(0, "epochs over the training clips when total_steps is 0", (int, float)),
    "total_steps": Key(0, "updates; 0: ceil(num_epochs x clips / batch) as the originals count"),
    "grad_accum": Key(1, "micro-batches per update (the global batch and its negatives unchanged)"),
    "log_every": Key(50, "steps between metric transfers, TensorBoard writes and timing"),
    "max_nonfinite_steps": Key(10, "consecutive skipped (non-finite) updates before the run stops"),
    "max_nonfinite_total": Key(0, "skipped updates in all before the run stops; 0: no limit"),
    "progress_bar": Key(True, "a progress bar on the terminal"),
    "peak_flops_per_device": Key(0.0, "for MFU; 0: from the device table in train/logging.py"),
    "prefetch": Key(2, "global batches placed on the devices ahead of the step"),
    "compilation_cache_dir": Key("", "a folder enables jax's persistent compilation cache (fast restarts)"),
    "record_batches": Key(False, "every global batch's clip ids to WORKDIR/batches.jsonl (debugging)"),
    "mesh": Key((-1, 1, 1), "(data, fsdp, tensor) mesh shape; -1 takes the remaining devices"),
    "sharding_rules": Key(tuple(DEFAULT_RULES), "logical axis -> mesh axes (train/sharding.py)"),
    "constrain_activations": Key(None, "pin each block's residual stream to batch sharding: True | False | None "
                                 "or 'auto' (True on TPU and under FSDP: sharding.resolve_constrain_activations)",
                                 (bool, str)),
}

MODEL: dict[str, Key] = {
    "kind": Key(REQUIRED, "clipvip | clip2video | meanp", (str,), fixed=True),
    "variant": Key("B/32", "CLIP variant (clip.clip_config); ignored when a checkpoint fixes the architecture",
                   fixed=True),
    "clip": Key({}, "nested overrides of the CLIP config ({'vision': {'layers': 1}})", fixed=True, free=True),
    "config": Key({}, "fields of the kind's own config (CLIPViPConfig, CLIP2VideoConfig)", fixed=True, free=True),
    "dtype": Key(None, "compute dtype (parameters stay float32); None: the model config's", (str,), runtime=True),
    "remat": Key(None, "remat policy (layers.REMAT_CHOICES; auto: the fastest measured for the backend)", (str,),
                 runtime=True),
    "attention": Key(None, "attention: auto (TPU kernel on TPU, else xla) | xla | cudnn (NVIDIA) | pallas (TPU)",
                     (str,), runtime=True),
    "scan_layers": Key(None, "run each tower's blocks under jax.lax.scan (same parameters and names)", (bool,),
                       runtime=True),
}

INIT: dict[str, Key] = {
    "checkpoint": Key("", "'' (random init), a converted dir, an original checkpoint file or a training workdir",
                      (str,)),
    "config": Key("", "the original's config for converting a raw checkpoint (a dict or a JSON path)", _ANY,
                  free=True),
    "skip": Key((), "parameter-name regexes not taken from the checkpoint (default: model_init's)"),
    "logit_scale": Key(None, "a value that replaces logit_scale after loading (overload_logit_scale)", (int, float)),
}

OPTIM: dict[str, Key] = {
    "name": Key("adamw", "adamw (CLIP-ViP) | bert_adam (CLIP4Clip)", fixed=True, also=("optimizer", "optimiser")),
    "lr": Key(REQUIRED, "peak learning rate", (int, float), also=("learning_rate", "base_lr")),
    "b1": Key(0.9, "Adam beta1", also=("beta1",)),
    "b2": Key(0.98, "Adam beta2", also=("beta2",)),
    "eps": Key(1e-6, "Adam epsilon (added to the root of the uncorrected v)", also=("epsilon",)),
    "weight_decay": Key(0.0, "decoupled weight decay", also=("wd", "decay")),
    "grad_clip_norm": Key(0.0, "global-norm gradient clip; <= 0: off", also=("clip_norm", "max_grad_norm")),
    "schedule": Key("warmup_cosine", "warmup_cosine | bert_warmup_cosine | constant"),
    "warmup_fraction": Key(0.0, "warmup as a fraction of the schedule's steps", also=("warmup", "warmup_ratio")),
    "lr_floor": Key(1e-8, "warmup_cosine: the lr where the cosine is not positive", also=("min_lr",)),
    "schedule_steps": Key(0.0, "steps the schedule spans (CLIP4Clip's t_total); 0: the run's", (int, float)),
    "no_decay": Key((r"(^|/)bias$", r"(^|/)logit_scale$"), "names not decayed (regexes)"),
    "lr_multipliers": Key((), "((regex, multiplier), ...): the first match scales that parameter's lr"),
    "frozen": Key((), "names never updated (regexes)", fixed=True),
    "clamp": Key(None, "((regex, min, max), ...); None: logit_scale to [0, ln 200] where it exists", (tuple, list)),
    "clamp_when": Key("before_update", "before_update (CLIP-ViP) | after_update (CLIP4Clip)"),
    "per_tensor_clip_norm": Key(0.0, "BertAdam's max_grad_norm per original tensor; <= 0: off"),
    "per_tensor_clip_units": Key((), "((regex, replacement), ...): our names -> the original tensor's"),
}

EVAL: dict[str, Key] = {
    "split": Key("", "split evaluated during training and by default in the eval command; '': none"),
    "every": Key(0, "steps between evaluations; 0: at the end only"),
    "batch_size": Key(0, "evaluation batch; 0: data.batch_size"),
    "data": Key({}, "data keys that override config.data for evaluation", free=True),
}

CHECKPOINT: dict[str, Key] = {
    "every": Key(0, "steps between checkpoints; 0: at evaluations and the end only"),
    "keep": Key(3, "newest checkpoints kept (the best is kept besides)"),
    "best_metric": Key("", "metric that picks the best checkpoint ('val/t2v/R@1'); '': none"),
    "best_mode": Key("max", "max | min"),
    "async_save": Key(True, "save in the background while training goes on"),
}


def _data_keys() -> dict[str, Key]:
  from data_pipelines.pipeline import DataConfig  # the data section's declaration
  out = {}
  for f in dataclasses.fields(DataConfig):
    default = REQUIRED if f.default is dataclasses.MISSING else f.default
    out[f.name] = Key(default, "data_pipelines.pipeline.DataConfig", (int, float) if f.name == "target_fps" else ())
  return out


def sections() -> dict[str, dict[str, Key]]:
  """{section: {key: Key}}; "" is the top level."""
  return {"": TOP, "model": MODEL, "data": _data_keys(), "init": INIT, "optim": OPTIM, "eval": EVAL,
          "checkpoint": CHECKPOINT}


MODEL_RUNTIME_KEYS = tuple(k for k, key in MODEL.items() if key.runtime)
FIXED_KEYS = tuple(f"{s}.{k}" for s, keys in (("model", MODEL), ("optim", OPTIM)) for k, key in keys.items()
                   if key.fixed)


def suggestion(name: str, keys: Mapping[str, Key] | list[str]) -> str:
  """The declared key closest to `name` (difflib), counting each key's other spellings (Key.also)."""
  spellings = {}
  for key in keys:
    spellings[key] = key
    if isinstance(keys, Mapping):
      spellings.update({other: key for other in keys[key].also})
  return spellings[difflib.get_close_matches(name, list(spellings), n=1, cutoff=0.0)[0]]


# Other spellings of the section names, for the suggestion only.
SECTION_ALSO = {"optim": ("optimizer", "optimiser"), "checkpoint": ("ckpt", "checkpoints"), "data": ("dataset",),
                "eval": ("evaluation",), "init": ("initialization", "initialisation")}


def _top_level() -> dict[str, Key]:
  """The top-level keys and the section names, as the candidates of a top-level suggestion."""
  return {**TOP, **{s: Key({}, "a section", also=SECTION_ALSO.get(s, ())) for s in sections() if s}}


def unknown_key_message(dotted: str, available: list[str] | None = None) -> str:
  """'config.a.b is not a config key; did you mean config.a.c?' for a dotted key the config lacks. Inside a
  mapping the schema passes on whole (model.clip, model.config), `available` lists the keys that mapping has."""
  parent, _, leaf = dotted.rpartition(".")
  all_sections = sections()
  head = parent.split(".")[0]
  if parent and head not in all_sections:
    close = suggestion(head, _top_level())
    return f"config.{dotted} is not a config key (no section {head!r}); did you mean config.{close}?"
  keys = all_sections["data"] if parent == "eval.data" else _top_level() if not parent else all_sections.get(parent)
  if keys is None:
    if not available:
      return f"config.{dotted} is not a config key (config.{parent} has no keys)"
    keys = available
  return f"config.{dotted} is not a config key; did you mean config.{parent + '.' if parent else ''}" \
         f"{suggestion(leaf, keys)}?"


class SchemaError(ValueError):
  """A config key the schema does not declare, a missing required key or a value of the wrong type."""


def _check_section(name: str, given: Mapping[str, Any], keys: Mapping[str, Key], *, partial: bool = False) -> None:
  dotted = f"{name}." if name else ""
  for key, value in given.items():
    if key not in keys:
      raise SchemaError(unknown_key_message(f"{dotted}{key}"))
    declared = keys[key]
    if not declared.accepts(value):
      raise SchemaError(f"config.{dotted}{key} = {value!r} has type {type(value).__name__}; the schema declares "
                        f"{' or '.join(t.__name__ for t in (declared.types or _types_of(declared.default)))}")
  if not partial:
    missing = [k for k, key in keys.items() if key.default is REQUIRED and given.get(k) is None]
    if missing:
      raise SchemaError(f"config.{dotted}{missing[0]} is required ({keys[missing[0]].doc}) and the config lacks it")


def _plain(value: Any) -> Any:
  return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value


def complete(config: Any, source: str = "the config") -> ml_collections.ConfigDict:
  """`config` (a ConfigDict or dict) checked against the schema, every default filled in, locked. SchemaError
  (one sentence, prefixed with `source`) on an unknown key, a missing required one or a value of the wrong type."""
  given = {k: _plain(v) for k, v in (config.items() if hasattr(config, "items") else dict(config).items())}
  try:
    return _complete(given)
  except SchemaError as e:
    raise SchemaError(f"{source}: {e}") from None


def _complete(given: dict[str, Any]) -> ml_collections.ConfigDict:
  all_sections = sections()
  top = {k: v for k, v in given.items() if k not in all_sections}
  for k, v in top.items():
    if k not in TOP and isinstance(v, Mapping) and v:  # a misspelt section: name its first key
      raise SchemaError(unknown_key_message(f"{k}.{next(iter(v))}"))
  _check_section("", top, TOP)
  out: dict[str, Any] = {k: (top[k] if k in top else key.default) for k, key in TOP.items()}
  for name, keys in all_sections.items():
    if not name:
      continue
    section = given.get(name)
    if section is None:
      section = {}
    if not isinstance(section, Mapping):
      raise SchemaError(f"config.{name} is a {type(section).__name__}, not a section (a dict of keys)")
    _check_section(name, section, keys)
    out[name] = {k: (section[k] if k in section else _fresh(key.default)) for k, key in keys.items()}
  eval_data = out["eval"]["data"] or {}
  _check_section("eval.data", eval_data, all_sections["data"], partial=True)
  config = ml_collections.ConfigDict(out)
  config.lock()
  for name, keys in all_sections.items():  # a mapping passed on whole is checked by its reader: code may add to it
    for key in (k for k, declared in keys.items() if declared.free and name):
      if isinstance(config[name][key], ml_collections.ConfigDict):
        config[name][key].unlock()
  return config


def _fresh(default: Any) -> Any:
  return dict(default) if isinstance(default, Mapping) else default


def describe() -> str:
  """Every key with its default and meaning, section by section (docs, `--help`)."""
  lines = []
  for name, keys in sections().items():
    lines.append(f"[{name or 'top level'}]")
    for k, key in keys.items():
      default = "(required)" if key.default is REQUIRED else repr(key.default)
      lines.append(f"  {k} = {default}: {key.doc}{' [fixed on resume]' if key.fixed else ''}")
  return "\n".join(lines)
