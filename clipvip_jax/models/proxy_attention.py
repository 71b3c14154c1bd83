"""CLIP-ViP's proxy-guided attention, computed block-sparse, plus the dense masked reference.

Token layout (see docs/spec): [M proxies | frame 0's L patches | frame 1's L patches | ...], S = M + T*L.
The original's pattern, allowed(q, k) = q < M or k < M or frame(q) == frame(k), is two dense attentions:
  * proxy queries [M] against all S keys (small: M rows);
  * patch queries of frame n [L] against [M proxies + frame n's L patches], batched over the B*T frames.
That costs M*S + T*(M+L)*L scores instead of S^2, and never builds an S x S mask. Both parts are plain
`jax.nn.dot_product_attention` calls on [batch, seq, heads, head_dim] tensors, so "xla" and "cudnn" both apply;
"pallas" (TPU) runs the whole pattern, clip by clip, in one kernel (models/proxy_attention_kernel.py).

frame_mask (this project's extension; the original has no padding mask in the vision tower): [B, T], 1 for a real
frame, 0 for padding. Padded frames' patches are removed from the proxies' keys, so nothing in a padded frame reaches
proxy 0 (the video embedding); a padded frame's own patch queries still attend to the proxies and their own frame,
which keeps every softmax row non-empty. An all-ones mask gives exactly the unmasked result.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from clipvip_jax.models import layers

Array = jax.Array
PATTERNS = ("block_sparse", "dense")


def _patches_per_frame(seq_len: int, num_proxies: int, num_frames: int) -> int:
  patches = seq_len - num_proxies
  if num_frames < 1 or patches < 0 or patches % num_frames:
    raise ValueError(f"sequence of {seq_len} tokens is not {num_proxies} proxies + {num_frames} frames of equal size")
  return patches // num_frames


def _proxy_key_mask(frame_mask: Array, num_proxies: int, patches: int) -> Array:
  """[B, T] frame mask -> [B, S] key validity: proxies always, patches of real frames."""
  b = frame_mask.shape[0]
  frames = jnp.repeat(frame_mask > 0, patches, axis=1)
  return jnp.concatenate([jnp.ones((b, num_proxies), bool), frames], axis=1)


def _kernel_fits(q: Array, num_proxies: int, num_frames: int) -> bool:
  """Whether the TPU kernel takes attention over q [batch, seq, heads, head_dim] (its VMEM budget: clips of up to
  25 frames of 196 patches at head_dim 64)."""
  from clipvip_jax.models import proxy_attention_kernel  # Pallas itself is imported only by the kernel's calls
  return proxy_attention_kernel.fits(seq=q.shape[1], head_dim=q.shape[3], num_proxies=num_proxies,
                                     num_frames=num_frames, itemsize=jnp.dtype(q.dtype).itemsize)


def _kernel_attention(q: Array, k: Array, v: Array, *, num_proxies: int, num_frames: int,
                      key_valid: Array | None) -> Array:
  """The TPU kernel (models/proxy_attention_kernel.py) on [batch, seq, heads, head_dim], per device on a mesh
  (layers.kernel_partition). Off TPU it runs only inside `jax.experimental.pallas.tpu.force_tpu_interpret_mode()`
  (what the tests do)."""
  from clipvip_jax.models import proxy_attention_kernel

  def kernel(q, k, v, *valid):
    return proxy_attention_kernel.proxy_attention(q, k, v, num_proxies=num_proxies, num_frames=num_frames,
                                                  key_valid=valid[0] if valid else None)
  return layers.run_partitioned(kernel, *((q, k, v) if key_valid is None else (q, k, v, key_valid)))


def block_sparse_proxy_attention(q: Array, k: Array, v: Array, *, num_proxies: int, num_frames: int,
                                 frame_mask: Array | None = None, implementation: str | None = None) -> Array:
  """Proxy-guided attention on q, k, v [B, S, heads, head_dim] without materialising the S x S pattern."""
  b, s, n, h = q.shape
  m, t = num_proxies, num_frames
  patches = _patches_per_frame(s, m, t)
  if implementation == "pallas":
    if _kernel_fits(q, m, t):
      valid = None if frame_mask is None else _proxy_key_mask(frame_mask, m, patches)
      return _kernel_attention(q, k, v, num_proxies=m, num_frames=t, key_valid=valid)
    implementation = "xla"  # a clip too long for the kernel's on-chip budget
  attend = functools.partial(layers.dot_product_attention, implementation=implementation)

  # Proxy queries see every token (minus padded frames). The mask is given at full [B, 1, M, S] size because
  # cuDNN wants a bias whose sequence dims equal the query/key lengths.
  proxy_mask = None
  if frame_mask is not None:
    valid = _proxy_key_mask(frame_mask, m, patches)
    proxy_mask = jnp.broadcast_to(valid[:, None, None, :], (b, 1, m, s))
  proxy_out = attend(q[:, :m], k, v, mask=proxy_mask)

  def frame_groups(x: Array) -> Array:
    """[B, S, N, H] -> [B*T, M+L, N, H]: each frame's keys are the M proxies then its own L patches."""
    proxies = jnp.broadcast_to(x[:, None, :m], (b, t, m, n, h))
    frames = x[:, m:].reshape(b, t, patches, n, h)
    return jnp.concatenate([proxies, frames], axis=2).reshape(b * t, m + patches, n, h)

  patch_q = q[:, m:].reshape(b * t, patches, n, h)
  patch_out = attend(patch_q, frame_groups(k), frame_groups(v)).reshape(b, t * patches, n, h)
  return jnp.concatenate([proxy_out, patch_out], axis=1)


