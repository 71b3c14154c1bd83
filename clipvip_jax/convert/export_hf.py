"""JAX -> PyTorch: a converted checkpoint back to an HF-style directory (model.safetensors + config.json).

    python -m clipvip_jax.convert.export_hf CONVERTED_DIR --out DIR [--force]

kind "clip": the HF CLIPModel state dict and CLIPConfig, loadable with `transformers.CLIPModel.from_pretrained(DIR)`.
kind "clipvip": the released CLIP-ViP layout, the same keys prefixed `clipmodel.` plus
`clipmodel.vision_model.embeddings.added_cls` and `.temporal_embedding`, with the original's HF CLIPConfig dict
(its `vision_additional_config` included) as config.json.
Values are copied, never recomputed: HF -> ours -> HF gives back identical arrays.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
from typing import Any

import numpy as np

from clipvip_jax import kinds
from clipvip_jax.convert import hf_clip
from clipvip_jax.convert.common import ConversionError, Converted

EXPORTABLE_KINDS = kinds.HF_EXPORTABLE_KINDS
CLIPVIP_PREFIX = "clipmodel."
_CLIPVIP_EXTRA = {"vision/added_cls": "vision_model.embeddings.added_cls",
                  "vision/temporal_embedding": "vision_model.embeddings.temporal_embedding"}


def _clipvip_config_to_hf(cfg: Any) -> dict[str, Any]:
  hf = hf_clip.config_to_hf(cfg.clip)
  hf["vision_additional_config"] = {
      "type": "ViP", "temporal_size": cfg.temporal_size, "if_use_temporal_embed": int(cfg.use_temporal_embed),
      "logit_scale_init_value": cfg.logit_scale_init, "add_cls_num": cfg.num_proxies - 1}
  return hf


def clip_to_hf(converted: Converted) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  return hf_clip.from_params(converted.params, converted.config), hf_clip.config_to_hf(converted.config)


def clipvip_to_hf(converted: Converted) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  cfg = converted.config
  clip_part = {k: v for k, v in converted.params.items() if k not in _CLIPVIP_EXTRA}
  sd = {CLIPVIP_PREFIX + k: v for k, v in hf_clip.from_params(clip_part, cfg.clip).items()}
  for ours, theirs in _CLIPVIP_EXTRA.items():
    if ours in converted.params:  # temporal_embedding is absent when use_temporal_embed is off
      sd[CLIPVIP_PREFIX + theirs] = np.array(converted.params[ours], np.float32, order="C")
  return sd, _clipvip_config_to_hf(cfg)


def to_hf(converted: Converted) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(PyTorch-layout state dict as float32 numpy, HF config dict) of a converted checkpoint: the writer the
  kind's registry entry names (kinds.Kind.hf_export)."""
  writer = kinds.get(converted.kind).hf_export
  if writer is None:
    raise ConversionError(f"export to the HF/PyTorch layout supports kinds {', '.join(EXPORTABLE_KINDS)}, "
                          f"not {converted.kind!r}")
  return kinds.resolve(writer)(converted)


def export_hf(converted: Converted | str | os.PathLike, out_dir: str | os.PathLike, *,
              force: bool = False) -> pathlib.Path:
  """Writes DIR/model.safetensors + DIR/config.json for a Converted or any checkpoint
  `clipvip_jax.loading.load_checkpoint` reads (a converted directory, a training workdir, ...), atomically."""
  from safetensors.numpy import save_file
  from clipvip_jax.loading import load_checkpoint
  if not isinstance(converted, Converted):
    converted = load_checkpoint(converted)
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and not force:
    raise ConversionError(f"output directory {out_dir} already exists (use --force to replace it)")
  sd, hf_config = to_hf(converted)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    tmp.mkdir()
    # metadata format "pt" marks a PyTorch-layout file; transformers refuses safetensors files without it.
    # np.require keeps 0-d logit_scale 0-d (np.ascontiguousarray would make it [1], which HF rejects).
    save_file({k: np.require(v, np.float32, "C") for k, v in sd.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if out_dir.exists():
      shutil.rmtree(out_dir)
    tmp.rename(out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out_dir


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m clipvip_jax.convert.export_hf",
                              description="Export a converted checkpoint to the HF/PyTorch layout (safetensors).")
  p.add_argument("converted_dir", help="a directory written by python -m clipvip_jax.convert")
  p.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
  p.add_argument("--force", action="store_true", help="replace an existing output directory")
  args = p.parse_args(argv)
  try:
    out = export_hf(args.converted_dir, args.out, force=args.force)
  except ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{args.converted_dir} -> {out}/model.safetensors + config.json")
  return 0


if __name__ == "__main__":
  sys.exit(main())
