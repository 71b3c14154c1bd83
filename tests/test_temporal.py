"""The temporal heads (TDB, seqTransf, TAB, meanP) against a loop-by-loop numpy reading of the spec, at sizes,
frame counts, masks and centre counts other than the fixture's."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from clipvip_jax.models import temporal
from clipvip_jax.models.clip import CLIPConfig, TextConfig, VisionConfig
from clipvip_jax.models.clip2video import CLIP2Video, CLIP2VideoConfig
from clipvip_jax.params import assign_params, flat_params, shapes

WIDTH = 128  # 2 heads of 64


# ---- a numpy reference, written from the spec with explicit loops ----

def _ln(x, scale, bias, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _block_ref(x, mask, p, eps):
  """One pre-LN block on a single sample x [S, D] with key mask [S] (additive (1 - m) * -1e6)."""
  h = _ln(x, p["ln_1/scale"], p["ln_1/bias"], eps)
  heads, hd = p["attn/query/bias"].shape
  q = np.einsum("sd,dnh->nsh", h, p["attn/query/kernel"]) + p["attn/query/bias"][:, None]
  k = np.einsum("sd,dnh->nsh", h, p["attn/key/kernel"]) + p["attn/key/bias"][:, None]
  v = np.einsum("sd,dnh->nsh", h, p["attn/value/kernel"]) + p["attn/value/bias"][:, None]
  scores = np.einsum("nqh,nkh->nqk", q, k) / np.sqrt(hd)
  # The original adds the -1e6 mask in float32; its rounding (ulp 0.0625 at 1e6) is what a row whose keys are all
  # masked sees (the difference tokens of a one-frame video), so the reference rounds the same way.
  scores = (scores.astype(np.float32) + np.float32(-1e6) * (1 - mask).astype(np.float32)).astype(np.float64)
  scores = np.exp(scores - scores.max(-1, keepdims=True))
  o = np.einsum("nqk,nkh->qnh", scores / scores.sum(-1, keepdims=True), v)
  x = x + np.einsum("qnh,nhd->qd", o, p["attn/out/kernel"]) + p["attn/out/bias"]
  h = _ln(x, p["ln_2/scale"], p["ln_2/bias"], eps) @ p["mlp/fc1/kernel"] + p["mlp/fc1/bias"]
  h = h * (1.0 / (1.0 + np.exp(-1.702 * h)))
  return x + h @ p["mlp/fc2/kernel"] + p["mlp/fc2/bias"]


def _transformer_ref(x, mask, flat, prefix, eps=1e-12):
  n = len({k.split("/")[0] for k in (key[len(prefix):] for key in flat if key.startswith(prefix))})
  for i in range(n):
    p = {k[len(f"{prefix}{i}/"):]: v for k, v in flat.items() if k.startswith(f"{prefix}{i}/")}
    x = _block_ref(x, mask, p, eps)
  return x


def _l2(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _tdb_tokens_ref(f, m, flat, enc_prefix):
  """Spec TDB steps 1-3 for one sample: f [T, D], m [T] -> tokens [2T-1, D] (pos + type added), mask."""
  t = f.shape[0]
  pos, types = flat["frame_position_embeddings"], flat["difference/type_embedding"]
  if t == 1:
    return f + pos[:1] + types[1], m
  d = f[1:] - f[:-1] + pos[1:t]
  d = _transformer_ref(d, m[1:], flat, enc_prefix)
  d = 2.0 / (1.0 + np.exp(-_ln(d, flat["difference/norm/scale"], flat["difference/norm/bias"], 1e-5))) - 1.0
  tokens, token_mask = [], []
  for i in range(t):  # f_i (position i, type 1), then d_i (position i, type 0, mask m_i)
    tokens.append(f[i] + pos[i] + types[1])
    token_mask.append(m[i])
    if i < t - 1:
      tokens.append(d[i] + pos[i] + types[0])
      token_mask.append(m[i])
  return np.stack(tokens), np.array(token_mask)


def _masked_mean_ref(x, m):
  return (x * m[:, None]).sum(0) / max(m.sum(), 1.0)


def _global_ref(f, m, flat):
  tokens, tm = _tdb_tokens_ref(f, m, flat, "difference/attention/blocks/")
  out = _transformer_ref(tokens, tm, flat, "temporal_transformer/blocks/")[0::2] + f
  return _l2(_masked_mean_ref(_l2(out), m))


def _tab_ref(x, m, flat):
  wc, ec = flat["alignment/weight_center"], flat["alignment/emb_center"]
  r = np.zeros_like(ec)
  for n in range(x.shape[0]):
    logits = wc @ x[n]
    a = np.exp(logits - logits.max())
    a = a / a.sum()
    for k in range(ec.shape[0]):
      r[k] += m[n] * a[k] * (x[n] - ec[k])
  return _l2(_l2(r).mean(0))


def _tab_video_ref(f, m, flat):
  sub, sm = f[0::2], m[0::2]
  tokens, tm = _tdb_tokens_ref(sub, sm, flat, "difference/attention/blocks/")
  enc = _transformer_ref(tokens, tm, flat, "action_transformer/blocks/")[0::2] + sub
  return _tab_ref(np.concatenate([f, enc]), np.concatenate([m, sm]), flat)


# ---- the model under test ----

def _tiny_clip(width=WIDTH) -> CLIPConfig:
  return CLIPConfig(vision=VisionConfig(width=64, layers=1, heads=1, mlp_dim=128, patch_size=8, image_size=16),
                    text=TextConfig(width=width, layers=2, heads=width // 64, mlp_dim=2 * width, vocab_size=50,
                                    max_len=16),
                    projection_dim=width)


def random_params(shapes, seed: int) -> dict[str, np.ndarray]:
  """Every parameter random, LayerNorm gains and biases included, so that layout mistakes cannot hide; kernels
  scaled by their fan-in to keep activations O(1)."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in sorted(shapes.items()):
    noise = rng.standard_normal(shape).astype(np.float32)
    if key.endswith("scale"):
      out[key] = 1.0 + 0.2 * noise
    elif key.endswith("kernel"):
      fan_in = shape[0] * (shape[1] if key.endswith("out/kernel") else 1)
      out[key] = noise / np.sqrt(fan_in)
    else:
      out[key] = 0.2 * noise
  return {k: v.astype(np.float32) for k, v in out.items()}


