"""The group-attention TPU kernel (models/group_attention.py, attention="pallas"), run by Pallas' TPU interpreter:
values and gradients equal XLA's attention over [prefix | own] keys, with and without a shared prefix, for head
dims that share a 128-lane chunk (64: B/16's and B/32's) and narrow test widths. That it lowers for a real TPU,
and reads fewer HBM bytes than XLA's attention, is checked by the TPU compiler in tests/test_planner.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipvip_jax.models import group_attention as ga


def _reference(q, k, v, kp, vp, heads):
  """XLA's attention of each group's queries over [its item's prefix | its own keys]."""
  g, l, d = q.shape
  if kp is not None:
    per = g // kp.shape[0]
    k = jnp.concatenate([jnp.repeat(kp, per, axis=0), k], axis=1)
    v = jnp.concatenate([jnp.repeat(vp, per, axis=0), v], axis=1)

  def split(x):
    return x.reshape(*x.shape[:2], heads, d // heads)
  return jax.nn.dot_product_attention(split(q), split(k), split(v), implementation="xla").reshape(g, l, d)


def _inputs(items, groups_per_item, l, lk, m, heads, head_dim, dtype, prefix, seed=0):
  keys = jax.random.split(jax.random.key(seed), 6)
  g, d = items * groups_per_item, heads * head_dim
  q = jax.random.normal(keys[0], (g, l, d), jnp.float32).astype(dtype)
  k, v = (jax.random.normal(key, (g, lk, d), jnp.float32).astype(dtype) for key in keys[1:3])
  kp, vp = ((jax.random.normal(key, (items, m, d), jnp.float32).astype(dtype) for key in keys[3:5])
            if prefix else (None, None))
  cot = jax.random.normal(keys[5], (g, l, d), jnp.float32).astype(dtype)
  return (q, k, v, kp, vp), cot


def _value_and_grads(fn, args, cot, prefix):
  argnums = (0, 1, 2, 3, 4) if prefix else (0, 1, 2)

  def loss(*a):
    return jnp.sum(fn(*a).astype(jnp.float32) * cot.astype(jnp.float32))
  return jax.jit(lambda *a: (fn(*a), jax.grad(loss, argnums)(*a)))(*args)


# (items, groups per item, queries L, own keys Lk, prefix M, heads, head_dim, prefix?)
CASES = [(2, 3, 12, 12, 4, 4, 64, True),  # CLIP-ViP's shape in small: 4 proxies, two heads per 128 lanes
         (1, 2, 9, 9, 3, 2, 64, True),  # one 128-lane chunk, rows not a multiple of 8
         (3, 1, 10, 10, 0, 2, 128, False),  # no prefix (the image tower's plain attention), one head per chunk
         (2, 2, 7, 11, 2, 4, 16, True)]  # a 64-wide test model: the whole width is one chunk; Lk != L


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}x{}L{}Lk{}M{}N{}H{}".format(*c[:7]))
def test_the_kernel_equals_xla_in_float32(case):
  from jax.experimental.pallas import tpu as pltpu
  *shape, prefix = case
  args, cot = _inputs(*shape, jnp.float32, prefix)
  heads = shape[5]
  want, want_grads = _value_and_grads(lambda *a: _reference(*a, heads), args, cot, prefix)
  with pltpu.force_tpu_interpret_mode():
    got, got_grads = _value_and_grads(lambda *a: ga.group_attention(*a, heads), args, cot, prefix)
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
  assert len(got_grads) == len(want_grads)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)


def test_the_kernel_in_bfloat16_stays_within_bfloat16_rounding_of_xla():
  """In bfloat16 both round the probabilities to bfloat16 before the product with v; the kernel keeps dp in
  float32 where XLA rounds it to bfloat16, so gradients differ by bfloat16 rounding, not more."""
  from jax.experimental.pallas import tpu as pltpu
  args, cot = _inputs(2, 3, 12, 12, 4, 4, 64, jnp.bfloat16, True, seed=1)
  want, want_grads = _value_and_grads(lambda *a: _reference(*a, 4), args, cot, True)
  with pltpu.force_tpu_interpret_mode():
    got, got_grads = _value_and_grads(lambda *a: ga.group_attention(*a, 4), args, cot, True)
  assert got.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in got_grads)
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
  np.testing.assert_allclose(f32(got), f32(want), atol=2e-2, rtol=2e-2)
  for g, w in zip(got_grads, want_grads):
    scale = np.abs(f32(w)).max()
    assert np.abs(f32(g) - f32(w)).max() <= 2e-2 * scale


def test_a_head_dim_the_lanes_cannot_hold_is_one_sentence():
  q = jnp.zeros((2, 8, 192))
  with pytest.raises(ValueError, match=r"attention='pallas' needs head_dim \(96\) dividing 128"):
    ga.group_attention(q, q, q, None, None, 2)
