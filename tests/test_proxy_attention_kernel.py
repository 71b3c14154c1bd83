"""The proxy-attention TPU kernel (models/proxy_attention_kernel.py, attention="pallas"), run by Pallas' TPU
interpreter: values and gradients equal a dense masked attention over the whole clip (CLIP-ViP's pattern: proxies
see every valid key, frame t's patches see the proxies and frame t), with and without padded frames, for head dims
of 64 (B/16's and B/32's), 128 and 16 (the tests' tiny models), down to one proxy and one frame. That it lowers
for a real TPU and reads fewer HBM bytes than XLA's attention is checked by the TPU compiler in
tests/test_planner.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipvip_jax.models import proxy_attention_kernel as pk


def _dense_reference(q, k, v, m, t, key_valid):
  """Attention over all S keys with the pattern as an S x S mask (what the kernel must equal)."""
  b, s = q.shape[:2]
  frame = jnp.concatenate([jnp.full((m,), -1), jnp.repeat(jnp.arange(t), (s - m) // t)])
  is_proxy = frame < 0
  valid = jnp.ones((b, s), bool) if key_valid is None else key_valid
  patch_rows = is_proxy[None, :] | (frame[:, None] == frame[None, :])  # [S, S] for a patch query
  allowed = jnp.where(is_proxy[None, :, None], valid[:, None, :], patch_rows[None])  # [B, S, S]
  return jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None], implementation="xla")


def _inputs(b, m, t, l, n, h, dtype, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  shape = (b, m + t * l, n, h)
  return [jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys]


def _value_and_grads(fn, q, k, v, cot):
  def loss(q, k, v):
    return jnp.sum(fn(q, k, v).astype(jnp.float32) * cot.astype(jnp.float32))
  return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v)))(q, k, v)


def _key_valid(b, m, t, l, padded):
  """Clip 1 (when there is one) has its last frame padded; the proxies are always valid."""
  frames = np.ones((b, t), bool)
  if padded and b > 1 and t > 1:
    frames[1, -1] = False
  return jnp.asarray(np.concatenate([np.ones((b, m), bool), np.repeat(frames, l, axis=1)], axis=1))


# (clips B, proxies M, frames T, patches L, heads, head_dim, padded frames?)
CASES = [(2, 4, 3, 12, 4, 64, True),  # CLIP-ViP in small
         (2, 3, 2, 9, 2, 64, False),  # frames not a multiple of 8 tokens
         (3, 1, 1, 10, 2, 128, False),  # the smallest pattern: one proxy, one frame (head_dim 128)
         (2, 2, 2, 7, 4, 16, True)]  # a tiny test model's heads


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}M{}T{}L{}N{}H{}".format(*c[:6]) + ("pad" if c[6] else ""))
def test_the_kernel_equals_dense_masked_attention_in_float32(case):
  from jax.experimental.pallas import tpu as pltpu
  b, m, t, l, n, h, padded = case
  q, k, v, cot = _inputs(b, m, t, l, n, h, jnp.float32)
  valid = _key_valid(b, m, t, l, padded) if padded else None
  want, want_grads = _value_and_grads(lambda *a: _dense_reference(*a, m, t, valid), q, k, v, cot)
  kernel = lambda *a: pk.proxy_attention(*a, num_proxies=m, num_frames=t, key_valid=valid)  # noqa: E731
  with pltpu.force_tpu_interpret_mode():
    got, got_grads = _value_and_grads(kernel, q, k, v, cot)
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)


def test_one_head_per_grid_step_gives_the_same_as_all_heads_in_one(monkeypatch):
  """Long clips take one head per grid step, short sequences several (heads_per_step); both loops are exercised
  here on the same inputs (the parity cases above are short: all heads in one step)."""
  from jax.experimental.pallas import tpu as pltpu
  b, m, t, l, n, h = 2, 4, 3, 12, 4, 64
  q, k, v, cot = _inputs(b, m, t, l, n, h, jnp.float32, seed=4)
  valid = _key_valid(b, m, t, l, True)
  kernel = lambda *a: pk.proxy_attention(*a, num_proxies=m, num_frames=t, key_valid=valid)  # noqa: E731
  layout = pk.Layout(m, t, l, h)
  results = {}
  for elements in (1, pk.STEP_ELEMENTS):
    monkeypatch.setattr(pk, "STEP_ELEMENTS", elements)
    with pltpu.force_tpu_interpret_mode():
      results[pk.heads_per_step(layout, n, 4)] = _value_and_grads(kernel, q, k, v, cot)
  assert sorted(results) == [1, n]
  want, want_grads = _value_and_grads(lambda *a: _dense_reference(*a, m, t, valid), q, k, v, cot)
  for got, got_grads in results.values():
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
      np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)


def test_a_padded_frame_changes_nothing_the_proxies_see():
  """The mask is applied: with clip 1's last frame padded, changing that frame's keys and values leaves the
  proxies' outputs as they were (and without the mask it would not)."""
  from jax.experimental.pallas import tpu as pltpu
  b, m, t, l, n, h = 2, 4, 3, 12, 2, 64
  q, k, v, _ = _inputs(b, m, t, l, n, h, jnp.float32, seed=2)
  valid = _key_valid(b, m, t, l, True)
  noisy_k, noisy_v = (x.at[1, m + (t - 1) * l:].add(5.0) for x in (k, v))
  with pltpu.force_tpu_interpret_mode():
    run = jax.jit(lambda k, v, valid: pk.proxy_attention(q, k, v, num_proxies=m, num_frames=t, key_valid=valid))
    clean, noisy = run(k, v, valid), run(noisy_k, noisy_v, valid)
    unmasked_clean, unmasked_noisy = run(k, v, jnp.ones_like(valid)), run(noisy_k, noisy_v, jnp.ones_like(valid))
  np.testing.assert_array_equal(clean[:, :m], noisy[:, :m])
  assert np.abs(unmasked_clean[1, :m] - unmasked_noisy[1, :m]).max() > 1e-3