def _perturbed_model(cfg: CLIP2VideoConfig, seed: int = 0) -> CLIP2Video:
  model = nnx.eval_shape(lambda: CLIP2Video(cfg, rngs=nnx.Rngs(0)))  # no random init to compile
  return assign_params(model, random_params(shapes(model), seed))


@pytest.fixture(scope="module")
def tdb_tab_model():
  cfg = CLIP2VideoConfig.for_clip(_tiny_clip(), temporal_layers=2, center_k=7)
  model = _perturbed_model(cfg)
  flat = {k: np.asarray(v, np.float64) for k, v in flat_params(model).items()}
  graph, state = nnx.split(model)

  @jax.jit
  def heads(state, frames, mask):
    m = nnx.merge(graph, state)
    return m.global_video(frames, mask), m.alignment(*m.tab_video_tokens(frames, mask))

  return model, flat, lambda f, m: heads(state, jnp.asarray(f), jnp.asarray(m, jnp.float32))


# ---- tests ----

@pytest.mark.parametrize("t", [1, 2, 3, 6])
def test_interleave_order(t):
  frames = np.arange(t)[None, :, None] * 10
  diffs = np.arange(t - 1)[None, :, None] * 10 + 5
  got = np.asarray(temporal.interleave(jnp.asarray(frames), jnp.asarray(diffs)))[0, :, 0]
  expected = [v for i in range(t) for v in ([10 * i, 10 * i + 5] if i < t - 1 else [10 * i])]
  assert got.tolist() == expected


def test_key_padding_bias_is_additive_minus_1e6_per_sample():
  bias = np.asarray(temporal.key_padding_bias(jnp.asarray([[1, 0, 1], [0, 1, 1]])))
  assert bias.shape == (2, 1, 1, 3)
  np.testing.assert_array_equal(bias[:, 0, 0], [[0, -1e6, 0], [-1e6, 0, 0]])


@pytest.mark.parametrize("t,valid", [(7, [1, 1, 1, 1, 0, 0, 0]), (12, [1] * 12), (1, [1]), (4, [1, 0, 0, 0])])
def test_tdb_and_tab_heads_match_loop_reference(tdb_tab_model, t, valid):
  _, flat, heads = tdb_tab_model
  rng = np.random.default_rng(t)
  frames = rng.standard_normal((2, t, WIDTH)).astype(np.float32)
  mask = np.array([valid, [1] * t], np.float32)
  got_global, got_tab = heads(frames, mask)
  for b in range(2):
    f, m = frames[b].astype(np.float64), mask[b].astype(np.float64)
    np.testing.assert_allclose(np.asarray(got_global[b]), _global_ref(f, m, flat), atol=2e-5)
    np.testing.assert_allclose(np.asarray(got_tab[b]), _tab_video_ref(f, m, flat), atol=2e-5)


