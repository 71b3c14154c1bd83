"""manifest.json: what a shard directory holds, written last so its presence means the build finished.

  {
    "schema_version": 1,                      # records.SCHEMA_VERSION of every record in the shards
    "producer": "data_pipelines.build_shards",  # or data_pipelines.synthetic, a TFDS builder, ...
    "options": {...},                         # every option that changes the bytes written
    "counts": {"inputs": 1000, "records": 997, "skipped": 3, "shards": 10},
    "splits": {"train": {"inputs": 900, "records": 898, "skipped": 2,
                         "shards": ["train-00000-of-00009.array_record", ...]}, ...},
    "shards": [{"file": "train-00000-of-00009.array_record", "split": "train", "records": 100}, ...],
    "skipped": [{"clip_id": "v12", "video": "v12.mp4", "split": "train", "reason": "empty file (0 bytes)"}]
  }

Shard files are listed relative to the manifest's folder, in split order then shard index, which is the
order readers should concatenate them in. Nothing in it depends on the time or the machine, so two builds
of the same inputs with the same options write the same manifest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from clipvip_jax.files import write_json_atomic  # re-exported: build_shards writes through it
from data_pipelines.records import SCHEMA_VERSION

MANIFEST_NAME = "manifest.json"


def make_manifest(producer: str, options: dict[str, Any], shards: Sequence[dict[str, Any]],
                  skipped: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """shards: {"file", "split", "records"} each; skipped: {"clip_id", "video", "split", "reason"} each."""
  splits: dict[str, dict[str, Any]] = {}
  for shard in shards:
    s = splits.setdefault(shard["split"], {"inputs": 0, "records": 0, "skipped": 0, "shards": []})
    s["records"] += shard["records"]
    s["shards"].append(shard["file"])
  for item in skipped:
    s = splits.setdefault(item["split"], {"inputs": 0, "records": 0, "skipped": 0, "shards": []})
    s["skipped"] += 1
  for s in splits.values():
    s["inputs"] = s["records"] + s["skipped"]
  records = sum(s["records"] for s in splits.values())
  return {
      "schema_version": SCHEMA_VERSION,
      "producer": producer,
      "options": dict(options),
      "counts": {"inputs": records + len(skipped), "records": records, "skipped": len(skipped),
                 "shards": len(shards)},
      "splits": splits,
      "shards": list(shards),
      "skipped": list(skipped),
  }


def write_manifest(out_dir: str, manifest: dict[str, Any]) -> str:
  path = os.path.join(out_dir, MANIFEST_NAME)
  write_json_atomic(path, manifest)
  return path


def read_manifest(shard_dir: str) -> dict[str, Any]:
  """The manifest of a shard directory; a clear error when the folder is not one."""
  if not os.path.isdir(shard_dir):
    raise FileNotFoundError(f"shard directory {shard_dir} does not exist")
  path = os.path.join(shard_dir, MANIFEST_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{shard_dir} has no {MANIFEST_NAME} (not a finished shard directory)")
  with open(path, encoding="utf-8") as f:
    try:
      manifest = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e})") from e
  for key in ("schema_version", "splits", "shards"):
    if key not in manifest:
      raise ValueError(f"{path} lacks the key {key!r}")
  if manifest["schema_version"] > SCHEMA_VERSION:
    raise ValueError(f"{path}: schema {manifest['schema_version']} is newer than this reader ({SCHEMA_VERSION})")
  return manifest


def shard_paths(shard_dir: str, split: str | None = None, manifest: dict[str, Any] | None = None) -> list[str]:
  """Absolute paths of the shards of `split` (all splits when None), in manifest order."""
  manifest = manifest or read_manifest(shard_dir)
  if split is not None and split not in manifest["splits"]:
    raise ValueError(f"{shard_dir} has no split {split!r} (it has {sorted(manifest['splits'])})")
  root = os.path.abspath(shard_dir)
  return [os.path.join(root, s["file"]) for s in manifest["shards"] if split is None or s["split"] == split]


def check_stored_frames(options: dict, image_size: int, resize_mode: str, where: str) -> None:
  """Raises ValueError when shards built with model-ready frames (`options`: a manifest's options) are read at
  another size or resize mode: a second resize of already squashed or cropped frames is not the recipe."""
  stored = int(options.get("frame_size") or 0)
  if stored and (stored, options.get("resize_mode", "squash")) != (image_size, resize_mode):
    raise ValueError(
        f"{where} holds model-ready {stored}x{stored} frames made by resize mode {options.get('resize_mode')!r} "
        f"(build_shards --frame-size {stored}), but data.image_size={image_size}, data.resize_mode="
        f"{resize_mode!r}: rebuild the shards with --frame-size {image_size} --resize-mode {resize_mode}, "
        f"or set the data config to match")