def test_the_kernel_in_bfloat16_stays_within_bfloat16_rounding_of_xla():
  """In bfloat16 both round the probabilities to bfloat16 before the product with v; the kernel keeps dp in
  float32 where XLA rounds it to bfloat16, so the two differ by bfloat16 rounding, not more."""
  from jax.experimental.pallas import tpu as pltpu
  b, m, t, l, n, h = 2, 4, 3, 12, 4, 64
  q, k, v, cot = _inputs(b, m, t, l, n, h, jnp.bfloat16, seed=1)
  valid = _key_valid(b, m, t, l, True)
  want, want_grads = _value_and_grads(lambda *a: _dense_reference(*a, m, t, valid), q, k, v, cot)
  kernel = lambda *a: pk.proxy_attention(*a, num_proxies=m, num_frames=t, key_valid=valid)  # noqa: E731
  with pltpu.force_tpu_interpret_mode():
    got, got_grads = _value_and_grads(kernel, q, k, v, cot)
  assert got.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in got_grads)
  f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
  np.testing.assert_allclose(f32(got), f32(want), atol=2e-2, rtol=2e-2)
  for g, w in zip(got_grads, want_grads):
    assert np.abs(f32(g) - f32(w)).max() <= 2e-2 * np.abs(f32(w)).max()


def test_bad_shapes_are_one_sentence():
  q = jnp.zeros((1, 3 + 2 * 5 + 1, 1, 64))
  with pytest.raises(ValueError, match="14 tokens is not 3 proxies \\+ 2 frames of equal size"):
    pk.proxy_attention(q, q, q, num_proxies=3, num_frames=2)


def test_a_clip_too_long_for_the_chip_keeps_xla_attention():
  """The kernel holds a whole clip's head on chip (v4: 16 MiB): B/16's head shape takes up to 25 frames of 196
  patches; a longer clip keeps XLA's block-sparse attention instead of failing to compile."""
  from clipvip_jax.models import proxy_attention as pa

  def uses_kernel(frames, head_dim=64, proxies=4, patches=196):
    q = jax.ShapeDtypeStruct((1, proxies + frames * patches, 12, head_dim), jnp.bfloat16)
    fn = lambda q: pa.block_sparse_proxy_attention(q, q, q, num_proxies=proxies, num_frames=frames,  # noqa: E731
                                                   implementation="pallas")
    return "pallas_call" in str(jax.make_jaxpr(fn)(q))

  assert uses_kernel(12) and uses_kernel(25) and uses_kernel(12, head_dim=96)
  assert not uses_kernel(26)
  assert pk.fits(seq=4 + 196, head_dim=64, num_proxies=4, num_frames=1, itemsize=2)  # a one-frame clip
  assert not pk.fits(seq=197, head_dim=64, num_proxies=0, num_frames=1, itemsize=2)  # plain attention: XLA's
