"""CLIP4Clip / CLIP2Video temporal modules over per-frame CLIP embeddings F [B, T, D].

- `TemporalTransformer`: CLIP4Clip's "seqTransf" transformer (`module_cross.Transformer`): pre-LN blocks with
  QuickGELU, LayerNorm eps 1e-12 (BERT's, not CLIP's 1e-5), additive (1 - m) * -1e6 key padding masks.
- `TemporalDifferenceBlock` (TDB): difference tokens between adjacent frames, encoded and squashed to (-1, 1),
  interleaved with the frame tokens, with frame position and frame/difference type embeddings.
- `TemporalAlignmentBlock` (TAB): tokens softly assigned to K shared centres; residuals to the centres summed
  over valid tokens, L2-normalised per centre, averaged, L2-normalised.
- `mean_pool_frames` (meanP, from models/meanp.py): L2 per frame, masked mean, L2.

Padded frames: masks are key masks everywhere and masked tokens are left out of every pooling, but a difference
token d_i = f_{i+1} - f_i carries frame i's mask (spec TDB step 3), so the difference between the last valid frame
and the first padded one counts, exactly as in the original; parity therefore needs padded frames to be what the
original feeds (zero images), which is what the data pipeline produces.

Masks are batch-major: sample b's key mask only ever reaches sample b's attention rows. The original repeats
its [B, S, S] masks head-major for a [B * heads] batch, so a sample can receive another sample's mask when frame
masks differ within a batch; that defect is deliberately not reproduced.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from clipvip_jax.models import layers
from clipvip_jax.models.clip import l2_normalize
from clipvip_jax.models.meanp import mean_pool_frames

Array = jax.Array

TEMPORAL_EPS = 1e-12  # module_cross.LayerNorm (BERT's) in every temporal transformer block
MASK_VALUE = -1e6  # the original's additive key-mask value
# CLIP2Video's temporal_proj options: how a difference token is encoded before the (-1, 1) squashing.
DIFFERENCE_ENCODINGS = ("sigmoid_selfA", "sigmoid_mlp", "default")

__all__ = ["TemporalTransformer", "TemporalDifferenceBlock", "TemporalAlignmentBlock", "key_padding_bias",
           "interleave", "mean_pool_frames", "DIFFERENCE_ENCODINGS"]


def key_padding_bias(mask: Array) -> Array:
  """[B, S] (1 = attend) -> additive bias [B, 1, 1, S] = (1 - m) * -1e6, broadcast over heads and queries.

  Additive rather than boolean on purpose: when every key of a sample is masked the original still attends
  (uniformly shifted scores), and the outputs of those (masked) tokens then match it too.
  """
  return ((1.0 - mask.astype(jnp.float32)) * MASK_VALUE)[:, None, None, :]


class TemporalTransformer(layers.Encoder):
  """CLIP4Clip's temporal transformer (`transformerClip`, `frame2t_attention`, `actionClip` in CLIP2Video).

  x [B, S, width] and a key mask [B, S] -> [B, S, width]. Parameters: blocks/N/{ln_1, attn, ln_2, mlp}.
  """

  def __init__(self, width: int, num_layers: int, heads: int, mlp_dim: int, *, eps: float = TEMPORAL_EPS,
               remat: str = "auto", scan_layers: bool = False, rngs: nnx.Rngs, dtype=jnp.float32):
    super().__init__(width, num_layers, heads, mlp_dim, act="quick_gelu", eps=eps, remat=remat,
                     scan_layers=scan_layers, rngs=rngs, dtype=dtype)

  def __call__(self, x: Array, mask: Array) -> Array:  # type: ignore[override]
    attention = functools.partial(layers.dot_product_attention, bias=key_padding_bias(mask).astype(x.dtype),
                                  implementation="xla")
    return super().__call__(x, attention)


def interleave(frames: Array, differences: Array) -> Array:
  """[f0, d0, f1, d1, ..., d_{T-2}, f_{T-1}] along axis 1: frames [B, T, ...], differences [B, T-1, ...]."""
  t = frames.shape[1]
  if differences.shape[1] != t - 1:
    raise ValueError(f"interleave needs T-1 = {t - 1} differences, got {differences.shape[1]}")
  pairs = jnp.stack([frames[:, :-1], differences], axis=2)  # [B, T-1, 2, ...]
  pairs = pairs.reshape((pairs.shape[0], 2 * (t - 1)) + pairs.shape[3:])
  return jnp.concatenate([pairs, frames[:, -1:]], axis=1)


class TemporalDifferenceBlock(nnx.Module):
  """CLIP2Video's TDB: frame tokens interleaved with difference-enhanced tokens, ready for a temporal transformer.

  Parameters (original names): `type_embedding` [2, D] (type_position_embeddings: row 1 frames, row 0
  differences); for `encoding` "sigmoid_selfA" `attention` (frame2t_attention, a 1-layer TemporalTransformer) and
  for "sigmoid_mlp" `projection` [D, D] (frame2t_projection, x @ W); `norm` (trans_layernorm, eps 1e-5) for both.
  """

  def __init__(self, width: int, heads: int, mlp_dim: int, *, encoding: str = "sigmoid_selfA",
               attention_layers: int = 1, eps: float = TEMPORAL_EPS, norm_eps: float = 1e-5, remat: str = "auto",
               scan_layers: bool = False, rngs: nnx.Rngs, dtype=jnp.float32):
    if encoding not in DIFFERENCE_ENCODINGS:
      raise ValueError(f"unknown TDB difference encoding (temporal_proj) {encoding!r}; known: {DIFFERENCE_ENCODINGS}")
    self.encoding = encoding
    self.type_embedding = layers.param(layers.normal_init(rngs, (2, width), 0.02), (None, "embed"))
    self.attention = (TemporalTransformer(width, attention_layers, heads, mlp_dim, eps=eps, remat=remat,
                                          scan_layers=scan_layers, rngs=rngs, dtype=dtype)
                      if encoding == "sigmoid_selfA" else None)
    self.projection = (layers.Dense(width, width, ("embed", "embed"), use_bias=False, std=64**-0.5,
                                    rngs=rngs, dtype=dtype) if encoding == "sigmoid_mlp" else None)
    self.norm = layers.LayerNorm(width, eps=norm_eps) if encoding != "default" else None

  def difference_tokens(self, frames: Array, mask: Array, positions: Array) -> Array:
    """D = F[1:] - F[:-1], encoded (spec step 2): [B, T-1, D]. positions [T, D] are the frames' positions."""
    d = frames[:, 1:] - frames[:, :-1]
    if self.encoding == "sigmoid_selfA":
      # Positions of the *right* frame here (P[1:T]), unlike the interleaved sequence below.
      d = self.attention(d + positions[1:].astype(d.dtype), mask[:, 1:])
      d = 2 * jax.nn.sigmoid(self.norm(d)) - 1
    elif self.encoding == "sigmoid_mlp":
      d = 2 * jax.nn.sigmoid(self.norm(self.projection(d))) - 1
    return d

  def __call__(self, frames: Array, mask: Array, positions: Array) -> tuple[Array, Array]:
    """frames [B, T, D], mask [B, T], positions [T, D] -> (tokens [B, 2T-1, D] with position and type embeddings
    added, token mask [B, 2T-1]). Difference token d_i takes frame i's position and mask (spec step 3)."""
    _, t, width = frames.shape
    dtype = frames.dtype
    frame_type = self.type_embedding[1].astype(dtype)
    if t == 1:  # no differences: a lone frame token
      return frames + positions[:1].astype(dtype) + frame_type, mask
    d = self.difference_tokens(frames, mask, positions).astype(dtype)
    tokens = interleave(frames, d)
    # Positions and types are the same for every clip: built for one ([1, 2T-1, D]) and broadcast by the sum, which
    # keeps the batch dimension out of them (an exported graph's batch is symbolic; clipvip_jax.export).
    pos = interleave(positions.astype(dtype)[None], positions[:-1].astype(dtype)[None])
    types = interleave(jnp.broadcast_to(frame_type, (1, t, width)),
                       jnp.broadcast_to(self.type_embedding[0].astype(dtype), (1, t - 1, width)))
    return tokens + pos + types, interleave(mask, mask[:, :-1])


