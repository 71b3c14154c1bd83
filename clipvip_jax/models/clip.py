"""CLIP's two towers (ViT image encoder, causal text transformer) as Flax NNX modules.

Parameter names follow the HF `CLIPModel` layout closely (pre_layrnorm, post_layernorm, final_layer_norm,
visual_projection, text_projection) so the converters stay one-to-one tables.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from clipvip_jax.models import layers

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  patch_size: int = 32
  image_size: int = 224
  channels: int = 3
  act: str = "quick_gelu"
  eps: float = 1e-5
  # Std of the position embedding's random init. 0.02 is the HF initializer_range (a pretrained checkpoint
  # overwrites it anyway). Trained from scratch, 0.02 leaves positions ~15x smaller than the patch embeddings and
  # the model barely sees where things are; the demo uses 1.0 (order of the patch embeddings) to learn motion.
  position_init_std: float = 0.02

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid * self.grid


@dataclasses.dataclass(frozen=True)
class TextConfig:
  width: int = 512
  layers: int = 12
  heads: int = 8
  mlp_dim: int = 2048
  vocab_size: int = 49408
  max_len: int = 77
  act: str = "quick_gelu"
  eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Everything that fixes a CLIP model's shapes and numerics (not its weights)."""
  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  projection_dim: int = 512
  logit_scale_init: float = 2.6592  # ln(1/0.07), CLIP's initial temperature
  dtype: str = "float32"  # compute dtype; parameters are always float32
  attention: str = "xla"  # layers.ATTENTION_IMPLEMENTATIONS: "xla", "cudnn" (NVIDIA), "pallas" (TPU) or "auto"
  remat: str = "auto"  # layers.REMAT_CHOICES; "auto" = the fastest measured for the backend (layers.AUTO_REMAT)
  scan_layers: bool = False  # run each tower's blocks with jax.lax.scan (layers.Encoder); same parameters

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown CLIP config key(s) {sorted(unknown)}; known: {sorted(known)}")
    vision = _sub_config(VisionConfig, d.pop("vision", {}), "vision")
    text = _sub_config(TextConfig, d.pop("text", {}), "text")
    return cls(vision=vision, text=text, **d)

  def replace(self, **kw) -> "CLIPConfig":
    return dataclasses.replace(self, **kw)


def _sub_config(cls, d, where: str):
  if isinstance(d, cls):
    return d
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = set(d) - known
  if unknown:
    raise ValueError(f"unknown {where} config key(s) {sorted(unknown)}; known: {sorted(known)}")
  return cls(**d)


# Variant names are decoded here and nowhere else.
VARIANTS: dict[str, CLIPConfig] = {
    "B/32": CLIPConfig(vision=VisionConfig(patch_size=32)),
    "B/16": CLIPConfig(vision=VisionConfig(patch_size=16)),
    "L/14": CLIPConfig(
        vision=VisionConfig(width=1024, layers=24, heads=16, mlp_dim=4096, patch_size=14),
        text=TextConfig(width=768, layers=12, heads=12, mlp_dim=3072),
        projection_dim=768),
    # A few-hundred-k-parameter model for tests and the CPU demo.
    "tiny": CLIPConfig(
        vision=VisionConfig(width=64, layers=2, heads=4, mlp_dim=128, patch_size=8, image_size=32),
        text=TextConfig(width=48, layers=2, heads=4, mlp_dim=96, vocab_size=49408, max_len=16),
        projection_dim=32),
}


def clip_config(variant: str, **overrides) -> CLIPConfig:
  if variant not in VARIANTS:
    raise ValueError(f"unknown CLIP variant {variant!r}; known: {sorted(VARIANTS)}")
  return VARIANTS[variant].replace(**overrides) if overrides else VARIANTS[variant]


def l2_normalize(x: Array, axis: int = -1, eps: float = 1e-12) -> Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


# The patch embedding's (forward, input gradient, kernel gradient) einsums for layers.project.
PATCH_EQS = ("bhpwqc,pqcd->bhwd", "bhwd,pqcd->bhpwqc", "bhpwqc,bhwd->pqcd")
# How each platform computes it (by the build target, as "auto" attention and remat are). TPU: a strided
# convolution, which the TPU's convolution emitter patchifies in place; the einsum there relaid every frame out
# into a lane-padded layout first (on v6e the step's most expensive op: docs/performance.md section 4,
# "The patch embedding on TPU"). CPU and GPU: the einsum (XLA:CPU's convolution is 2-4x slower here).
AUTO_PATCH_PRODUCT = {"tpu": "conv"}


