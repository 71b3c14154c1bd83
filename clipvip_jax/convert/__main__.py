"""python -m clipvip_jax.convert SRC --out DIR [--format F] [--config JSON] [--force] [--trust-pickle]

Converts a PyTorch checkpoint (HF CLIP directory, OpenAI CLIP .pt, released CLIP-ViP or CLIP2Video file) into a
converted directory (config.json + Orbax params/) that `clipvip_jax.load_pretrained` and the trainer read.
The layout is detected unless --format names it; --config gives the original's own config JSON (HF CLIPConfig,
CLIP2Video options) for what the weights do not determine, such as head counts. For an HF directory its own
config.json is used when --config is absent.

Errors in the input (missing file, unknown format, missing/unexpected/mis-shaped keys) print one message and
exit with status 2, leaving no output directory behind.

The output directory records what it was converted from (REQUEST_FILE: the source's files with their sizes and
modification times, --format and the config used), written inside it before it takes its place. Run again with the
same arguments on a finished output (a job scheduler relaunching a job that was in fact done), the command reads
nothing more, says the output is complete and exits 0; an output from other arguments is refused unless --force.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from typing import Any

from clipvip_jax.convert.common import ConversionError, Converted, source_config
from clipvip_jax.params import ParamMismatchError

EXIT_BAD_INPUT = 2
REQUEST_FILE = "convert_request.json"


def describe(converted: Converted) -> str:
  """One line: kind, tower sizes, parameter count."""
  from clipvip_jax.kinds import find_in_config
  parts = [f"kind {converted.kind}"]
  vision, text = find_in_config(converted.config, "VisionConfig"), find_in_config(converted.config, "TextConfig")
  if vision is not None:
    parts.append(f"vision {vision.width}w/{vision.layers}L/{vision.heads}h patch {vision.patch_size} "
                 f"image {vision.image_size}")
  if text is not None:
    parts.append(f"text {text.width}w/{text.layers}L/{text.heads}h vocab {text.vocab_size} len {text.max_len}")
  parts.append(f"{converted.num_params:,} params")
  return ", ".join(parts)


def _parser() -> argparse.ArgumentParser:
  from clipvip_jax.convert.formats import FORMATS
  p = argparse.ArgumentParser(prog="python -m clipvip_jax.convert", description=__doc__.split("\n\n")[1])
  p.add_argument("src", help="checkpoint file or HF model directory")
  p.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
  p.add_argument("--format", choices=sorted(FORMATS), help="source layout (default: detected)")
  p.add_argument("--config", help="the original's config JSON (HF CLIPConfig dict, CLIP2Video options)")
  p.add_argument("--force", action="store_true", help="replace an existing output directory")
  p.add_argument("--trust-pickle", action="store_true",
                 help="allow full unpickling of a checkpoint holding non-tensor Python objects (trusted files only)")
  return p


def conversion_request(src, format: str | None = None, config=None) -> dict[str, Any]:
  """What a conversion is asked for: the source's files (path, size, modification time), --format and the
  original's config it is converted with (the user's, or an HF directory's own)."""
  src = pathlib.Path(src).absolute()
  paths = sorted(p for p in src.rglob("*") if p.is_file()) if src.is_dir() else [src]
  stats = [(str(p.relative_to(src)) if src.is_dir() else "", p.stat()) for p in paths]
  return {"source": str(src), "files": [[name, st.st_size, st.st_mtime_ns] for name, st in stats],
          "format": format, "config": source_config(src, config)}


def is_complete(out, request: dict[str, Any]) -> bool:
  """True when OUT is a finished conversion of exactly `request`."""
  try:
    return json.loads((pathlib.Path(out) / REQUEST_FILE).read_text(encoding="utf-8")) == json.loads(
        json.dumps(request))
  except (OSError, ValueError):
    return False


def convert_path(src, out, *, format: str | None = None, config=None, force: bool = False,
                 trust_pickle: bool = False) -> Converted:
  """Load SRC, convert it, and write the converted directory OUT (atomically, REQUEST_FILE inside). Returns what
  was written."""
  from clipvip_jax import files
  from clipvip_jax.converted_checkpoint import save_converted
  from clipvip_jax.convert.common import load_state_dict
  from clipvip_jax.convert.formats import convert
  src, out = pathlib.Path(src), pathlib.Path(out)
  if out.exists() and not force:  # fail before the (possibly long) load
    raise ConversionError(f"output directory {out} already exists (use --force to replace it)")
  if not src.exists():
    raise ConversionError(f"checkpoint {src} does not exist")
  request = conversion_request(src, format, config)
  converted = convert(load_state_dict(src, trust_pickle=trust_pickle), request["config"], source=str(src),
                      format=format)
  staging = files.temporary_name(out)  # the directory and its request file take OUT's place together
  try:
    save_converted(converted, staging, force=True)
    files.write_json_atomic(staging / REQUEST_FILE, request)
    files.replace_dir(staging, out)
  except BaseException:
    files.remove(staging)
    raise
  return converted


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if not args.force and os.path.isdir(args.out) and os.path.exists(args.src) and is_complete(
        args.out, conversion_request(args.src, args.format, args.config)):
      print(f"{args.out} is complete: converted earlier from {args.src} with the same arguments; nothing to do")
      return 0
    converted = convert_path(args.src, args.out, format=args.format, config=args.config, force=args.force,
                             trust_pickle=args.trust_pickle)
  except (ConversionError, ParamMismatchError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT
  print(f"{args.src} ({converted.source_format}) -> {args.out}: {describe(converted)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
