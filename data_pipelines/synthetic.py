"""A synthetic video-text set where word order in time matters: every clip has a time-reversed twin.

  python -m data_pipelines.synthetic --out DIR --clips 2000 --seed 0 [--frames 8 --size 32]

Each clip is a coloured shape moving in a straight line over a static textured background, sometimes
beside a static second object, with the caption

  "a large red circle moves up and left quickly on a striped background next to a blue square"

Clips come in pairs: the twin holds the same frames in reverse order and the caption with the opposite
motion ("down and right"); nothing else differs. A model that pools frames without order (CLIP2Video's
meanP, CLIP4Clip's mean pooling) gives both twins the same embedding, so it cannot rank the right one
first for more than half of the queries; a temporal model can. This is the embedded default dataset of
the demo and the tests.

Every pair draws a distinct combination of shape x colour x size x motion axis x speed x background x
second object (102,400 combinations, so at most 204,800 clips), so every caption is unique in the whole
set, and so within its split: retrieval has exactly one right answer per query. Pairs never straddle
splits: 10% of the pairs go to val, 10% to test (at least one each once there are 3 pairs), the rest to
train. Output: the shard format of build_shards (records.encode_record in ArrayRecord) plus manifest.json.
Everything is a function of the seed (numpy PCG64; rendering of pair i uses the stream [seed, i]).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from data_pipelines.manifest import MANIFEST_NAME, make_manifest, write_manifest
from data_pipelines.records import ClipRecord
from data_pipelines.shard_writer import ShardWriter, shard_name
from data_pipelines.video_io import encode_jpeg

PRODUCER = "data_pipelines.synthetic"
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {"red": (225, 35, 35), "green": (35, 185, 60), "blue": (40, 80, 235), "yellow": (240, 220, 30),
           "purple": (150, 55, 205), "orange": (250, 140, 20), "white": (250, 250, 250), "black": (15, 15, 15)}
SIZES = {"small": 0.15, "large": 0.24}        # half-extent of the moving shape, as a fraction of the frame
SPEEDS = {"slowly": 0.22, "quickly": 0.42}    # distance covered over the clip, as a fraction of the frame
BACKGROUNDS = ("striped", "checkered", "dotted", "noisy")
# Motion axes: each pair moves along one axis, the twin in the other direction. (dx, dy) in image axes.
AXES = ((("right", (1, 0)), ("left", (-1, 0))),
        (("down", (0, 1)), ("up", (0, -1))),
        (("down and right", (1, 1)), ("up and left", (-1, -1))),
        (("down and left", (-1, 1)), ("up and right", (1, -1))))
SECOND_OBJECTS = (None,) + tuple((c, s) for c in COLOURS for s in SHAPES)  # same-as-main excluded per pair
SECOND_HALF_EXTENT = 0.12
NOMINAL_FPS = 4.0  # synthetic time: T frames are T / 4 seconds
SPLIT_FRACTIONS = {"val": 0.1, "test": 0.1}
DEFAULT_SHARD_SIZE = 1000
SUPERSAMPLE = 4  # shape coverage from 4x4 points per pixel: anti-aliased edges, sub-pixel motion

_ATTRIBUTE_SIZES = (len(SHAPES), len(COLOURS), len(SIZES), len(AXES), len(SPEEDS), len(BACKGROUNDS),
                    len(SECOND_OBJECTS) - 1)  # the second object never repeats the main (colour, shape)
MAX_PAIRS = int(np.prod(_ATTRIBUTE_SIZES))


def caption(attrs: dict[str, Any], direction: str) -> str:
  text = (f"a {attrs['size']} {attrs['colour']} {attrs['shape']} moves {direction} {attrs['speed']} "
          f"on a {attrs['background']} background")
  if attrs["second"] is not None:
    text += f" next to a {attrs['second'][0]} {attrs['second'][1]}"
  return text


def _pair_attributes(index: int, flip: bool) -> dict[str, Any]:
  """Mixed-radix decoding of a combination index into the named attributes of one pair."""
  digits = []
  for radix in reversed(_ATTRIBUTE_SIZES):
    index, digit = divmod(index, radix)
    digits.append(digit)
  shape_i, colour_i, size_i, axis_i, speed_i, background_i, second_i = reversed(digits)
  shape, colour = SHAPES[shape_i], list(COLOURS)[colour_i]
  seconds = [s for s in SECOND_OBJECTS if s != (colour, shape)]
  forward, backward = AXES[axis_i][::-1] if flip else AXES[axis_i]
  return {"shape": shape, "colour": colour, "size": list(SIZES)[size_i], "speed": list(SPEEDS)[speed_i],
          "background": BACKGROUNDS[background_i], "second": seconds[second_i],
          "forward": forward, "backward": backward}


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
  """A low-contrast, slightly tinted texture [S, S, 3] in [0, 1] (saturated shapes stand out on it)."""
  y, x = np.mgrid[0:size, 0:size].astype(np.float32)
  period = rng.uniform(3.0, 6.0)
  if kind == "striped":
    angle = rng.uniform(0, np.pi)
    texture = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period)
  elif kind == "checkered":
    texture = 2.0 * ((np.floor(x / period) + np.floor(y / period)) % 2) - 1.0
  elif kind == "dotted":
    dy, dx = (y % period) - period / 2, (x % period) - period / 2
    texture = np.where(dx * dx + dy * dy < (period / 4) ** 2, 1.0, -0.6)
  else:  # noisy: coarse random blocks, so it is a texture rather than per-pixel noise
    cells = rng.uniform(-1, 1, (size // 4 + 1, size // 4 + 1))
    texture = cells[np.arange(size)[:, None] // 4, np.arange(size)[None, :] // 4]
  base = rng.uniform(0.38, 0.58) + rng.uniform(-0.05, 0.05, 3)
  return np.clip(base + 0.12 * texture[..., None], 0, 1).astype(np.float32)


def _coverage(shape: str, centres: np.ndarray, r: float, size: int) -> np.ndarray:
  """Fraction [N, S, S] of each output pixel inside the shape centred at centres[n] (x, y): the shape is
  tested at SUPERSAMPLE^2 points per pixel, which anti-aliases edges and shows sub-pixel motion."""
  hi = size * SUPERSAMPLE
  coords = (np.arange(hi, dtype=np.float32) + 0.5) / SUPERSAMPLE
  dx = coords[None, None, :] - centres[:, 0, None, None].astype(np.float32)
  dy = coords[None, :, None] - centres[:, 1, None, None].astype(np.float32)
  mask = _shape_mask(shape, dx, dy, r)
  blocks = mask.view(np.uint8).reshape(-1, size, SUPERSAMPLE, size, SUPERSAMPLE).transpose(0, 1, 3, 2, 4)
  return blocks.reshape(*blocks.shape[:3], -1).sum(-1, dtype=np.float32) / SUPERSAMPLE**2


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
  ax, ay = np.abs(dx), np.abs(dy)
  if shape == "circle":
    return dx * dx + dy * dy <= r * r
  if shape == "square":
    return (ax <= r * 0.85) & (ay <= r * 0.85)
  if shape == "diamond":
    return ax + ay <= r
  if shape == "triangle":  # pointing up: apex at -r, base at +r
    return (dy <= r) & (dy >= -r) & (ax <= (dy + r) / 2)
  return ((ax <= r / 3) & (ay <= r)) | ((ay <= r / 3) & (ax <= r))  # cross


def render_pair(attrs: dict[str, Any], frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
  """uint8 [T, S, S, 3] of the forward clip (its twin is the same array reversed in time)."""
  canvas = np.broadcast_to(_background(attrs["background"], size, rng), (frames, size, size, 3))
  r = SIZES[attrs["size"]] * size
  direction = np.array(attrs["forward"][1], np.float64)
  direction /= np.linalg.norm(direction)
  travel = SPEEDS[attrs["speed"]] * size
  # Centre of the path: anywhere that keeps the whole shape inside the frame at both ends.
  reach = np.abs(direction) * travel / 2 + r
  centre = np.array([rng.uniform(reach[0], size - reach[0]), rng.uniform(reach[1], size - reach[1])])
  path = centre + np.linspace(-0.5, 0.5, frames)[:, None] * travel * direction  # [T, 2] (x, y) in pixels
  if attrs["second"] is not None:
    colour2, shape2 = attrs["second"]
    r2 = SECOND_HALF_EXTENT * size
    # The position, among a few candidates, farthest from the moving shape's path: mostly visible.
    candidates = rng.uniform(r2, size - r2, (8, 2))
    distance = np.min(np.linalg.norm(candidates[:, None] - path[None], axis=-1), axis=1)
    cover = _coverage(shape2, candidates[None, np.argmax(distance)], r2, size)[..., None]
    canvas = canvas * (1 - cover) + np.array(COLOURS[colour2], np.float32) / 255 * cover
  cover = _coverage(attrs["shape"], path, r, size)[..., None]
  canvas = canvas * (1 - cover) + np.array(COLOURS[attrs["colour"]], np.float32) / 255 * cover
  return np.round(canvas * 255).astype(np.uint8)


def _split_sizes(num_pairs: int) -> dict[str, int]:
  held_out = {name: (max(1, round(frac * num_pairs)) if num_pairs >= 3 else 0)
              for name, frac in SPLIT_FRACTIONS.items()}
  return {"train": num_pairs - sum(held_out.values()), **held_out}


def generate(out_dir: str, num_clips: int, seed: int, frames: int = 8, size: int = 32, jpeg_quality: int = 90,
             shard_size: int = DEFAULT_SHARD_SIZE) -> dict[str, Any]:
  """Writes the shards and manifest.json of a synthetic set into out_dir; returns the manifest."""
  if num_clips < 2 or num_clips % 2:
    raise ValueError(f"num_clips must be an even number >= 2 (clips come in twin pairs), got {num_clips}")
  if num_clips // 2 > MAX_PAIRS:
    raise ValueError(f"num_clips must be at most {2 * MAX_PAIRS} (distinct captions run out), got {num_clips}")
  if frames < 2:
    raise ValueError(f"frames must be >= 2 (motion needs two frames), got {frames}")
  if size < 16:
    raise ValueError(f"size must be >= 16 pixels (shapes are unreadable below), got {size}")
  if shard_size < 1:
    raise ValueError(f"shard_size must be >= 1, got {shard_size}")
  if not 1 <= jpeg_quality <= 100:
    raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
  num_pairs = num_clips // 2
  rng = np.random.default_rng(seed)
  combos = rng.choice(MAX_PAIRS, size=num_pairs, replace=False)
  flips = rng.integers(0, 2, size=num_pairs)
  sizes = _split_sizes(num_pairs)
  split_of_pair = list(itertools.chain.from_iterable([name] * n for name, n in sizes.items()))

  records: dict[str, list[ClipRecord]] = {name: [] for name, n in sizes.items() if n}
  for pair, (combo, flip, split) in enumerate(zip(combos, flips, split_of_pair)):
    attrs = _pair_attributes(int(combo), bool(flip))
    video = render_pair(attrs, frames, size, np.random.default_rng([seed, pair]))
    encoded = [encode_jpeg(Image.fromarray(f), jpeg_quality) for f in video]
    for suffix, direction, clip_frames in (("fwd", attrs["forward"][0], encoded),
                                           ("rev", attrs["backward"][0], encoded[::-1])):
      records[split].append(ClipRecord(
          clip_id=f"pair{pair:06d}-{suffix}", frames=clip_frames, captions=[caption(attrs, direction)],
          fps=NOMINAL_FPS, source_fps=NOMINAL_FPS, split=split))

  os.makedirs(out_dir, exist_ok=True)
  _remove_previous_generation(out_dir)
  shards = []
  for split, split_records in records.items():
    count = -(-len(split_records) // shard_size)
    for index in range(count):
      name = shard_name(split, index, count)
      with ShardWriter(os.path.join(out_dir, name)) as writer:
        for record in split_records[index * shard_size:(index + 1) * shard_size]:
          writer.write(record)
      shards.append({"file": name, "split": split, "records": writer.num_records})
  options = {"seed": seed, "clips": num_clips, "frames": frames, "size": size, "jpeg_quality": jpeg_quality,
             "shard_size": shard_size, "split_fractions": SPLIT_FRACTIONS}
  manifest = make_manifest(PRODUCER, options, shards, skipped=[])
  write_manifest(out_dir, manifest)
  return manifest


def _remove_previous_generation(out_dir: str) -> None:
  """Regenerating into a folder replaces the shards its old manifest listed (other files are left alone)."""
  path = os.path.join(out_dir, MANIFEST_NAME)
  if not os.path.isfile(path):
    return
  with open(path, encoding="utf-8") as f:
    old = json.load(f)
  if old.get("producer") != PRODUCER:
    raise ValueError(f"{out_dir} holds a dataset written by {old.get('producer')!r}; choose another --out folder")
  os.remove(path)
  for shard in old.get("shards", []):
    shard_path = os.path.join(out_dir, shard["file"])
    if os.path.isfile(shard_path):
      os.remove(shard_path)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m data_pipelines.synthetic", description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="output folder for shards and manifest.json")
  p.add_argument("--clips", type=int, default=2000,
                 help="number of clips, even (twins come in pairs), default %(default)s")
  p.add_argument("--seed", type=int, default=0, help="random seed, default %(default)s")
  p.add_argument("--frames", type=int, default=8, help="frames per clip, default %(default)s")
  p.add_argument("--size", type=int, default=32, help="frame height and width in pixels, default %(default)s")
  p.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality, default %(default)s")
  p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="clips per shard, default %(default)s")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    manifest = generate(args.out, args.clips, args.seed, frames=args.frames, size=args.size,
                        jpeg_quality=args.jpeg_quality, shard_size=args.shard_size)
  except (ValueError, OSError) as e:
    print(f"synthetic: error: {e}", file=sys.stderr)
    return 2
  per_split = ", ".join(f"{name} {s['records']}" for name, s in manifest["splits"].items())
  print(f"wrote {manifest['counts']['records']} synthetic clips ({per_split}) to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
