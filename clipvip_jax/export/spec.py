"""What an export folder holds, read and written by the exporter and the runtime alike (json, hashlib, numpy and
the JAX-free kind registry only).

  DIR/manifest.json        kind, runtime, graphs with their inputs and outputs, dims, versions, sha256 of every file
  DIR/preprocess.json      how a video becomes the video graph's input and a text the text graph's (the spec below)
  DIR/text_encoder.EXT     ids, mask int32 [batch, L] -> embedding float32 [batch, D]
  DIR/video_encoder.EXT    frames uint8 [batch, T, S, S, 3], frame_mask int32 [batch, T] -> embedding [batch, D]
  DIR/tokenizer/           vocab.json + merges.txt (CLIP BPE), tokenizer.json (HF tokenizers), the BPE licence

EXT is .onnx or .stablehlo (jax.export's serialized bytes). The two embeddings' dot product is the model's own
score: cosine for clip, meanp and clipvip (both L2-normalised), the original's inference logits for clip2video
(its dual-encoder form, models/clip2video.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Any

from clipvip_jax import kinds  # the registry itself imports no JAX

FORMAT = "clipvip_jax.export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PREPROCESS = "preprocess.json"
TOKENIZER_DIR = "tokenizer"
GRAPH_FILES = {"onnx": ("text_encoder.onnx", "video_encoder.onnx"),
               "stablehlo": ("text_encoder.stablehlo", "video_encoder.stablehlo")}
EXPORTABLE_KINDS = tuple(kinds.KINDS)  # every kind: a plain CLIP exports its frame-mean-pooling video encoder

# CLIP's pixel statistics (data_pipelines/transforms.py, where training uses them); copied here so the runtime
# needs no data pipeline. tests/test_export.py checks that the two agree.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ExportError(ValueError):
  """An export folder that is missing, incomplete or of another version: one sentence naming the file."""


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """preprocess.json: the test-time recipe of the model's original (clipvip_jax.retrieval.model.VideoRecipe's
  fields) plus what the graphs expect. Frames: `num_frames` picked by `sampling` from a clip decoded at
  `decode_fps` (thinned to `target_fps` first for the clip2video rule), resized to `image_size` by `resize_mode`,
  uint8 RGB channels last; the graph normalises them ((x / 255 - mean) / std, padded frames zeroed)."""
  num_frames: int
  image_size: int
  sampling: str
  resize_mode: str
  target_fps: float | None
  max_text_len: int
  frames_dynamic: bool = False
  max_frames: int | None = None
  decode_fps: float = 5.0
  mean: tuple[float, ...] = CLIP_MEAN
  std: tuple[float, ...] = CLIP_STD

  def replace(self, **changes) -> "Preprocessing":
    return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

  def to_json(self) -> dict[str, Any]:
    """The file's content: the fields, plus sentences saying what each rule means for a non-Python pipeline."""
    out = dataclasses.asdict(self)
    out["mean"], out["std"] = list(self.mean), list(self.std)
    out["explained"] = explain(self)
    return out

  @classmethod
  def from_json(cls, d: dict[str, Any], where: str) -> "Preprocessing":
    names = {f.name for f in dataclasses.fields(cls)}
    missing = {"num_frames", "image_size", "sampling", "resize_mode", "target_fps", "max_text_len"} - set(d)
    if missing:
      raise ExportError(f"{where} lacks the field(s) {sorted(missing)}")
    fields = {k: v for k, v in d.items() if k in names}
    fields["mean"], fields["std"] = tuple(fields.get("mean", CLIP_MEAN)), tuple(fields.get("std", CLIP_STD))
    return cls(**fields)