def _conv_forward(x: Array, kernel: Array) -> Array:
  """[B, H, W, C] x [p, p, C, D] -> [B, H/p, W/p, D]: Conv2d with kernel = stride = p."""
  p = kernel.shape[0]
  return jax.lax.conv_general_dilated(x, kernel, (p, p), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv_input_grad(g: Array, kernel: Array) -> Array:
  b, h, w, _ = g.shape
  p, _, c, _ = kernel.shape
  x = jax.ShapeDtypeStruct((b, h * p, w * p, c), g.dtype)
  return jax.linear_transpose(lambda x: _conv_forward(x, kernel), x)(g)[0]


def _conv_kernel_grad(x: Array, g: Array) -> Array:
  """dk[a, b, c, d] = sum over n, i, j of x[n, i*p + a, j*p + b, c] * g[n, i, j, d], summed in float32: a
  convolution of the frames (batch <-> channel roles swapped) with the output gradient dilated by p."""
  p = x.shape[1] // g.shape[1]
  return jax.lax.conv_general_dilated(x, g, (1, 1), "VALID", rhs_dilation=(p, p),
                                      dimension_numbers=("CHWN", "IHWO", "HWNC"),
                                      preferred_element_type=jnp.float32)


PATCH_CONV = layers.Product(_conv_forward, _conv_input_grad, _conv_kernel_grad)


def resolve_patch_product() -> str:
  """"conv" or "einsum": how a patch embedding built now (for `layers.current_target()`) computes."""
  return AUTO_PATCH_PRODUCT.get(layers.current_target().platform, "einsum")


class PatchEmbedding(nnx.Module):
  """Conv2d(kernel = stride = patch, no bias): patchify + einsum on CPU/GPU, a strided convolution on TPU (the
  same sum either way; `AUTO_PATCH_PRODUCT`)."""

  def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    p, c = cfg.patch_size, cfg.channels
    # std 0.02 as HF CLIP initialises it: patch content then does not drown the position and temporal signal.
    self.kernel = layers.param(layers.normal_init(rngs, (p, p, c, cfg.width), 0.02),
                               (None, None, None, "embed"))
    self.patch_size = p
    self.dtype = dtype
    self.product = resolve_patch_product()

  def __call__(self, images: Array) -> Array:
    """images [B, H, W, C] -> patch tokens [B, (H/p)*(W/p), width], row-major over the grid (as Conv2d+flatten)."""
    b, h, w, c = images.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    names = (None, None, None, "embed")
    if self.product == "conv":
      x = layers.project(images.astype(self.dtype), self.kernel[...], None, PATCH_CONV, self.dtype, names)
    else:
      x = images.astype(self.dtype).reshape(b, h // p, p, w // p, p, c)
      x = layers.project(x, self.kernel[...], None, PATCH_EQS, self.dtype, names)
    return x.reshape(b, (h // p) * (w // p), -1)


def full_attention(implementation: str, mask: Array | None = None) -> layers.AttentionFn:
  return functools.partial(layers.dot_product_attention, mask=mask, implementation=implementation)


class VisionTower(nnx.Module):
  """CLIP ViT: [CLS] + patches + positions -> pre_layrnorm -> encoder -> post_layernorm(CLS) -> projection."""

  def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
    v, dtype = cfg.vision, jnp.dtype(cfg.dtype)
    self.cfg = cfg
    self.attention = layers.resolve_attention(cfg.attention)  # "auto" -> this build target's implementation
    self.patch_embedding = PatchEmbedding(v, rngs=rngs, dtype=dtype)
    self.class_embedding = layers.param(layers.normal_init(rngs, (v.width,), v.width**-0.5), ("embed",))
    self.position_embedding = layers.param(
        layers.normal_init(rngs, (1 + v.num_patches, v.width), v.position_init_std), (None, "embed"))
    self.pre_layrnorm = layers.LayerNorm(v.width, eps=v.eps)
    self.encoder = layers.Encoder(v.width, v.layers, v.heads, v.mlp_dim, act=v.act, eps=v.eps, remat=cfg.remat,
                                  scan_layers=cfg.scan_layers, rngs=rngs, dtype=dtype)
    self.post_layernorm = layers.LayerNorm(v.width, eps=v.eps)
    self.projection = layers.Dense(v.width, cfg.projection_dim, ("embed", "proj"), use_bias=False, rngs=rngs,
                                   dtype=dtype)

  def embed_tokens(self, images: Array) -> Array:
    x = self.patch_embedding(images)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    return x + self.position_embedding[...].astype(x.dtype)

  def __call__(self, images: Array) -> dict[str, Array]:
    """images [B, H, W, 3], already CLIP-normalised -> {"last_hidden", "pooled", "embeds" (unnormalised)}."""
    x = self.pre_layrnorm(self.embed_tokens(images))
    x = self.encoder(x, full_attention(self.attention))
    pooled = self.post_layernorm(x[:, 0])
    return {"last_hidden": x, "pooled": pooled, "embeds": self.projection(pooled)}


def text_attention_mask(mask: Array | None, length: int) -> Array:
  """Causal mask, plus a key padding mask when `mask` [B, L] is given: [B or 1, 1, L, L] boolean."""
  causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
  if mask is None:
    return causal
  return causal & (mask[:, None, None, :] > 0)


class TextTower(nnx.Module):
  """CLIP text transformer; pooled at argmax(ids), the first end-of-text token (the highest id)."""

  def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
    t, dtype = cfg.text, jnp.dtype(cfg.dtype)
    self.cfg = cfg
    self.attention = layers.resolve_attention(cfg.attention)
    self.token_embedding = layers.param(layers.normal_init(rngs, (t.vocab_size, t.width), 0.02), ("vocab", "embed"))
    self.position_embedding = layers.param(layers.normal_init(rngs, (t.max_len, t.width), 0.01), (None, "embed"))
    self.encoder = layers.Encoder(t.width, t.layers, t.heads, t.mlp_dim, act=t.act, eps=t.eps, remat=cfg.remat,
                                  scan_layers=cfg.scan_layers, rngs=rngs, dtype=dtype)
    self.final_layer_norm = layers.LayerNorm(t.width, eps=t.eps)
    self.projection = layers.Dense(t.width, cfg.projection_dim, ("embed", "proj"), use_bias=False, rngs=rngs,
                                   dtype=dtype)

  def __call__(self, ids: Array, mask: Array | None = None) -> dict[str, Array]:
    """ids, mask [B, L] (L <= max_len) -> {"last_hidden" (after final_layer_norm), "pooled", "embeds"}."""
    _, length = ids.shape
    if length > self.cfg.text.max_len:
      raise ValueError(f"text length {length} exceeds the model's {self.cfg.text.max_len} positions")
    dtype = jnp.dtype(self.cfg.dtype)
    x = jnp.take(self.token_embedding[...], ids, axis=0).astype(dtype)
    x = x + self.position_embedding[:length].astype(dtype)
    x = self.encoder(x, full_attention(self.attention, text_attention_mask(mask, length)))
    x = self.final_layer_norm(x)
    # take_along_axis rather than x[arange(b), argmax]: the same gather, without an iota of the batch size
    # (an exported graph's symbolic batch; clipvip_jax.export)
    pooled = jnp.take_along_axis(x, jnp.argmax(ids, axis=-1)[:, None, None], axis=1)[:, 0]
    return {"last_hidden": x, "pooled": pooled, "embeds": self.projection(pooled)}


class CLIP(nnx.Module):
  """Image-text CLIP: the two towers and the learnable temperature."""

  def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.vision = VisionTower(cfg, rngs=rngs)
    self.text = TextTower(cfg, rngs=rngs)
    self.logit_scale = layers.param(jnp.asarray(cfg.logit_scale_init, jnp.float32), ())

  def encode_image(self, images: Array) -> Array:
    return l2_normalize(self.vision(images)["embeds"])

  def encode_text(self, ids: Array, mask: Array | None = None) -> Array:
    return l2_normalize(self.text(ids, mask)["embeds"])

  def similarity(self, text: Array, visual: Array) -> Array:
    """Raw cosine similarity [N_text, N_visual] of L2-normalised embeddings (evaluation uses no temperature)."""
    return text @ visual.T

  def __call__(self, images: Array, ids: Array, mask: Array | None = None) -> dict[str, Array]:
    return {"image": self.encode_image(images), "text": self.encode_text(ids, mask),
            "logit_scale": self.logit_scale[...]}
