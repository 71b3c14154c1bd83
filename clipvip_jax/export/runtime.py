"""An exported model (python -m clipvip_jax.export) run by its own runtime: numpy in, numpy out.

    from clipvip_jax.export.runtime import load_exported
    model = load_exported("deploy/clipvip-b32")             # ONNX through onnxruntime, or StableHLO through jax
    ids, mask = model.tokenize(["a dog catches a frisbee"])
    text = model.encode_text(ids, mask)                      # [1, D] float32
    video = model.encode_video(frames)                       # frames uint8 [B, T, S, S, 3] (preprocess.json)
    scores = model.similarity(text, video)                   # [1, B]: the model's own score

Nothing here imports flax, optax or orbax, nor the project's model code: this module needs numpy, the tokenizer
(clipvip_jax.tokenizer), and onnxruntime or jax for the graphs. `search` and `serve` use it for `--model DIR`;
it offers what they use of a RetrievalModel (kind, checkpoint, recipe.max_text_len, tokenize, encode_text,
embedding_dim, tokenizer_dir).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Callable, Sequence

import numpy as np

from clipvip_jax.export import spec

Runner = Callable[..., np.ndarray]


def _onnx_runner(path: pathlib.Path, input_names: Sequence[str]) -> Runner:
  try:
    import onnxruntime as ort
  except ImportError:
    raise spec.ExportError(f"{path} is an ONNX graph and onnxruntime is not installed: pip install onnxruntime") \
        from None
  options = ort.SessionOptions()
  options.log_severity_level = 3  # errors only
  session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

  def run(*arrays):
    return session.run(None, dict(zip(input_names, arrays)))[0]

  return run


def _stablehlo_runner(path: pathlib.Path, input_names: Sequence[str]) -> Runner:
  del input_names  # positional
  import jax
  exported = jax.export.deserialize(bytearray(path.read_bytes()))
  call = jax.jit(exported.call)  # compiled once per input shape

  def run(*arrays):
    return np.asarray(call(*arrays))

  return run


RUNNERS = {"onnx": _onnx_runner, "stablehlo": _stablehlo_runner}


class ExportedModel:
  """The two graphs of an export folder, its tokenizer and its preprocessing spec (`recipe`)."""

  def __init__(self, root: pathlib.Path, manifest: dict[str, Any], recipe: spec.Preprocessing):
    self.root, self.manifest, self.recipe = root, manifest, recipe
    self.kind: str = manifest["kind"]
    self.checkpoint = str(root)  # what search reports as the model it encodes with
    self.step, self.config_path = None, None
    graphs = manifest["graphs"]
    self._shapes = {name: [i["shape"] for i in graphs[name]["inputs"]] for name in ("text", "video")}
    runner = RUNNERS[manifest["runtime"]]
    self._run = {name: runner(root / graphs[name]["file"], [i["name"] for i in graphs[name]["inputs"]])
                 for name in ("text", "video")}

  @property
  def tokenizer_dir(self) -> pathlib.Path:
    return self.root / spec.TOKENIZER_DIR

  @property
  def text_positions(self) -> int:
    """L of the text graph's inputs; shorter token rows are zero-padded to it (same embedding: causal mask)."""
    return int(self._shapes["text"][0][1])

  @property
  def input_size(self) -> int:
    return int(self._shapes["video"][0][2])

  @property
  def max_frames(self) -> int | None:
    return self.recipe.max_frames

  def embedding_dim(self) -> int:
    return int(self.manifest["embedding_dim"])

  def tokenize(self, texts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) int32 [N, recipe.max_text_len] with the export's own vocabulary (tokenizer/)."""
    from clipvip_jax.tokenizer import tokenize
    return tokenize(texts, max_len=self.recipe.max_text_len, tokenizer_dir=self.tokenizer_dir)

  def encode_text(self, ids, mask=None) -> np.ndarray:
    """ids, mask int [B, L'] (L' <= text_positions; mask None = all ones) -> float32 [B, D]."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] > self.text_positions:
      raise ValueError(f"ids must be [batch, length <= {self.text_positions}], got shape {ids.shape}")
    mask = np.ones_like(ids) if mask is None else np.asarray(mask)
    if mask.shape != ids.shape:
      raise ValueError(f"mask has shape {mask.shape}, ids {ids.shape}")
    pad = ((0, 0), (0, self.text_positions - ids.shape[1]))
    return self._run["text"](np.pad(ids.astype(np.int32), pad), np.pad(mask.astype(np.int32), pad))

  def encode_video(self, frames, frame_mask=None) -> np.ndarray:
    """frames uint8 [B, T, S, S, 3] (raw RGB; the graph normalises), frame_mask [B, T] (None = all real)."""
    frames = np.asarray(frames)
    t = self._shapes["video"][0][1]
    if frames.dtype != np.uint8:
      raise ValueError(f"frames must be uint8 RGB pixels (the graph normalises them), got dtype {frames.dtype}")
    size = self.input_size
    if frames.ndim != 5 or frames.shape[2:] != (size, size, 3) or (isinstance(t, int) and frames.shape[1] != t):
      count = f"{t}" if isinstance(t, int) else "T"
      raise ValueError(f"frames must be [batch, {count}, {size}, {size}, 3], got shape {frames.shape}")
    frame_mask = np.ones(frames.shape[:2], np.int32) if frame_mask is None else np.asarray(frame_mask, np.int32)
    if frame_mask.shape != frames.shape[:2]:
      raise ValueError(f"frame_mask has shape {frame_mask.shape}, frames {frames.shape[:2]}")
    return self._run["video"](frames, frame_mask)

  def similarity(self, text, video) -> np.ndarray:
    """[Nt, Nv]: dot products, the model's own score (manifest 'similarity')."""
    return np.asarray(text, np.float32) @ np.asarray(video, np.float32).T

  def __repr__(self) -> str:
    return f"ExportedModel(kind={self.kind!r}, runtime={self.manifest['runtime']!r}, root={str(self.root)!r})"


def load_exported(root: str | os.PathLike, *, verify: bool = True) -> ExportedModel:
  """The export folder at `root`; with `verify`, every file is checked against the manifest's sha256 first.
  Raises spec.ExportError (one sentence) for a missing, damaged or foreign folder."""
  root = pathlib.Path(root).expanduser().absolute()
  if not root.is_dir():
    raise spec.ExportError(f"exported model {root} does not exist")
  manifest = spec.read_manifest(root)
  if verify:
    spec.verify(root, manifest)
  return ExportedModel(root, manifest, spec.read_preprocessing(root))
