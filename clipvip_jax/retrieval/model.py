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
import os
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from clipvip_jax import kinds


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
    return kinds.max_frames(self.kind, self.pretrained.config)

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
  """The test-time recipe of the model's original (module docstring; the kind's registry entry)."""
  image_size = kinds.find_in_config(config, "VisionConfig").image_size
  text_len = kinds.find_in_config(config, "TextConfig").max_len
  frames, sampling, resize_mode, target_fps = kinds.recipe_values(kind, config)
  return VideoRecipe(frames, image_size, sampling, resize_mode, target_fps, text_len)


def _run_data_config(run_config: Mapping[str, Any] | None) -> dict[str, Any]:
  """The data settings a training run evaluated with: config.data updated by config.eval.data (as the trainer's
  evaluator builds them); {} when the checkpoint carries no run config."""
  if not run_config:
    return {}
  data = dict(run_config.get("data") or {})
  data.update((run_config.get("eval") or {}).get("data") or {})
  return data


def recipe_from_run(recipe: VideoRecipe, data: Mapping[str, Any]) -> VideoRecipe:
  fields = {f.name for f in dataclasses.fields(VideoRecipe)}
  return dataclasses.replace(recipe, **{k: v for k, v in data.items() if k in fields})


def _load(path: pathlib.Path, config, step, trust_pickle: bool,
          attention: str | None = None) -> tuple[Any, VideoRecipe, int | None]:
  from clipvip_jax.loading import load_checkpoint
  from clipvip_jax.retrieval.pretrained import from_loaded
  loaded = load_checkpoint(path, config, step=step, trust_pickle=trust_pickle)
  # video=True: an image CLIP indexes videos by mean pooling its frames
  pretrained = from_loaded(loaded, video=True, attention=attention)
  recipe = recipe_from_run(default_recipe(loaded.kind, loaded.config), _run_data_config(loaded.run_config))
  return pretrained, recipe, loaded.step


def load_model(checkpoint: str | os.PathLike, config: str | os.PathLike | Mapping[str, Any] | None = None, *,
               step: int | str | None = None, trust_pickle: bool = False,
               attention: str | None = None) -> RetrievalModel:
  """The model of a converted dir, training workdir, original checkpoint file or HF directory (module doc).

  config: the original's config (JSON path or dict) for an original checkpoint file; refused for converted dirs
  and workdirs, which carry theirs. step: for a workdir, a step number, "latest" (default) or "best". attention:
  the implementation to build with (None: the checkpoint config's; the export command asks for "xla", portable).
  A missing or unreadable checkpoint raises a ValueError of one sentence (clipvip_jax.loading).
  """
  path = pathlib.Path(checkpoint).expanduser()
  pretrained, recipe, resolved_step = _load(path, config, step, trust_pickle, attention)
  config_path = str(pathlib.Path(config).absolute()) if isinstance(config, (str, os.PathLike)) else None
  return RetrievalModel(pretrained, str(path.absolute()), recipe, resolved_step, config_path)
