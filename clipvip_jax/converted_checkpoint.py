"""A converted checkpoint on disk: `DIR/config.json` + `DIR/params/` (an Orbax PyTree checkpoint).

config.json: {"format_version": 1, "kind": "clip" | "clipvip" | "clip2video", "model": cfg.to_dict(),
"source": where it came from, "source_format": the layout it was converted from}. params/ holds the nested
parameter dict ({"vision": {"encoder": {"blocks": {"0": ...}}}}) whose '/'-joined paths are the keys of
`clipvip_jax.params.flat_params`.

Writing is atomic: everything is built in `DIR.tmp-<pid>` and renamed into place at the end, and the temporary
directory is removed on any failure, so a reader never sees a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping

import numpy as np

from clipvip_jax import files
from clipvip_jax.convert.common import ConversionError, Converted

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def is_converted_dir(path: str | os.PathLike) -> bool:
  """True for a directory written by `save_converted` (an HF directory also has a config.json, without our marker)."""
  config = pathlib.Path(path) / CONFIG_FILE
  if not config.is_file() or not (pathlib.Path(path) / PARAMS_DIR).is_dir():
    return False
  try:
    return "format_version" in json.loads(config.read_text())
  except json.JSONDecodeError:
    return False


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{"a/b/c": x} -> {"a": {"b": {"c": x}}}."""
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    *parents, leaf = key.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """The inverse of `nest`."""
  out: dict[str, Any] = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, path + "/"))
    else:
      out[path] = value
  return out


def save_params(flat: Mapping[str, np.ndarray], directory: str | os.PathLike) -> None:
  """Orbax PyTree checkpoint of the nested params at `directory` (which must not exist yet)."""
  import orbax.checkpoint as ocp
  tree = nest({k: np.asarray(v) for k, v in flat.items()})
  with ocp.PyTreeCheckpointer() as ckpt:
    ckpt.save(pathlib.Path(directory).absolute(), tree)


def restore_params(directory: str | os.PathLike) -> dict[str, np.ndarray]:
  """Flat {key: np.ndarray} from an Orbax PyTree checkpoint, restored on the host as numpy."""
  import jax
  import orbax.checkpoint as ocp
  directory = pathlib.Path(directory).absolute()
  with ocp.PyTreeCheckpointer() as ckpt:
    tree = ckpt.metadata(directory).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = ckpt.restore(directory, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  return flatten(restored)


def save_converted(converted: Converted, out_dir: str | os.PathLike, *, force: bool = False) -> pathlib.Path:
  """Writes `converted` to `out_dir` atomically; refuses an existing `out_dir` unless `force`."""
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and not force:
    raise ConversionError(f"output directory {out_dir} already exists (use --force / force=True to replace it)")
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
  files.remove(tmp)
  try:
    tmp.mkdir()
    meta = {"format_version": FORMAT_VERSION, "kind": converted.kind, "model": converted.config.to_dict(),
            "source": str(converted.source), "source_format": converted.source_format}
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    save_params(converted.params, tmp / PARAMS_DIR)
    files.replace_dir(tmp, out_dir)  # force: the old copy is swapped out whole, never half-replaced
  except BaseException:
    files.remove(tmp)
    raise
  return out_dir


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
  directory = pathlib.Path(directory)
  path = directory / CONFIG_FILE
  if not path.is_file():
    raise ConversionError(f"{directory} is not a converted checkpoint (no {CONFIG_FILE})")
  try:
    meta = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path} is not valid JSON ({e})") from None
  if meta.get("format_version") != FORMAT_VERSION:
    raise ConversionError(f"{path}: format_version {meta.get('format_version')!r} is not {FORMAT_VERSION} "
                          "(not written by clipvip_jax.convert, or by another version)")
  for field in ("kind", "model"):
    if field not in meta:
      raise ConversionError(f"{path} lacks the field {field!r}")
  return meta


def load_converted(directory: str | os.PathLike) -> Converted:
  """The Converted held by a directory written by `save_converted`; params as float32 numpy on the host."""
  from clipvip_jax import kinds
  directory = pathlib.Path(directory)
  meta = read_meta(directory)
  try:
    cfg = kinds.config_from_dict(meta["kind"], meta["model"])
  except (ValueError, TypeError) as e:
    raise ConversionError(f"{directory / CONFIG_FILE}: field 'model' is not a valid {meta['kind']} config ({e})") \
        from None
  params_dir = directory / PARAMS_DIR
  if not params_dir.is_dir():
    raise ConversionError(f"{directory} has no {PARAMS_DIR}/ checkpoint")
  params = {k: np.asarray(v, np.float32) for k, v in restore_params(params_dir).items()}
  return Converted(meta["kind"], cfg, params, source=meta.get("source", ""),
                   source_format=meta.get("source_format", ""))
