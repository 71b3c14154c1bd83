"""The run config against a workdir's checkpoint: can this config resume it, and what differs.

  run_config.check_values(config)                       # bad dtypes: one sentence (ValueError) before any work
  notes = run_config.check_resumable(workdir, config)   # NotResumableError, or the differences to state
  run_config.write(workdir, config)                     # WORKDIR/config.json, atomically, only after the check

The reference is the `config` item of the workdir's newest checkpoint (what the checkpoints were trained with),
not WORKDIR/config.json, which a run writes when it starts. Settings that shape the parameters or the optimiser
state (declared `fixed` in train/config_schema.py: the model's architecture, the optimiser's kind, the frozen
parameters) cannot change on resume; everything else (batch size, learning rate, total steps, data paths, compute
dtype, remat, scan_layers, ...) can, and each difference is stated so that a resumed run never changes silently.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable, Iterator, Mapping

from clipvip_jax.train import checkpoint as ckpt_lib
from clipvip_jax.train.config_schema import FIXED_KEYS

CONFIG_FILE = "config.json"

FLOAT_DTYPES = ("float32", "bfloat16", "float16")


class NotResumableError(ValueError):
  """The config differs from the checkpoint's in a setting the checkpoint cannot be restored under."""


def check_values(config: Mapping[str, Any]) -> None:
  """Values that would fail deep inside JAX: the model's and the data's dtype, the attention implementation (and
  the TPU kernel off a TPU) (ValueError naming the key)."""
  dtype = (config.get("model") or {}).get("dtype")
  if dtype is not None and str(dtype) not in FLOAT_DTYPES:
    raise ValueError(f"config.model.dtype = {dtype!r} is not one of {', '.join(FLOAT_DTYPES)}")
  attention = (config.get("model") or {}).get("attention")
  if attention is not None:
    from clipvip_jax.models import layers
    layers.check_attention(str(attention), "config.model.attention =")
  dtype = (config.get("data") or {}).get("dtype")
  if dtype is not None:
    from data_pipelines import transforms
    transforms.video_dtype(str(dtype))  # float32, bfloat16, float16 or uint8 (frames normalised on the device)


def _flatten(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
  if isinstance(tree, Mapping):
    for key in sorted(tree):
      yield from _flatten(tree[key], f"{prefix}{key}.")
  else:
    yield prefix[:-1], tree


def plain(config: Any) -> dict[str, Any]:
  """A ConfigDict (or dict) as the JSON the checkpoints store (tuples as lists)."""
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(dict(config), default=str))


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
  """[(dotted key, saved value, current value)] for every leaf that differs; a key missing on one side is None."""
  old, new = dict(_flatten(saved)), dict(_flatten(current))
  return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _fixed(key: str) -> bool:
  """Declared `fixed` in the schema (the model's architecture, the optimiser's kind, the frozen parameters)."""
  return any(key == k or key.startswith(k + ".") for k in FIXED_KEYS)


def _show(key: str, old: Any, new: Any) -> str:
  if old is None:
    return f"{key} {new!r} (not in the checkpoint's config)"
  if new is None:
    return f"{key} (absent now; {old!r} in the checkpoint's config)"
  return f"{key} {old!r} -> {new!r}"


def saved_config(workdir: str | os.PathLike) -> tuple[int, dict[str, Any]] | None:
  """(step, run config) of the newest checkpoint with a readable config item; None when there is no checkpoint."""
  checkpoints = pathlib.Path(workdir) / ckpt_lib.CHECKPOINT_DIR
  for step in reversed(ckpt_lib.finished_steps(checkpoints)):
    try:
      return step, json.loads((checkpoints / str(step) / "config" / "metadata").read_text(encoding="utf-8"))
    except (OSError, ValueError):
      continue  # that step is damaged; the restore names it
  return None


def check_resumable(workdir: str | os.PathLike, config: Any,
                    report: Callable[[str], None] | None = None) -> list[str]:
  """The differences between `config` and the workdir checkpoint's config, one phrase each (empty without a
  checkpoint), also stated through `report` as one line. Raises NotResumableError naming the settings that cannot
  change, with both values."""
  found = saved_config(workdir)
  if found is None:
    return []
  step, saved = found
  diffs = differences(saved, plain(config))
  # A setting present on one side only comes from a code change (a new field with its default): stated, and the
  # restore itself reports a real mismatch of shapes.
  fixed = [d for d in diffs if _fixed(d[0]) and d[1] is not None and d[2] is not None]
  if fixed:
    raise NotResumableError(
        f"workdir {workdir} cannot resume: its checkpoint (step {step}) was trained with "
        f"{'; '.join(_show(*d) for d in fixed)} differing from this config; use a new --workdir, or set "
        f"{'this setting' if len(fixed) == 1 else 'these settings'} back")
  notes = [_show(*d) for d in diffs]
  if notes and report is not None:
    report(f"resuming workdir {workdir} (checkpoint config of step {step}) with {len(notes)} setting(s) changed: "
           + "; ".join(notes))
  return notes


def write(workdir: str | os.PathLike, config: Any) -> pathlib.Path:
  """WORKDIR/config.json, written to a temporary file and renamed (never half-written)."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  tmp = path.with_name(f"{CONFIG_FILE}.tmp-{os.getpid()}")
  text = config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort") else json.dumps(
      dict(config), indent=2, default=str)
  tmp.write_text(text + "\n")
  os.replace(tmp, path)
  return path


def read(path: str | os.PathLike) -> dict[str, Any]:
  """A workdir's config.json; a missing, unreadable or corrupt file is an error naming it."""
  path = pathlib.Path(path)
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except UnicodeDecodeError:
    raise ValueError(f"{path} is not UTF-8 text (a damaged config file)") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
  if not isinstance(data, dict):
    raise ValueError(f"{path} holds a JSON {type(data).__name__}, not a config object")
  return data
