"""CLIP4Clip's meanP: image CLIP applied per frame, frame embeddings L2-normalised and averaged.

No temporal modelling at all: the order of frames cannot change the video embedding. It is the baseline the demo
trains beside CLIP-ViP (same towers, same budget), and a useful zero-shot video encoder for any image CLIP.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clipvip_jax.models.clip import CLIP, CLIPConfig, l2_normalize

Array = jax.Array


def mean_pool_frames(frame_embeds: Array, frame_mask: Array | None) -> Array:
  """meanP: L2 per frame -> mean over valid frames -> L2. frame_embeds [B, T, D], frame_mask [B, T] or None."""
  x = l2_normalize(frame_embeds)
  if frame_mask is None:
    return l2_normalize(x.mean(axis=1))
  m = frame_mask.astype(x.dtype)[..., None]
  return l2_normalize((x * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0))


class MeanPoolCLIP(CLIP):
  """A CLIP whose video embedding is the mean of its frame embeddings (parameters identical to CLIP's)."""

  def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)

  def encode_video(self, video: Array, frame_mask: Array | None = None) -> Array:
    b, t = video.shape[:2]
    frames = self.vision(video.reshape((b * t,) + video.shape[2:]))["embeds"]
    return mean_pool_frames(frames.reshape(b, t, -1), frame_mask)