def token_frames(num_proxies: int, num_frames: int, patches: int) -> np.ndarray:
  """Frame index of every token, -1 for the proxies: [S] int."""
  return np.concatenate([np.full(num_proxies, -1), np.repeat(np.arange(num_frames), patches)])


def dense_proxy_mask(num_proxies: int, num_frames: int, patches: int, frame_mask: Array | None = None) -> Array:
  """The pattern as a boolean [B or 1, 1, S, S] mask: allowed(q, k) = q < M or k < M or frame(q) == frame(k)."""
  frame = token_frames(num_proxies, num_frames, patches)
  is_proxy = frame < 0
  allowed = jnp.asarray(is_proxy[:, None] | is_proxy[None, :] | (frame[:, None] == frame[None, :]))[None, None]
  if frame_mask is None:
    return allowed
  valid = _proxy_key_mask(frame_mask, num_proxies, patches)  # [B, S]
  proxy_rows = jnp.asarray(is_proxy)[None, None, :, None]
  return allowed & (~proxy_rows | valid[:, None, None, :])


def dense_proxy_attention(q: Array, k: Array, v: Array, *, num_proxies: int, num_frames: int,
                          frame_mask: Array | None = None, implementation: str | None = None) -> Array:
  """Reference: one S x S masked attention. Correct, but most of its scores are masked away."""
  patches = _patches_per_frame(q.shape[1], num_proxies, num_frames)
  mask = dense_proxy_mask(num_proxies, num_frames, patches, frame_mask)
  return layers.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def proxy_attention_fn(pattern: str, *, num_proxies: int, num_frames: int, frame_mask: Array | None = None,
                       implementation: str | None = None) -> layers.AttentionFn:
  """The (q, k, v) -> o function that layers.ResidualBlock calls, for `pattern` in PATTERNS."""
  if pattern not in PATTERNS:
    raise ValueError(f"unknown attention_pattern {pattern!r}; known: {PATTERNS}")
  fn = block_sparse_proxy_attention if pattern == "block_sparse" else dense_proxy_attention
  return functools.partial(fn, num_proxies=num_proxies, num_frames=num_frames, frame_mask=frame_mask,
                           implementation=implementation)
