"""The model behind `encode` and `search`: any checkpoint we can read, plus the video recipe it was trained with.

`load_model(path)` accepts
  * a converted directory (`python -m clipvip_jax.convert`: config.json + Orbax params/),
  * a training workdir of this project (WORKDIR/checkpoints/<step>/; the latest step unless `step` names one,
    "best" for the one best.json names), whose run config also gives the data recipe it was trained on,
  * an original checkpoint file or HF CLIP directory (converted on the fly, as `load_pretrained` does).
A plain image CLIP ("clip") or the demo's meanP baseline ("meanp") encodes a video as the mean of its
L2-normalised frame embeddings (CLIP4Clip's meanP), so every checkpoint can index videos.

The recipe is how a video becomes model input, as the model's original prepares it at test time:
  clipvip    CLIP-ViP sampling (T evenly spaced frames over the clip), squash to S x S, T = temporal_size
  clip2video CLIP4Clip sampling (thin to 5 fps, then uniform), short side S + centre crop, T = num_frames
  clip/meanp the CLIP4Clip recipe (as clip2video), T = 12
A training workdir's own data settings (frames, size, sampling, resize, text length) take precedence.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from clipvip_jax import kinds
from clipvip_jax.runtime.cli_errors import DEBUG_ENV, UsageError

CLIP4CLIP_FPS = 5.0  # CLIP2Video / CLIP4Clip extract frames at 5 fps before sub-sampling
CLIP4CLIP_FRAMES = 12


@dataclasses.dataclass(frozen=True)
class VideoRecipe:
  """How a clip becomes model input (the fields of data_pipelines.pipeline.DataConfig with the same names)."""
  num_frames: int
  image_size: int
  sampling: str  # "clipvip" | "clip2video" (data_pipelines.sampling)
  resize_mode: str  # "squash" | "crop" (data_pipelines.transforms)
  target_fps: float | None  # clip2video sampling: thin stored frames to this rate first
  max_text_len: int

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def replace(self, **changes) -> "VideoRecipe":
    return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclasses.dataclass
class RetrievalModel:
  """A loaded model with what encode/search need: jitted encoders, similarity, tokenizer and recipe."""
  pretrained: Any  # clipvip_jax.retrieval.pretrained.Pretrained
  checkpoint: str  # absolute path it was loaded from
  recipe: VideoRecipe
  step: int | None = None  # the training step, for a workdir checkpoint
  config_path: str | None = None  # the --config JSON an original checkpoint was converted with

  @property
  def kind(self) -> str:
    return self.pretrained.kind

  @property
  def tokenizer_dir(self):
    """The checkpoint's own tokenizer files (an HF directory's), or None for the vocabulary shipped here."""
    return self.pretrained.tokenizer_dir

  @property
  def text_positions(self) -> int:
    return kinds.find_in_config(self.pretrained.config, "TextConfig").max_len

  @property
  def input_size(self) -> int:
    return kinds.find_in_config(self.pretrained.config, "VisionConfig").image_size

  @property
  def max_frames(self) -> int | None:
    """The most frames the model can take (clip2video's frame position table), None when unbounded."""
    return getattr(self.pretrained.config, "frame_positions", None)

  def encode_video(self, video, frame_mask) -> jax.Array:
    """video [B, T, S, S, 3] CLIP-normalised float32, frame_mask [B, T] -> [B, D]."""
    p = self.pretrained
    return p.jitted("encode_video")(p.state, jnp.asarray(video, jnp.float32), jnp.asarray(frame_mask, jnp.int32))

  def encode_text(self, ids, mask) -> jax.Array:
    return self.pretrained.encode_text(ids, mask)

  def similarity(self, text, visual) -> jax.Array:
    """[Nt, Nv]: the model's own score (cosine for clip/clipvip/meanp, the original's logits for clip2video)."""
    return self.pretrained.similarity(text, visual)

  def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    from clipvip_jax.tokenizer import tokenize
    return tokenize(texts, max_len=self.recipe.max_text_len, tokenizer_dir=self.pretrained.tokenizer_dir)

  def embedding_dim(self) -> int:
    """D of encode_text / encode_video (traced, nothing computed)."""
    p = self.pretrained
    ids = jax.ShapeDtypeStruct((1, self.recipe.max_text_len), jnp.int32)
    return int(jax.eval_shape(p.jitted("encode_text"), p.state, ids, ids).shape[-1])


def default_recipe(kind: str, config: Any) -> VideoRecipe:
  """The test-time recipe of the model's original (module docstring)."""
  image_size = kinds.find_in_config(config, "VisionConfig").image_size
  text_len = kinds.find_in_config(config, "TextConfig").max_len
  if kind == "clipvip":
    return VideoRecipe(config.temporal_size, image_size, "clipvip", "squash", None, text_len)
  if kind == "clip2video":
    return VideoRecipe(config.num_frames, image_size, "clip2video", "crop", CLIP4CLIP_FPS, text_len)
  return VideoRecipe(CLIP4CLIP_FRAMES, image_size, "clip2video", "crop", CLIP4CLIP_FPS, text_len)


def _run_data_config(step_dir: pathlib.Path) -> dict[str, Any]:
  """The data settings a training run evaluated with: config.data updated by config.eval.data (as the trainer's
  evaluator builds them); {} when the checkpoint carries no run config."""
  path = step_dir / "config" / "metadata"
  if not path.is_file():
    return {}
  try:
    config = json.loads(path.read_text())
  except json.JSONDecodeError:
    return {}
  data = dict(config.get("data") or {})
  data.update((config.get("eval") or {}).get("data") or {})
  return data


def recipe_from_run(recipe: VideoRecipe, data: Mapping[str, Any]) -> VideoRecipe:
  fields = {f.name for f in dataclasses.fields(VideoRecipe)}
  return dataclasses.replace(recipe, **{k: v for k, v in data.items() if k in fields})


def _build(kind: str, cfg: Any, params: Mapping[str, np.ndarray], source: str):
  """A Pretrained of `kind`; clip and meanp become the frame-mean-pooling model (same parameters as CLIP)."""
  from clipvip_jax.retrieval.pretrained import Pretrained
  if kind in ("clip", "meanp"):
    from flax import nnx

    from clipvip_jax.models.meanp import MeanPoolCLIP
    from clipvip_jax.params import assign_params
    model = assign_params(nnx.eval_shape(lambda: MeanPoolCLIP(cfg, rngs=nnx.Rngs(0))), params, source=source)
  else:
    model = kinds.build_model(kind, cfg, params, source=source)
  return Pretrained(model, kind, cfg, source=source)


def _is_workdir(path: pathlib.Path) -> bool:
  from clipvip_jax.train.checkpoint import is_workdir
  return is_workdir(path)


def _load(path: pathlib.Path, config, step, trust_pickle: bool) -> tuple[Any, VideoRecipe, int | None]:
  from clipvip_jax import converted_checkpoint
  from clipvip_jax.params import flat_params
  if converted_checkpoint.is_converted_dir(path) or _is_workdir(path):
    if config is not None:
      raise UsageError(f"--config applies to original checkpoint files; {path} already carries its model config")
  if step is not None and not _is_workdir(path):
    raise UsageError(f"--step applies to training workdirs; {path} is not one (no checkpoints/<step>/ folder)")
  if _is_workdir(path):
    from clipvip_jax.train import checkpoint as train_checkpoint
    step_dir = train_checkpoint.resolve_step(path, step)
    kind, cfg, params = train_checkpoint.load_workdir_params(path, step)
    pretrained = _build(kind, cfg, params, str(path))
    recipe = recipe_from_run(default_recipe(kind, cfg), _run_data_config(step_dir))
    return pretrained, recipe, int(step_dir.name)
  if path.is_dir() and (path / "checkpoints").is_dir():
    raise UsageError(f"{path} is a training workdir without a finished checkpoint yet")
  if path.is_dir() and not converted_checkpoint.is_converted_dir(path) and not (path / "config.json").is_file():
    raise UsageError(f"{path} is neither a converted checkpoint (config.json + params/), a training workdir "
                     "(checkpoints/<step>/) nor an HF model directory")
  from clipvip_jax.retrieval.pretrained import load_pretrained
  pretrained = load_pretrained(path, config, trust_pickle=trust_pickle)
  if pretrained.kind == "clip":  # an image CLIP indexes videos by mean pooling its frame embeddings
    pretrained = _build("clip", pretrained.config, flat_params(pretrained.model), str(path))
  return pretrained, default_recipe(pretrained.kind, pretrained.config), None


def load_model(checkpoint: str | os.PathLike, config: str | os.PathLike | Mapping[str, Any] | None = None, *,
               step: int | str | None = None, trust_pickle: bool = False) -> RetrievalModel:
  """The model of a converted dir, training workdir, original checkpoint file or HF directory (module doc).

  config: the original's config (JSON path or dict) for an original checkpoint file; refused for converted dirs
  and workdirs, which carry theirs. step: for a workdir, a step number, "latest" (default) or "best".
  Raises UsageError (one sentence) for a missing or unreadable checkpoint.
  """
  path = pathlib.Path(checkpoint).expanduser()
  if not path.exists():
    raise UsageError(f"checkpoint {path} does not exist")
  if isinstance(config, (str, os.PathLike)) and not pathlib.Path(config).is_file():
    raise UsageError(f"config file {config} does not exist")
  try:
    pretrained, recipe, resolved_step = _load(path, config, step, trust_pickle)
  except (ValueError, OSError):
    raise  # already one clear sentence (ConversionError, ParamMismatchError, FileNotFoundError, UsageError)
  except Exception as e:  # noqa: BLE001 — an unreadable checkpoint of any kind is an input error here
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
      raise
    first_line = (str(e).strip().splitlines() or [""])[0]
    raise UsageError(f"checkpoint {path} could not be loaded ({type(e).__name__}: {first_line})") from e
  config_path = str(pathlib.Path(config).absolute()) if isinstance(config, (str, os.PathLike)) else None
  return RetrievalModel(pretrained, str(path.absolute()), recipe, resolved_step, config_path)
