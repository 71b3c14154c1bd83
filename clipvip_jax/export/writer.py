"""The JAX side of an export: a loaded model's two encoders as pure functions, written as one export folder.

    from clipvip_jax.retrieval.model import load_model
    from clipvip_jax.export.writer import export_model
    export_model(load_model("converted/clipvip-b32"), "deploy/clipvip-b32", "onnx")

Each encoder is the model's own `encode_text` / `encode_video` with the weights closed over (they become the
graph's constants); the video graph takes uint8 frames and normalises them itself, so a deployment feeds decoded
pixels. The batch is symbolic in both graphs. The frame count is symbolic for clip and meanp (a mean over
frames) and, in StableHLO, for CLIP-ViP (DYNAMIC_FRAME_KINDS); CLIP2Video's temporal heads are built per T (at
most its frame positions), so its T, and CLIP-ViP's in ONNX, is fixed per export (--frames, default the recipe's)
and stated in the manifest.

The folder is built under a hidden temporary name beside --out, checked (both graphs run in their runtime against
the JAX model), then swapped into place in one rename: a reader sees the old export or the new one, never a part.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import shutil
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clipvip_jax import kinds
from clipvip_jax import files
from clipvip_jax.runtime.cli_errors import UsageError
from clipvip_jax.export import routes, spec
from clipvip_jax.retrieval.model import RetrievalModel

# Kinds whose video graph takes any frame count, per format (kinds.Kind.dynamic_frames says why).
DYNAMIC_FRAME_KINDS = {fmt: kinds.dynamic_frame_kinds(fmt) for fmt in spec.GRAPH_FILES}
# Largest difference from the JAX model the export accepts in its own check (float32 compute; see README there).
CHECK_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 5e-2}
CHECK_BATCH = 2


def encoder_functions(model: RetrievalModel) -> tuple[Callable, Callable]:
  """(text(ids, mask), video(frames uint8, frame_mask)) -> float32 embeddings: pure functions of their inputs."""
  from flax import nnx

  from data_pipelines.transforms import normalize_video
  graphdef, state = model.pretrained.graphdef, model.pretrained.state

  def text_encoder(ids, mask):
    return nnx.merge(graphdef, state).encode_text(ids, mask).astype(jnp.float32)

  def video_encoder(frames, frame_mask):
    pixels = normalize_video(frames, frame_mask, xp=jnp)
    return nnx.merge(graphdef, state).encode_video(pixels, frame_mask).astype(jnp.float32)

  return text_encoder, video_encoder


def frame_count(model: RetrievalModel, frames: int | None, fmt: str) -> tuple[int, bool]:
  """(T the video graph is written for, whether T is dynamic); UsageError for a count the model cannot take."""
  count = model.recipe.num_frames if frames is None else frames
  if count < 1:
    raise UsageError(f"--frames must be >= 1, got {count}")
  if model.max_frames is not None and count > model.max_frames:
    raise UsageError(f"--frames {count} exceeds this {model.kind} model's {model.max_frames} frame positions")
  return count, model.kind in DYNAMIC_FRAME_KINDS[fmt]


def input_specs(model: RetrievalModel, frames: int, dynamic_frames: bool):
  """Abstract inputs with a symbolic batch (and frame count): (text args, video args)."""
  batch, any_frames = jax.export.symbolic_shape("batch, frames")
  t = any_frames if dynamic_frames else frames
  size, length = model.input_size, model.recipe.max_text_len
  text = [jax.ShapeDtypeStruct((batch, length), jnp.int32)] * 2
  video = [jax.ShapeDtypeStruct((batch, t, size, size, 3), jnp.uint8), jax.ShapeDtypeStruct((batch, t), jnp.int32)]
  return text, video


def _describe(args: Sequence[jax.ShapeDtypeStruct], names: Sequence[str]) -> list[dict[str, Any]]:
  return [{"name": n, "dtype": str(a.dtype), "shape": [d if isinstance(d, int) else str(d) for d in a.shape]}
          for n, a in zip(names, args)]


TEXT_INPUTS, VIDEO_INPUTS = ("ids", "mask"), ("frames", "frame_mask")


def _write_tokenizer(model: RetrievalModel, folder: pathlib.Path) -> dict[str, Any]:
  """vocab.json + merges.txt (what clipvip_jax.tokenizer reads), tokenizer.json (HF tokenizers: Rust, JS, Java
  bindings), and the description of the original's clean-up that exact ids need."""
  from clipvip_jax import tokenizer
  source = model.pretrained.tokenizer_dir
  folder.mkdir()
  vocab, merges = tokenizer.vocab_and_merges(source)
  (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
  (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
  hf = tokenizer.get_tokenizer(source)
  (folder / "tokenizer.json").write_text(hf.backend_tokenizer.to_str(), encoding="utf-8")
  if source is None:
    shutil.copy(pathlib.Path(tokenizer.__file__).parent / "assets" / "LICENSE-open_clip", folder / "LICENSE")
  rel = spec.TOKENIZER_DIR
  pattern = tokenizer._PRE_TOKEN.pattern  # pylint: disable=protected-access
  return {
      "files": {"vocab": f"{rel}/vocab.json", "merges": f"{rel}/merges.txt", "hf_tokenizer": f"{rel}/tokenizer.json"},
      "max_len": model.recipe.max_text_len, "start_id": hf.bos_token_id, "end_id": hf.eos_token_id, "pad_id": 0,
      "layout": "ids = [start] + BPE ids[:max_len - 2] + [end], then 0 up to max_len; mask = 1 from start to end "
                "inclusive, 0 after",
      "clean_up": "ftfy.fix_text, html.unescape twice, strip, every whitespace run -> one space, strip, lower-case",
      "pre_tokenizer": {"regex": pattern, "flags": "IGNORECASE",
                        "engine": "Python's regex module (Unicode classes \\p{L}, \\p{N})"},
      "bpe": "byte-level BPE: each word's UTF-8 bytes mapped by GPT-2's byte table, '</w>' appended to its last "
             "symbol, merges applied by rank (merges.txt order), one id per resulting symbol (vocab.json)",
      "hf_tokenizer_note": "tokenizer.json holds the same vocabulary and merges for HF tokenizers; its own "
                           "normaliser (NFC, whitespace, lower-case) and split pattern differ from the clean-up "
                           "and regex above on text that needs ftfy or HTML unescaping, so exact ids need those",
  }


def _preprocessing(model: RetrievalModel, frames: int, dynamic: bool, decode_fps: float) -> spec.Preprocessing:
  r = model.recipe
  return spec.Preprocessing(num_frames=frames, image_size=r.image_size, sampling=r.sampling,
                            resize_mode=r.resize_mode, target_fps=r.target_fps, max_text_len=r.max_text_len,
                            frames_dynamic=dynamic, max_frames=model.max_frames, decode_fps=decode_fps)


def _self_check(model: RetrievalModel, folder: pathlib.Path, frames: int) -> dict[str, Any]:
  """Both graphs, run by the runtime on random inputs, against the JAX model: their max abs difference."""
  from clipvip_jax.export.runtime import load_exported
  from data_pipelines.transforms import normalize_video
  exported = load_exported(folder, verify=False)
  rng = np.random.default_rng(0)
  vocab = kinds.find_in_config(model.pretrained.config, "TextConfig").vocab_size
  length, size = model.recipe.max_text_len, model.input_size
  ids = rng.integers(1, vocab - 1, (CHECK_BATCH, length)).astype(np.int32)
  ids[:, -1] = vocab - 1  # the end token (the highest id) ends every row
  mask = np.ones_like(ids)
  video = rng.integers(0, 256, (CHECK_BATCH, frames, size, size, 3), dtype=np.uint8)
  frame_mask = np.ones((CHECK_BATCH, frames), np.int32)
  text_ref = np.asarray(model.encode_text(ids, mask))
  video_ref = np.asarray(model.encode_video(normalize_video(video, frame_mask), frame_mask))
  errors = {"text": float(np.abs(exported.encode_text(ids, mask) - text_ref).max()),
            "video": float(np.abs(exported.encode_video(video, frame_mask) - video_ref).max())}
  tolerance = CHECK_TOLERANCE.get(kinds.find_in_config(model.pretrained.config, "CLIPConfig").dtype, 5e-2)
  for tower, error in errors.items():
    if not error <= tolerance:
      raise RuntimeError(f"the exported {tower} graph differs from the JAX model by {error:.3g} (more than "
                         f"{tolerance:g}); nothing was written")
  return {"batch": CHECK_BATCH, "frames": frames, "tolerance": tolerance,
          "max_abs_error": errors}


def check_out_dir(out: pathlib.Path) -> None:
  """--out may be new, or an earlier export (replaced atomically); anything else there is refused."""
  if out.exists() and not (out.is_dir() and (out / spec.MANIFEST).is_file()):
    raise UsageError(f"--out {out} exists and is not an exported model (no {spec.MANIFEST}); choose a new folder "
                     "or remove it")


def _uses_tpu_kernel(module: Any) -> bool:
  from flax import nnx
  return any(getattr(m, "attention", None) == "pallas" for _, m in nnx.iter_graph(module))


def export_model(model: RetrievalModel, out: str | os.PathLike, fmt: str, *, frames: int | None = None,
                 platforms: Sequence[str] | None = None, decode_fps: float = 5.0, check: bool = True,
                 ) -> pathlib.Path:
  """Writes `model`'s export folder at `out` (replacing an earlier export atomically) and returns its path."""
  if fmt not in routes.WRITERS:
    raise UsageError(f"--format {fmt!r} is not one of {sorted(routes.WRITERS)}")
  missing = routes.missing_package(fmt)
  if missing:
    raise UsageError(missing)
  if model.kind not in spec.EXPORTABLE_KINDS:
    raise UsageError(f"a {model.kind} model cannot be exported; export supports {', '.join(spec.EXPORTABLE_KINDS)}")
  if _uses_tpu_kernel(model.pretrained.model):  # attention "pallas", or "auto" on a TPU host
    raise UsageError("this model was built with the TPU attention kernel; an export needs the portable XLA "
                     "attention: load it with load_model(..., attention='xla')")
  out = pathlib.Path(out).absolute()
  check_out_dir(out)
  t, dynamic = frame_count(model, frames, fmt)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
  files.remove(tmp)
  try:
    tmp.mkdir()
    _write(model, tmp, fmt, t, dynamic, platforms, decode_fps, check)
    files.replace_dir(tmp, out)
  except BaseException:
    files.remove(tmp)
    raise
  return out


def _write(model: RetrievalModel, folder: pathlib.Path, fmt: str, frames: int, dynamic: bool,
           platforms: Sequence[str] | None, decode_fps: float, check: bool) -> None:
  text_fn, video_fn = encoder_functions(model)
  text_args, video_args = input_specs(model, frames, dynamic)
  text_file, video_file = spec.GRAPH_FILES[fmt]
  options = {"platforms": tuple(platforms)} if fmt == "stablehlo" and platforms else {}
  write = routes.WRITERS[fmt]
  text_info = write(text_fn, text_args, TEXT_INPUTS, folder / text_file, "text_encoder", **options)
  video_info = write(video_fn, video_args, VIDEO_INPUTS, folder / video_file, "video_encoder", **options)
  tokenizer_info = _write_tokenizer(model, folder / spec.TOKENIZER_DIR)
  preprocessing = _preprocessing(model, frames, dynamic, decode_fps)
  (folder / spec.PREPROCESS).write_text(json.dumps(preprocessing.to_json(), indent=1) + "\n")
  dims = int(jax.eval_shape(text_fn, *[jax.ShapeDtypeStruct((1, a.shape[1]), a.dtype) for a in text_args]).shape[-1])
  out_desc = [{"name": "embedding", "dtype": "float32", "shape": ["batch", dims]}]
  manifest = {
      "format": spec.FORMAT, "format_version": spec.FORMAT_VERSION, "runtime": fmt, "kind": model.kind,
      "source": {"checkpoint": model.checkpoint, "step": model.step, "config": model.config_path},
      "embedding_dim": dims,
      "similarity": kinds.get(model.kind).score,
      "graphs": {
          "text": {"file": text_file, "inputs": _describe(text_args, TEXT_INPUTS), "outputs": out_desc, **text_info},
          "video": {"file": video_file, "inputs": _describe(video_args, VIDEO_INPUTS), "outputs": out_desc,
                    **video_info},
      },
      "batch": "dynamic (symbolic 'batch' in every graph)",
      "frames": {"dynamic": dynamic, "count": frames, "max": model.max_frames,
                 "note": ("any count" if dynamic else
                          f"fixed at {frames} for this export (--frames N writes another count)")},
      "preprocessing": spec.PREPROCESS,
      "tokenizer": tokenizer_info,
      "versions": {**routes.versions(fmt), "python": platform.python_version()},
      "files": spec.checksums(folder),
  }
  _write_manifest(folder, manifest)
  if check and fmt == "onnx" and routes.version("onnxruntime") is None:
    manifest["checked"] = "not checked: onnxruntime is not installed (pip install onnxruntime)"
    _write_manifest(folder, manifest)
  elif check:
    manifest["checked"] = _self_check(model, folder, frames)
    _write_manifest(folder, manifest)


def _write_manifest(folder: pathlib.Path, manifest: dict[str, Any]) -> None:
  (folder / spec.MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
