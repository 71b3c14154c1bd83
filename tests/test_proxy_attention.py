"""Proxy-guided attention: the block-sparse hot path equals the dense masked reference (values and gradients)
at sizes unrelated to any fixture, frame_mask semantics, and no S x S tensor on the block-sparse path."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipvip_jax.models import proxy_attention as pa

# (batch, proxies M, frames T, patches per frame L, heads, head_dim, with a frame_mask)
CASES = [(2, 1, 1, 3, 2, 4, False), (1, 2, 7, 5, 1, 8, False), (3, 5, 3, 4, 2, 4, True), (2, 3, 6, 9, 3, 8, True),
         (1, 4, 2, 16, 2, 8, False), (4, 2, 5, 6, 2, 8, True)]


def _qkv(b, m, t, l, n, h, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  shape = (b, m + t * l, n, h)
  q, k, v, cot = (jax.random.normal(key, shape, jnp.float32) for key in keys)
  return q, k, v, cot


def _frame_mask(b, t, seed=1):
  rng = np.random.default_rng(seed)
  mask = rng.integers(0, 2, (b, t))
  mask[:, 0] = 1
  mask[-1] = 0  # one fully padded video: its proxies may only see proxies
  return jnp.asarray(mask, jnp.int32)


def _value_and_grads(fn, q, k, v, cot):
  loss = lambda q, k, v: jnp.sum(fn(q, k, v) * cot)
  return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}M{}T{}L{}N{}H{}-masked{}".format(*c))
def test_block_sparse_matches_dense(case):
  b, m, t, l, n, h, masked = case
  q, k, v, cot = _qkv(b, m, t, l, n, h)
  frame_mask = _frame_mask(b, t) if masked else None
  kw = dict(num_proxies=m, num_frames=t, frame_mask=frame_mask, implementation="xla")
  out_s, grads_s = _value_and_grads(functools.partial(pa.block_sparse_proxy_attention, **kw), q, k, v, cot)
  out_d, grads_d = _value_and_grads(functools.partial(pa.dense_proxy_attention, **kw), q, k, v, cot)
  np.testing.assert_allclose(out_s, out_d, atol=1e-5, rtol=1e-5)
  for gs, gd in zip(grads_s, grads_d):
    np.testing.assert_allclose(gs, gd, atol=1e-5, rtol=1e-5)


def test_dense_mask_is_the_original_pattern():
  m, t, l = 3, 4, 2
  frame = pa.token_frames(m, t, l)
  mask = np.asarray(pa.dense_proxy_mask(m, t, l))[0, 0]
  for qi, ki in itertools.product(range(m + t * l), repeat=2):
    expected = qi < m or ki < m or (qi - m) // l == (ki - m) // l
    assert mask[qi, ki] == expected, (qi, ki)
  assert list(frame[:m]) == [-1] * m and list(frame[m:]) == [f for f in range(t) for _ in range(l)]


def test_all_ones_frame_mask_equals_unmasked():
  b, m, t, l, n, h = 2, 3, 5, 4, 2, 8
  q, k, v, _ = _qkv(b, m, t, l, n, h)
  kw = dict(num_proxies=m, num_frames=t)
  plain = jax.jit(functools.partial(pa.block_sparse_proxy_attention, **kw))(q, k, v)
  ones = jax.jit(functools.partial(pa.block_sparse_proxy_attention, frame_mask=jnp.ones((b, t), jnp.int32), **kw))(
      q, k, v)
  np.testing.assert_array_equal(plain, ones)


def test_padded_frames_do_not_reach_proxies_or_other_frames():
  b, m, t, l, n, h = 2, 2, 4, 3, 2, 4
  q, k, v, _ = _qkv(b, m, t, l, n, h)
  frame_mask = jnp.asarray([[1, 1, 0, 0], [1, 1, 1, 0]])
  frame = pa.token_frames(m, t, l)
  # Change every key/value of padded frames; only those frames' own patch outputs may change.
  padded = (frame[None] >= 0) & ~np.asarray(frame_mask, bool)[:, np.maximum(frame, 0)]
  noise = jax.random.normal(jax.random.key(7), k.shape)
  k2 = jnp.where(padded[..., None, None], k + noise, k)
  v2 = jnp.where(padded[..., None, None], v - noise, v)
  kw = dict(num_proxies=m, num_frames=t, frame_mask=frame_mask)
  fn = jax.jit(functools.partial(pa.block_sparse_proxy_attention, **kw))
  before, after = np.asarray(fn(q, k, v)), np.asarray(fn(q, k2, v2))
  np.testing.assert_allclose(before[~padded], after[~padded], atol=1e-6)
  assert np.abs(before[padded] - after[padded]).max() > 1e-3


def test_block_sparse_never_builds_the_full_score_matrix():
  b, m, t, l, n, h = 2, 4, 6, 7, 2, 8
  s = m + t * l
  q, k, v, cot = _qkv(b, m, t, l, n, h)
  fn = functools.partial(pa.block_sparse_proxy_attention, num_proxies=m, num_frames=t,
                         frame_mask=jnp.ones((b, t), jnp.int32))
  loss = lambda q, k, v: jnp.sum(fn(q, k, v) * cot)
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  def shapes(jaxpr):
    for eqn in jaxpr.eqns:
      yield from (tuple(getattr(o.aval, "shape", ())) for o in eqn.outvars)
      for sub in jax.core.jaxprs_in_params(eqn.params):
        yield from shapes(sub)

  square = [sh for sh in shapes(jaxpr.jaxpr) if sh.count(s) >= 2]
  assert not square, f"block-sparse path built {s} x {s} tensors: {square[:3]}"
  dense = jax.make_jaxpr(functools.partial(pa.dense_proxy_attention, num_proxies=m, num_frames=t))(q, k, v)
  assert any(sh.count(s) >= 2 for sh in shapes(dense.jaxpr))  # the check can see one when it is there


def test_bad_arguments_raise():
  q = jnp.zeros((1, 3 + 2 * 5, 1, 4))
  with pytest.raises(ValueError, match="proxies"):
    pa.block_sparse_proxy_attention(q, q, q, num_proxies=3, num_frames=3)
  with pytest.raises(ValueError, match="attention_pattern"):
    pa.proxy_attention_fn("sparse", num_proxies=3, num_frames=2)


@pytest.mark.parametrize("masked", [False, True])
def test_pallas_tpu_kernel_matches_xla_in_interpret_mode(masked):
  """attention="pallas" (the proxy-attention TPU kernel, run here by Pallas' TPU interpreter): the whole pattern
  goes through the kernel, clip by clip; values and gradients equal XLA's block-sparse program. Head dim 64 as in
  B/16 (two heads share the kernel's 128 lanes); 2 frames of 9 patches + 3 proxies."""
  from jax.experimental.pallas import tpu as pltpu
  b, m, t, l, n, h = 2, 3, 2, 9, 2, 64
  q, k, v, cot = _qkv(b, m, t, l, n, h, seed=3)
  frame_mask = jnp.asarray([[1, 1], [1, 0]], jnp.int32) if masked else None
  xla = functools.partial(pa.block_sparse_proxy_attention, num_proxies=m, num_frames=t, frame_mask=frame_mask,
                          implementation="xla")
  pallas = functools.partial(pa.block_sparse_proxy_attention, num_proxies=m, num_frames=t, frame_mask=frame_mask,
                             implementation="pallas")
  want, want_grads = _value_and_grads(xla, q, k, v, cot)
  with pltpu.force_tpu_interpret_mode():
    got, got_grads = _value_and_grads(pallas, q, k, v, cot)
    # The kernel is really in the program (not a silent fallback to XLA): a Pallas call in the jaxpr.
    assert "pallas_call" in str(jax.make_jaxpr(pallas)(q, k, v))
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5)


def test_pallas_off_a_tpu_is_one_sentence():
  from clipvip_jax.train import run_config
  with pytest.raises(ValueError, match="config.model.attention = 'pallas' is the TPU kernel"):
    run_config.check_values({"model": {"attention": "pallas"}})
  with pytest.raises(ValueError, match="config.model.attention = 'flash' is not one of auto, xla, cudnn, pallas"):
    run_config.check_values({"model": {"attention": "flash"}})


def test_auto_attention_is_the_kernel_on_a_tpu_target_and_xla_elsewhere():
  """The recipes' attention "auto" is resolved when a model is built, for the chip it is built for (the planner
  builds TPU programs on this CPU host under layers.build_target): the proxy-attention kernel on TPU, XLA on CPU
  and GPU; a CLIP-ViP model built for a TPU has the kernel in its traced forward pass."""
  from flax import nnx

  from clipvip_jax.models import clip, clipvip, layers
  from configs import clipvip_pretrain

  assert clipvip_pretrain.get_config("B/16").model.attention == "auto"
  cfg = clipvip.CLIPViPConfig(clip=clip.clip_config("tiny").replace(attention="auto", dtype="float32"))
  video = jnp.zeros((2, 2, cfg.clip.vision.image_size, cfg.clip.vision.image_size, 3))
  for platform, want in (("tpu", "pallas"), ("gpu", "xla"), ("cpu", "xla")):
    with layers.build_target(layers.Target(platform)):
      model = clipvip.CLIPViP(cfg, rngs=nnx.Rngs(0))
    assert model.vision.attention == want and model.text.attention == want
    traced = str(jax.make_jaxpr(lambda v: model.vision(v)["embeds"])(video))
    assert ("pallas_call" in traced) == (want == "pallas")
  assert clipvip.CLIPViP(cfg, rngs=nnx.Rngs(0)).vision.attention == "xla"  # no target: this machine's backend
