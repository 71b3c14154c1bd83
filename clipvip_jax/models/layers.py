"""Transformer building blocks shared by every model in the project.

Parameters are float32 `nnx.Param`s annotated with logical axis names ("embed", "mlp", "heads", "kv", "vocab", ...);
`clipvip_jax.train.sharding` maps those names to mesh axes, so changing the parallelism is a config edit.
Computation runs in `dtype` (float32, or bfloat16 for training); LayerNorm statistics and softmax stay in float32.

Kernel layouts (what the converters produce):
  Dense.kernel            [in, out]
  MultiHeadAttention.query/key/value.kernel [embed, heads, kv], .bias [heads, kv]
  MultiHeadAttention.out.kernel             [heads, kv, embed], .bias [embed]
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
# (q, k, v) -> out, all [batch, seq, heads, head_dim]. Lets a model swap in its own attention pattern
# (CLIP-ViP's proxy-guided attention, masked temporal attention) without re-writing the block.
AttentionFn = Callable[[Array, Array, Array], Array]


def param(value: Array, names: Sequence[str | None]) -> nnx.Param:
  """A float32 parameter carrying logical axis names; sharded later by the trainer, never eagerly."""
  return nnx.Param(value, sharding_names=tuple(names), eager_sharding=False)


def normal_init(rngs: nnx.Rngs, shape: Sequence[int], std: float) -> Array:
  return std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)


def quick_gelu(x: Array) -> Array:
  # CLIP's activation: x * sigmoid(1.702 x).
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


class Dense(nnx.Module):
  """y = x @ kernel (+ bias); kernel [in, out]."""

  def __init__(self, din: int, dout: int, names: tuple[str | None, str | None], *, rngs: nnx.Rngs,
               use_bias: bool = True, std: float | None = None, dtype=jnp.float32):
    std = din**-0.5 if std is None else std
    self.kernel = param(normal_init(rngs, (din, dout), std), names)
    self.bias = param(jnp.zeros((dout,), jnp.float32), names[1:]) if use_bias else None
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in float32, output in the input dtype."""

  def __init__(self, dim: int, *, eps: float = 1e-5, name: str = "embed"):
    self.scale = param(jnp.ones((dim,), jnp.float32), (name,))
    self.bias = param(jnp.zeros((dim,), jnp.float32), (name,))
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
    return y.astype(x.dtype)


class HeadProjection(nnx.Module):
  """x [..., embed] -> [..., heads, kv]: the q, k or v projection, kept 3-D so heads can be sharded."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    head_dim = width // heads
    self.kernel = param(normal_init(rngs, (width, heads, head_dim), width**-0.5), ("embed", "heads", "kv"))
    self.bias = param(jnp.zeros((heads, head_dim), jnp.float32), ("heads", "kv"))
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    y = jnp.einsum("...d,dnh->...nh", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    return y + self.bias[...].astype(self.dtype)


class OutProjection(nnx.Module):
  """[..., heads, kv] -> [..., embed]."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    head_dim = width // heads
    self.kernel = param(normal_init(rngs, (heads, head_dim, width), width**-0.5), ("heads", "kv", "embed"))
    self.bias = param(jnp.zeros((width,), jnp.float32), ("embed",))
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    y = jnp.einsum("...nh,nhd->...d", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    return y + self.bias[...].astype(self.dtype)


def dot_product_attention(q: Array, k: Array, v: Array, *, mask: Array | None = None, bias: Array | None = None,
                          implementation: str | None = None) -> Array:
  """softmax(q k^T / sqrt(d) + bias, masked) v on [batch, seq, heads, head_dim] tensors.

  `implementation`: None/"xla" (portable default) or "cudnn" (fused flash attention on NVIDIA GPUs). The softmax is
  computed in float32 by XLA's implementation even for bfloat16 inputs.
  """
  impl = None if implementation in (None, "xla", "auto") else implementation
  if implementation == "xla":
    impl = "xla"
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation=impl)


class MultiHeadAttention(nnx.Module):
  """Self-attention with separate q/k/v projections; the attention pattern comes from `attention_fn`."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    if width % heads:
      raise ValueError(f"attention width {width} is not divisible by {heads} heads")
    self.query = HeadProjection(width, heads, rngs=rngs, dtype=dtype)
    self.key = HeadProjection(width, heads, rngs=rngs, dtype=dtype)
    self.value = HeadProjection(width, heads, rngs=rngs, dtype=dtype)
    self.out = OutProjection(width, heads, rngs=rngs, dtype=dtype)

  def __call__(self, x: Array, attention_fn: AttentionFn) -> Array:
    o = attention_fn(self.query(x), self.key(x), self.value(x))
    return self.out(o)


class MLP(nnx.Module):
  def __init__(self, width: int, mlp_dim: int, act: str, *, rngs: nnx.Rngs, dtype=jnp.float32):
    if act not in ACTIVATIONS:
      raise ValueError(f"unknown activation {act!r}; known: {sorted(ACTIVATIONS)}")
    self.fc1 = Dense(width, mlp_dim, ("embed", "mlp"), rngs=rngs, dtype=dtype)
    self.fc2 = Dense(mlp_dim, width, ("mlp", "embed"), rngs=rngs, dtype=dtype)
    self.act = act

  def __call__(self, x: Array) -> Array:
    return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class ResidualBlock(nnx.Module):
  """Pre-LN transformer block: x += attn(ln_1(x)); x += mlp(ln_2(x))."""

  def __init__(self, width: int, heads: int, mlp_dim: int, *, act: str = "quick_gelu", eps: float = 1e-5,
               rngs: nnx.Rngs, dtype=jnp.float32):
    self.ln_1 = LayerNorm(width, eps=eps)
    self.attn = MultiHeadAttention(width, heads, rngs=rngs, dtype=dtype)
    self.ln_2 = LayerNorm(width, eps=eps)
    self.mlp = MLP(width, mlp_dim, act, rngs=rngs, dtype=dtype)

  def __call__(self, x: Array, attention_fn: AttentionFn) -> Array:
    x = x + self.attn(self.ln_1(x), attention_fn)
    return x + self.mlp(self.ln_2(x))


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Encoder(nnx.Module):
  """A stack of residual blocks, optionally rematerialised per block to trade compute for activation memory."""

  def __init__(self, width: int, layers: int, heads: int, mlp_dim: int, *, act: str = "quick_gelu",
               eps: float = 1e-5, remat: str = "none", rngs: nnx.Rngs, dtype=jnp.float32):
    if remat not in REMAT_POLICIES:
      raise ValueError(f"unknown remat policy {remat!r}; known: {sorted(REMAT_POLICIES)}")
    self.blocks = nnx.List([
        ResidualBlock(width, heads, mlp_dim, act=act, eps=eps, rngs=rngs, dtype=dtype) for _ in range(layers)
    ])
    self.remat = remat

  def __call__(self, x: Array, attention_fn: AttentionFn) -> Array:
    for block in self.blocks:
      if self.remat == "none":
        x = block(x, attention_fn)
      else:
        x = nnx.remat(lambda b, y: b(y, attention_fn), policy=REMAT_POLICIES[self.remat])(block, x)
    return x