def test_padding_reaches_outputs_only_through_the_first_padded_frame(tdb_tab_model):
  """Masks are key masks on every path, so frames after the first padded one change nothing. The first padded
  frame does count, as in the original: d_i = f_{i+1} - f_i keeps frame i's mask (spec TDB step 3), so the
  difference between the last valid frame and the first padded one is a valid token (the original pads with
  zero images; so must the data pipeline for parity)."""
  _, _, heads = tdb_tab_model
  rng = np.random.default_rng(1)
  frames = rng.standard_normal((1, 6, WIDTH)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0, 0]], np.float32)
  base = heads(frames, mask)
  later = frames.copy()
  later[:, 5] = rng.standard_normal(WIDTH) * 10  # not in TAB's every-second-frame subsample either
  for a, b in zip(base, heads(later, mask)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  first = frames.copy()
  first[:, 3] = rng.standard_normal(WIDTH) * 10
  assert np.abs(np.asarray(heads(first, mask)[0]) - np.asarray(base[0])).max() > 1e-3


def test_masks_are_batch_major(tdb_tab_model):
  """Videos with different frame masks in one batch give what each gives alone (the original's head-major
  mask repeat would mix them up)."""
  _, _, heads = tdb_tab_model
  rng = np.random.default_rng(2)
  frames = rng.standard_normal((3, 6, WIDTH)).astype(np.float32)
  mask = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]], np.float32)
  together = heads(frames, mask)
  for b in range(3):
    alone = heads(frames[b:b + 1], mask[b:b + 1])
    for x, y in zip(together, alone):
      np.testing.assert_allclose(np.asarray(x[b]), np.asarray(y[0]), atol=1e-6)


def test_tab_aggregation_matches_loop_reference():
  block = temporal.TemporalAlignmentBlock(WIDTH, 4, rngs=nnx.Rngs(3))
  flat = {f"alignment/{k}": np.asarray(v, np.float64) for k, v in flat_params(block).items()}
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 9, WIDTH)).astype(np.float32)
  m = np.array([[1] * 5 + [0] * 4, [0] + [1] * 8], np.float32)
  got = np.asarray(block(jnp.asarray(x), jnp.asarray(m)))
  for b in range(2):
    np.testing.assert_allclose(got[b], _tab_ref(x[b].astype(np.float64), m[b], flat), atol=1e-5)


def test_plain_seq_transf_and_mean_p_heads():
  """CLIP4Clip's seqTransf (positions, transformer, residual, meanP) and meanP, without TDB."""
  cfg = CLIP2VideoConfig.for_clip(_tiny_clip(), temporal_type="default", center_type="default", temporal_layers=1)
  model = _perturbed_model(cfg, seed=4)
  flat = {k: np.asarray(v, np.float64) for k, v in flat_params(model).items()}
  rng = np.random.default_rng(4)
  f = rng.standard_normal((1, 5, WIDTH)).astype(np.float32)
  m = np.array([[1, 1, 1, 0, 1]], np.float32)
  got = np.asarray(nnx.jit(lambda mod, a, b: mod.global_video(a, b))(model, jnp.asarray(f), jnp.asarray(m)))[0]
  x = f[0].astype(np.float64)
  out = _transformer_ref(x + flat["frame_position_embeddings"][:5], m[0], flat, "temporal_transformer/blocks/") + x
  np.testing.assert_allclose(got, _l2(_masked_mean_ref(_l2(out), m[0])), atol=2e-5)
  mean_p = _perturbed_model(cfg.replace(sim_type="meanP"))
  got = np.asarray(mean_p.global_video(jnp.asarray(f), jnp.asarray(m)))[0]
  np.testing.assert_allclose(got, _l2(_masked_mean_ref(_l2(x), m[0])), atol=1e-6)


def test_temporal_layer_norms_use_eps_1e12():
  cfg = CLIP2VideoConfig.for_clip(_tiny_clip(), temporal_layers=1, center_k=2)
  model = nnx.eval_shape(lambda: CLIP2Video(cfg, rngs=nnx.Rngs(0)))
  assert model.temporal_transformer.blocks[0].ln_1.eps == 1e-12
  assert model.difference.attention.blocks[0].ln_2.eps == 1e-12
  assert model.action_transformer.blocks[0].ln_1.eps == 1e-12
  assert model.difference.norm.eps == 1e-5


def test_too_many_frames_for_the_positions_is_an_error():
  cfg = CLIP2VideoConfig.for_clip(_tiny_clip(), temporal_layers=1, center_k=2, frame_positions=4)
  model = _perturbed_model(cfg)
  with pytest.raises(ValueError, match="5 frames exceed the model's 4 frame positions"):
    model.global_video(jnp.zeros((1, 5, WIDTH)), jnp.ones((1, 5)))
