"""meanP baseline: frame order does not matter, padded frames do not count."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clipvip_jax.models import clip, meanp


def test_meanp_is_order_invariant_and_ignores_padded_frames():
  model = meanp.MeanPoolCLIP(clip.clip_config("tiny"), rngs=nnx.Rngs(0))
  video = jax.random.normal(jax.random.key(0), (2, 3, 32, 32, 3))
  emb = model.encode_video(video)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(model.encode_video(video[:, ::-1]), emb, atol=1e-6)
  padded = jnp.concatenate([video, 100 * jnp.ones_like(video[:, :2])], axis=1)
  mask = jnp.array([[1, 1, 1, 0, 0]] * 2)
  np.testing.assert_allclose(model.encode_video(padded, mask), emb, atol=1e-6)


def test_mean_pool_frames_by_hand():
  f = jnp.array([[[3.0, 4.0], [0.0, 2.0], [9.0, 9.0]]])
  m = jnp.array([[1, 1, 0]])
  expected = np.array([0.6 + 0.0, 0.8 + 1.0]) / 2
  expected /= np.linalg.norm(expected)
  np.testing.assert_allclose(meanp.mean_pool_frames(f, m)[0], expected, rtol=1e-6)