class TemporalAlignmentBlock(nnx.Module):
  """CLIP2Video's TAB aggregation, shared by video and text tokens.

  `weight_center` [K, D] (assignment logits x . c_k), `emb_center` [K, D] (the centres residuals are taken to);
  both N(0, 64^-0.5) as the original initialises them.
  """

  def __init__(self, width: int, num_centers: int, *, rngs: nnx.Rngs):
    self.weight_center = layers.param(layers.normal_init(rngs, (num_centers, width), 64**-0.5), (None, "embed"))
    self.emb_center = layers.param(layers.normal_init(rngs, (num_centers, width), 64**-0.5), (None, "embed"))

  def __call__(self, tokens: Array, mask: Array) -> Array:
    """tokens [B, N, D], mask [B, N] -> [B, D], L2-normalised.

    a_nk = softmax_k(x_n . w_k); r_k = sum_n m_n a_nk (x_n - e_k); v = L2(mean_k L2(r_k)). In float32.
    """
    x = tokens.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    assign = jax.nn.softmax(jnp.einsum("bnd,kd->bnk", x, self.weight_center[...], precision=hi), axis=-1)
    assign = assign * mask.astype(jnp.float32)[..., None]
    residuals = x[:, :, None, :] - self.emb_center[...][None, None]  # [B, N, K, D]
    r = jnp.einsum("bnk,bnkd->bkd", assign, residuals, precision=hi)
    return l2_normalize(l2_normalize(r).mean(axis=1))
