"""Look at a shard directory: its counts, one decoded clip, and a contact sheet of a few clips.

  python -m data_pipelines.preview SHARD_DIR [--split train] [--out sheet.png] [--clips 4] [--frames 8]

Reads records directly (records.decode_record over the manifest's shards, frames decoded with PIL), not
through the training pipeline, so it shows what is stored: a bad sheet means bad shards, not a bad
pipeline. The sheet shows each clip's frames at the indices CLIP-ViP's test sampling would take
(linspace(0, T - 1, n) cast to int) under the clip's id and first text.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import textwrap
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_pipelines.manifest import read_manifest, shard_paths
from data_pipelines.records import ClipRecord
from data_pipelines.shard_writer import read_records
from data_pipelines.sources import check_shard
from data_pipelines.video_io import decode_jpeg

CELL_HEIGHT = 96  # frames are drawn this tall: 32-px synthetic frames become visible, 224-px ones shrink
LABEL_WIDTH_CHARS = 110


def iter_split_records(shard_dir: str, split: str, manifest: dict[str, Any]) -> Iterator[ClipRecord]:
  paths = shard_paths(shard_dir, split, manifest)
  for path in paths:  # all up front (milliseconds each): a truncated shard reads as empty, name it instead
    check_shard(path)
  for path in paths:
    yield from read_records(path)


def describe(manifest: dict[str, Any]) -> list[str]:
  """Counts from the manifest, one line each."""
  counts = manifest.get("counts", {})
  lines = [f"producer {manifest.get('producer', '?')}, schema {manifest['schema_version']}: "
           f"{counts.get('records', '?')} records, {counts.get('skipped', 0)} skipped, "
           f"{counts.get('shards', len(manifest['shards']))} shards"]
  for name, split in manifest["splits"].items():
    lines.append(f"  {name}: {split['records']} records, {split.get('skipped', 0)} skipped, "
                 f"{len(split['shards']) if isinstance(split['shards'], list) else split['shards']} shards")
  options = manifest.get("options", {})
  if options:
    lines.append("  options: " + ", ".join(f"{k}={v}" for k, v in options.items() if k != "annotations_sha256"))
  return lines


def describe_record(record: ClipRecord) -> list[str]:
  frames = np.stack([decode_jpeg(f) for f in record.frames])
  lines = [f"sample {record.clip_id!r} ({record.split}): frames {frames.dtype} {list(frames.shape)}, "
           f"fps {record.fps:g} (source {record.source_fps:g})"
           + (f", segment [{record.start}, {record.end}) s" if record.start is not None or record.end else "")]
  for text in record.captions[:3]:
    lines.append(f"  caption: {text}")
  if len(record.captions) > 3:
    lines.append(f"  ... {len(record.captions) - 3} more captions")
  if record.subtitle:
    lines.append(f"  subtitle: {record.subtitle}")
  if record.caption:
    lines.append(f"  auxiliary caption: {record.caption}")
  return lines


def _font(size: int) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow built without FreeType: the fixed bitmap font
    return ImageFont.load_default()


def contact_sheet(records: Sequence[ClipRecord], frames_per_clip: int = 8) -> Image.Image:
  """One row per clip: the id and first text, then frames at the test-sampling indices."""
  font = _font(13)
  rows = []
  for record in records:
    total = record.num_frames
    indices = np.linspace(0, total - 1, min(frames_per_clip, total)).astype(int)
    cells = []
    for i in indices:
      image = Image.fromarray(decode_jpeg(record.frames[i]))
      w, h = image.size
      # Nearest when enlarging keeps tiny synthetic pixels honest; bicubic when shrinking real frames.
      method = Image.Resampling.NEAREST if h < CELL_HEIGHT else Image.Resampling.BICUBIC
      cells.append(image.resize((max(1, round(w * CELL_HEIGHT / h)), CELL_HEIGHT), method))
    text = (record.captions or [record.subtitle or record.caption])[0]
    label = textwrap.wrap(f"{record.clip_id} [{total} frames, showing {indices.tolist()}]: {text}",
                          LABEL_WIDTH_CHARS)
    rows.append((label, cells))
  pad, line_height = 6, 16
  width = max(sum(c.width for c in cells) + pad * (len(cells) + 1) for _, cells in rows)
  width = max(width, 7 * LABEL_WIDTH_CHARS)  # room for a full label line (~7 px per character)
  height = sum(len(label) * line_height + CELL_HEIGHT + 2 * pad for label, _ in rows) + pad
  sheet = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(sheet)
  y = pad
  for label, cells in rows:
    for line in label:
      draw.text((pad, y), line, fill=(0, 0, 0), font=font)
      y += line_height
    x = pad
    for cell in cells:
      sheet.paste(cell, (x, y))
      x += cell.width + pad
    y += CELL_HEIGHT + 2 * pad
  return sheet


def preview(shard_dir: str, split: str | None = None, out: str | None = None, clips: int = 4,
            frames_per_clip: int = 8) -> list[str]:
  """The printed report as lines; writes the contact sheet to `out` when given."""
  manifest = read_manifest(shard_dir)
  if split is None:
    split = "train" if "train" in manifest["splits"] else next(iter(manifest["splits"]), None)
    if split is None:
      raise ValueError(f"{shard_dir}: the manifest lists no split")
  records = list(itertools.islice(iter_split_records(shard_dir, split, manifest), clips))
  lines = describe(manifest)
  if not records:
    return lines + [f"split {split!r} holds no record"]
  lines += describe_record(records[0])
  if out:
    tmp = f"{out}.tmp-{os.getpid()}.png"
    contact_sheet(records, frames_per_clip).save(tmp)
    os.replace(tmp, out)
    lines.append(f"contact sheet of {len(records)} {split} clips: {out}")
  return lines


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m data_pipelines.preview", description=__doc__.split("\n\n")[0])
  p.add_argument("shard_dir", help="folder with manifest.json and its shards")
  p.add_argument("--split", help="split to sample (default: train, else the first split)")
  p.add_argument("--out", default="sheet.png", help="contact sheet PNG path, default %(default)s ('' for none)")
  p.add_argument("--clips", type=int, default=4, help="clips on the sheet, default %(default)s")
  p.add_argument("--frames", type=int, default=8, help="frames per clip on the sheet, default %(default)s")
  args = p.parse_args(argv)
  try:
    if args.clips < 1 or args.frames < 1:
      raise ValueError("--clips and --frames must be >= 1")
    lines = preview(args.shard_dir, args.split, args.out or None, args.clips, args.frames)
  except (ValueError, OSError) as e:
    print(f"preview: error: {e}", file=sys.stderr)
    return 2
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