SAMPLING_RULES = {
    "clipvip": "test time: T indices = linspace(0, n - 1, T) truncated to integers over the n decoded frames "
               "(T = 1: the middle frame n // 2); every slot is a real frame (frame_mask all 1)",
    "clip2video": "frames first thinned to target_fps (keep linspace(0, n - 1, int(n * target_fps / fps)) when the "
                  "decoded rate is higher), then: n <= T keeps all n in order and pads T - n slots (frame_mask 0, "
                  "pixels 0); n > T takes linspace(0, n - 1, T) truncated to integers (T = 1: the middle frame)",
}
RESIZE_RULES = {
    "squash": "bicubic resize of the whole frame straight to S x S (aspect ratio not kept)",
    "crop": "bicubic resize so the short side is S (long side int(S * long / short)), then the centre S x S crop "
            "(offsets round((side - S) / 2))",
}


def explain(p: Preprocessing) -> dict[str, str]:
  frames = (f"any number of frames (the recipe uses {p.num_frames})" if p.frames_dynamic
            else f"exactly {p.num_frames} frames")
  return {
      "decode": f"decode the video at {p.decode_fps:g} fps (every frame for a folder of images); frames are RGB",
      "sampling": SAMPLING_RULES.get(p.sampling, p.sampling),
      "resize": RESIZE_RULES.get(p.resize_mode, p.resize_mode) + f"; S = {p.image_size}",
      "video_input": f"frames uint8 [batch, T, {p.image_size}, {p.image_size}, 3] with {frames}, and frame_mask "
                     "int32 [batch, T] (1 real frame, 0 padding slot); the graph computes (x / 255 - mean) / std "
                     "per channel and zeroes padded frames, so give it raw pixels",
      "text_input": f"ids, mask int32 [batch, {p.max_text_len}] from the tokenizer (tokenizer/; manifest.json "
                    "'tokenizer' describes its clean-up and id layout)",
  }


def sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def checksums(root: pathlib.Path) -> dict[str, dict[str, Any]]:
  """{relative path: {"sha256", "bytes"}} of every file under `root` except the manifest itself."""
  return {p.relative_to(root).as_posix(): {"sha256": sha256(p), "bytes": p.stat().st_size}
          for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  if not path.is_file():
    raise ExportError(f"{path.parent} is not an exported model (no {path.name}; write one with python -m "
                      "clipvip_jax.export)")
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ExportError(f"{path} is not valid JSON ({e})") from None
  if not isinstance(data, dict):
    raise ExportError(f"{path} does not hold a JSON object")
  return data


def read_manifest(root: pathlib.Path) -> dict[str, Any]:
  """manifest.json, checked for what the runtime relies on; ExportError (one sentence) otherwise."""
  path = root / MANIFEST
  manifest = _read_json(path)
  if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
    raise ExportError(f"{path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r} is "
                      f"not {FORMAT!r} version {FORMAT_VERSION} (written by another version; export again)")
  for field in ("kind", "runtime", "embedding_dim", "graphs", "files"):
    if field not in manifest:
      raise ExportError(f"{path} lacks the field {field!r}")
  if manifest["runtime"] not in GRAPH_FILES:
    raise ExportError(f"{path}: field 'runtime' is {manifest['runtime']!r}, not one of {sorted(GRAPH_FILES)}")
  for name in ("text", "video"):
    graph = manifest["graphs"].get(name) if isinstance(manifest["graphs"], dict) else None
    if not isinstance(graph, dict) or not (root / str(graph.get("file", ""))).is_file():
      raise ExportError(f"{path}: the {name} graph named in field 'graphs' is missing from {root}")
  return manifest


def read_preprocessing(root: pathlib.Path) -> Preprocessing:
  return Preprocessing.from_json(_read_json(root / PREPROCESS), str(root / PREPROCESS))


def verify(root: pathlib.Path, manifest: dict[str, Any]) -> None:
  """Every file the manifest lists has its recorded size and sha256 (ExportError naming the first that does not)."""
  for name, entry in manifest["files"].items():
    path = root / name
    if not path.is_file():
      raise ExportError(f"{path} is listed in {root / MANIFEST} but missing")
    if path.stat().st_size != entry.get("bytes") or sha256(path) != entry.get("sha256"):
      raise ExportError(f"{path} does not match the checksum in {root / MANIFEST} (changed or damaged)")
