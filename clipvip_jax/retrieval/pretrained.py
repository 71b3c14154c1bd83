"""The public surface: `load_pretrained(path)` -> a `Pretrained` with jitted encoders and similarity.

    import clipvip_jax
    model = clipvip_jax.load_pretrained("converted/clip-b32")   # or a workdir, an HF CLIP dir, a .pt/.bin file
    ids, mask = model.tokenize(["a dog playing fetch"])
    t = model.encode_text(ids, mask)                             # [1, D], L2-normalised
    v = model.encode_image(images)                               # images [B, H, W, 3], CLIP-normalised float
    sim = model.similarity(t, v)                                 # [1, B]

The model is split once into a graph definition and a state; every method is a `jax.jit` of a pure function of
that state (no per-call graph traversal), compiled once per input shape. Inputs may be numpy or jax arrays;
outputs are jax arrays (on the default device; `np.asarray(out)` gives numpy), so results chain into
`similarity` without a host round trip.

On GPU, XLA runs float32 matrix products in TF32 by default (about 2e-4 off PyTorch's float32 on a tiny CLIP,
measured on an H100); `jax.config.update("jax_default_matmul_precision", "highest")` restores float32 parity.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clipvip_jax import kinds
from clipvip_jax.models import layers

PathLike = str | os.PathLike


class Pretrained:
  """A loaded model: `.model` (the nnx module), `.config`, `.kind`, and jitted encode/similarity methods.

  `.state` is the parameter snapshot the jitted methods use; after changing `.model` in place (fine-tuning),
  call `refresh()`.
  """

  def __init__(self, model: nnx.Module, kind: str, config: Any, *, source: str = "",
               tokenizer_dir: PathLike | None = None):
    self.model, self.kind, self.config, self.source = model, kind, config, source
    self.tokenizer_dir = tokenizer_dir
    self._vision = kinds.find_in_config(config, "VisionConfig")
    self._text = kinds.find_in_config(config, "TextConfig")
    self._jitted: dict[str, Callable] = {}
    self.refresh()

  def refresh(self) -> None:
    """Re-split `.model` (once) after it was modified; compiled functions stay valid for same-shaped state."""
    self.graphdef, self.state = nnx.split(self.model)

  def jitted(self, method: str) -> Callable:
    """`f(state, *args)`: the model's `method` as a jitted pure function of the state (for code that keeps
    its own state, such as evaluation loops holding sharded parameters)."""
    if method not in self._jitted:
      if not callable(getattr(self.model, method, None)):
        raise AttributeError(f"a {self.kind} model has no method {method!r}")
      graphdef = self.graphdef

      def pure(state, *args):
        return getattr(nnx.merge(graphdef, state), method)(*args)

      pure.__name__ = method
      self._jitted[method] = jax.jit(pure)
    return self._jitted[method]

  # ---- input checks: one clear message before anything is traced ----

  def _check_pixels(self, x, what: str, rank: int, layout: str):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      x = np.asarray(x)
    if x.ndim != rank:
      raise ValueError(f"{what} must be {layout}, got shape {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{what} must be float (pixels already CLIP-normalised), got dtype {x.dtype}")
    v = self._vision
    if v is not None:
      h, w, c = x.shape[-3:]
      if (h, w) != (v.image_size, v.image_size) or c != v.channels:
        raise ValueError(f"{what} frames are {h}x{w}x{c}; this model takes {v.image_size}x{v.image_size}x"
                         f"{v.channels} ({layout})")
    return jnp.asarray(x, jnp.float32)

  def _check_ints(self, x, what: str, shape: tuple[int, ...] | None = None):
    if x is None:
      return None
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      x = np.asarray(x)
    if shape is not None and tuple(x.shape) != tuple(shape):
      raise ValueError(f"{what} has shape {tuple(x.shape)}, expected {tuple(shape)}")
    if not (jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == bool):
      raise ValueError(f"{what} must be an integer array, got dtype {x.dtype}")
    return jnp.asarray(x, jnp.int32)

  # ---- the public methods ----

  def encode_image(self, images) -> jax.Array:
    """images [B, H, W, 3] float32, already CLIP-normalised -> [B, D], L2-normalised."""
    images = self._check_pixels(images, "images", 4, "[batch, height, width, channels]")
    return self.jitted("encode_image")(self.state, images)

  def encode_video(self, video, frame_mask=None) -> jax.Array:
    """video [B, T, H, W, 3] float32, already CLIP-normalised; frame_mask [B, T] (1 = real frame) or None."""
    if self.kind not in kinds.VIDEO_KINDS:
      raise ValueError(f"a {self.kind} model encodes images, not videos: use encode_image")
    video = self._check_pixels(video, "video", 5, "[batch, frames, height, width, channels]")
    frame_mask = self._check_ints(frame_mask, "frame_mask", video.shape[:2])
    return self.jitted("encode_video")(self.state, video, frame_mask)

  def encode_text(self, ids, mask=None) -> jax.Array:
    """ids, mask [B, L] int (L <= the model's max_len; mask None = all ones) -> [B, D], L2-normalised."""
    ids = ids if hasattr(ids, "shape") else np.asarray(ids)
    if ids.ndim != 2:
      raise ValueError(f"ids must be [batch, length], got shape {tuple(ids.shape)}")
    ids = self._check_ints(ids, "ids")
    t = self._text
    if t is not None:
      if ids.shape[1] > t.max_len:
        raise ValueError(f"ids have length {ids.shape[1]}; this model has {t.max_len} text positions")
      lo, hi = int(ids.min()), int(ids.max())
      if lo < 0 or hi >= t.vocab_size:
        raise ValueError(f"ids span [{lo}, {hi}], outside this model's vocabulary of {t.vocab_size}")
    mask = jnp.ones_like(ids) if mask is None else self._check_ints(mask, "mask", ids.shape)
    return self.jitted("encode_text")(self.state, ids, mask)

  def similarity(self, text, visual) -> jax.Array:
    """text [Nt, D], visual [Nv, D] embeddings (from the encode_* methods) -> [Nt, Nv]: cosine similarity for
    clip and clipvip, the original's inference logits for clip2video."""
    text, visual = jnp.asarray(text), jnp.asarray(visual)
    if text.ndim != 2 or visual.ndim != 2 or text.shape[-1] != visual.shape[-1]:
      raise ValueError(f"similarity takes text [Nt, D] and visual [Nv, D]; got {tuple(text.shape)} and "
                       f"{tuple(visual.shape)}")
    if callable(getattr(self.model, "similarity", None)):
      return self.jitted("similarity")(self.state, text, visual)
    return _cosine(text, visual)

  def tokenize(self, texts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) int32 [N, max_len] as the original CLIP tokenizer lays them out, at this model's max_len."""
    from clipvip_jax.tokenizer import tokenize
    max_len = self._text.max_len if self._text is not None else 77
    return tokenize(texts, max_len=max_len, tokenizer_dir=self.tokenizer_dir)

  def __repr__(self) -> str:
    return f"Pretrained(kind={self.kind!r}, source={self.source!r})"


@jax.jit
def _cosine(text: jax.Array, visual: jax.Array) -> jax.Array:
  return jnp.dot(text.astype(jnp.float32), visual.astype(jnp.float32).T)


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def check_compute_options(cfg: Any) -> None:
  """Fails up front on dtype/attention choices that would only fail inside the first compiled call."""
  clip_cfg = kinds.find_in_config(cfg, "CLIPConfig")
  if clip_cfg is None:
    return
  if clip_cfg.dtype not in COMPUTE_DTYPES:
    raise ValueError(f"dtype {clip_cfg.dtype!r} is not one of {COMPUTE_DTYPES}")
  layers.check_attention(clip_cfg.attention)
  if clip_cfg.attention == "cudnn":
    # cuDNN's fused attention (jax.nn.dot_product_attention) has no float32 kernel and needs head dims that are
    # multiples of 8 up to 256; checked on an H100 with jax 0.11.
    if clip_cfg.dtype == "float32":
      raise ValueError("attention='cudnn' needs dtype='bfloat16' or 'float16' (cuDNN has no float32 attention)")
    for name, tower in (("vision", clip_cfg.vision), ("text", clip_cfg.text)):
      head_dim = tower.width // tower.heads
      if head_dim % 8 or head_dim > 256:
        raise ValueError(f"attention='cudnn' needs head dims that are multiples of 8 up to 256; the {name} "
                         f"tower has {tower.width} / {tower.heads} heads = {head_dim}")


def from_loaded(loaded: Any, *, dtype: str = "float32", attention: str | None = None,
                video: bool = False) -> Pretrained:
  """A Pretrained of a `clipvip_jax.loading.Loaded`; `video`: with the model that encodes videos from these
  parameters (a plain CLIP: meanP's frame mean pooling, kinds.video_kind), keeping the checkpoint's kind."""
  overrides = {"dtype": dtype} | ({"attention": attention} if attention is not None else {})
  cfg = kinds.replace_in_config(loaded.config, **overrides)
  check_compute_options(cfg)
  model_kind = kinds.video_kind(loaded.kind) if video else loaded.kind
  model = kinds.build_model(model_kind, cfg, loaded.params, source=loaded.path)
  return Pretrained(model, loaded.kind, cfg, source=loaded.path, tokenizer_dir=loaded.tokenizer_dir)


def load_pretrained(path: PathLike, config: Mapping[str, Any] | PathLike | None = None, *,
                    step: int | str | None = None, dtype: str = "float32", attention: str | None = None,
                    format: str | None = None, trust_pickle: bool = False) -> Pretrained:
  """A ready-to-use model from any checkpoint `clipvip_jax.loading.load_checkpoint` reads: a converted directory,
  a training workdir (`step`: a number, "latest" or "best"), an HF CLIP directory or a PyTorch checkpoint file.

  Everything the weights determine (widths, layers, patch and image size, proxies, ...) comes from them;
  `config` (a dict or a JSON path, in the original's own format: an HF CLIPConfig dict, possibly under
  "clip_config", or CLIP2Video's options) supplies the rest of an original's, such as head counts. An HF
  directory's own config.json is used when `config` is None. `dtype` is the compute dtype ("float32" or
  "bfloat16"; parameters stay float32), `attention` the jax.nn.dot_product_attention implementation ("xla",
  "cudnn"; None keeps the config's), `format` forces a checkpoint layout (see clipvip_jax.convert.formats.FORMATS).
  """
  from clipvip_jax.loading import load_checkpoint
  loaded = load_checkpoint(path, config, step=step, format=format, trust_pickle=trust_pickle)
  return from_loaded(loaded, dtype=dtype, attention=attention)
