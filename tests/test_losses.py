"""Losses against the original implementations' values, gradient checks, and sharded == one device."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

from clipvip_jax import losses

# test_masked_rows_equal_the_loss_without_them: an all-valid mask and no mask give the same loss bit for bit once
# XLA:CPU has optimised both programs, not with the suite's unoptimised compiles (tests/conftest.py); the
# module's programs are small.
pytestmark = pytest.mark.usefixtures("fully_optimised")

# Fixture key of the reference value for each registered loss (the shipped one is stored as `vsc_fc`).
_FIXTURE_KEY = {name: name for name in losses.OMNISOURCE_LOSSES} | {"NCELearnableTempLoss_vsc_fc": "vsc_fc"}


@pytest.fixture(scope="module")
def loss_fixture(fixtures_dir):
  data = np.load(fixtures_dir / "clipvip_losses.npz")
  return {key: data[key] for key in data.files}


def _omnisource_args(fixture):
  return [jnp.asarray(fixture[key]) for key in ("video", "subtitle", "frame", "caption", "logit_scale")]


def _normalised(rng: np.random.Generator, *shape: int) -> np.ndarray:
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_nce_matches_original(loss_fixture):
  value = losses.nce_loss(loss_fixture["video"], loss_fixture["subtitle"], loss_fixture["logit_scale"])
  np.testing.assert_allclose(value, loss_fixture["nce"], rtol=1e-5)


@pytest.mark.parametrize("name", sorted(losses.OMNISOURCE_LOSSES))
def test_omnisource_losses_match_original(loss_fixture, name):
  value = jax.jit(losses.get_omnisource_loss(name))(*_omnisource_args(loss_fixture))
  np.testing.assert_allclose(value, loss_fixture[_FIXTURE_KEY[name]], rtol=1e-5)


def test_shipped_loss_is_six_terms_in_spec_order(loss_fixture):
  """Rows built literally as the spec lists them ([v.s_i | v.s_j, j!=i | v.c_j, j!=i], label 0)."""
  v, s, f, c, raw_scale = (np.asarray(x, np.float64) for x in _omnisource_args(loss_fixture))
  scale = np.exp(raw_scale)

  def ce(logits, labels):
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels].mean()

  batch = v.shape[0]
  diag = np.arange(batch)
  others = [[j for j in range(batch) if j != i] for i in range(batch)]
  terms = [ce(scale * s @ v.T, diag), ce(scale * c @ v.T, diag)]
  for positive in (s, c):
    rows = np.stack([np.concatenate([[v[i] @ positive[i]], s[others[i]] @ v[i], c[others[i]] @ v[i]])
                     for i in range(batch)])
    assert rows.shape == (batch, 2 * batch - 1)
    terms.append(ce(scale * rows, np.zeros(batch, int)))
  terms += [ce(scale * f @ c.T, diag), ce(scale * c @ f.T, diag)]
  np.testing.assert_allclose(sum(terms), loss_fixture["vsc_fc"], rtol=1e-5)
  np.testing.assert_allclose(losses.omnisource_loss(*_omnisource_args(loss_fixture)), sum(terms), rtol=1e-5)


def test_registry_names_are_readable_and_complete():
  assert set(losses.OMNISOURCE_LOSS_FORMULAS) == set(losses.OMNISOURCE_LOSSES)
  assert losses.get_omnisource_loss("NCELearnableTempLoss_vsc_fc") is losses.omnisource_loss
  with pytest.raises(KeyError, match="unknown omnisource loss 'vsc_typo'"):
    losses.get_omnisource_loss("vsc_typo")


def test_dual_softmax_matches_original(loss_fixture):
  sim = jnp.asarray(loss_fixture["subtitle"]) @ jnp.asarray(loss_fixture["video"]).T
  np.testing.assert_allclose(losses.dual_softmax(sim), loss_fixture["dsl_sim"], rtol=1e-5, atol=1e-7)


def test_clip2video_loss_matches_original(fixtures_dir):
  torch = pytest.importorskip("torch")
  io = np.load(fixtures_dir / "clip2video_tiny_io.npz")
  state = torch.load(fixtures_dir / "clip2video_tiny.pt", map_location="cpu")
  scale = np.exp(state["clip.logit_scale"].float().numpy())
  tab_logits = scale * io["tab_text"] @ io["tab_video"].T
  np.testing.assert_allclose(losses.symmetric_ce(tab_logits), io["train_tab_loss"], rtol=1e-5)
  np.testing.assert_allclose(losses.clip2video_loss(io["logits_tdb"], tab_logits, 0.5), io["train_loss"], rtol=1e-5)


def test_bf16_features_give_float32_loss():
  rng = np.random.default_rng(1)
  video, text = _normalised(rng, 8, 16), _normalised(rng, 8, 16)
  video_bf16, text_bf16 = jnp.asarray(video, jnp.bfloat16), jnp.asarray(text, jnp.bfloat16)
  value = losses.nce_loss(video_bf16, text_bf16, jnp.float32(4.6))
  assert value.dtype == jnp.float32
  # Same as float32 on the bf16-rounded features: nothing after the inputs is rounded to bf16.
  reference = losses.nce_loss(video_bf16.astype(jnp.float32), text_bf16.astype(jnp.float32), 4.6)
  np.testing.assert_allclose(value, reference, rtol=1e-6)
  grads = jax.grad(losses.nce_loss, argnums=(0, 1))(video_bf16, text_bf16, jnp.float32(4.6))
  assert all(g.dtype == jnp.bfloat16 and bool(jnp.isfinite(g.astype(jnp.float32)).all()) for g in grads)


@pytest.mark.parametrize("loss_fn", [losses.nce_loss, losses.omnisource_loss], ids=lambda fn: fn.__name__)
def test_gradients_match_finite_differences(loss_fn):
  rng = np.random.default_rng(2)
  n_features = 2 if loss_fn is losses.nce_loss else 4
  with jax.enable_x64(True):
    args = [jnp.asarray(_normalised(rng, 5, 6), jnp.float64) for _ in range(n_features)]
    args.append(jnp.asarray(2.3, jnp.float64))
    assert loss_fn(*args).dtype == jnp.float64
    check_grads(loss_fn, args, order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


# --- the global batch split over 8 devices ---------------------------------------------------------

def _mesh(axis_type):
  if jax.device_count() < 8:
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail("CI must run the sharded loss tests on 8 devices "
                  "(XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
  return jax.make_mesh((8,), ("data",), axis_types=(axis_type,))


@functools.cache  # the one-device reference compiles once for both axis types
def _loss_and_gradients(loss_fn, n_features):
  """One jitted call: the loss, its gradients w.r.t. the features and logit_scale, and the gradients w.r.t.
  the parameters of linear maps producing the features (what the trainer differentiates)."""

  def projected_loss(weights, inputs, logit_scale):
    features = [x @ w for x, w in zip(inputs, weights)]
    return loss_fn(*[f / jnp.linalg.norm(f, axis=-1, keepdims=True) for f in features], logit_scale)

  def evaluate(features, logit_scale, weights, inputs):
    loss, feature_grads = jax.value_and_grad(loss_fn, argnums=tuple(range(n_features + 1)))(*features, logit_scale)
    param_grads = jax.grad(projected_loss, argnums=(0, 2))(weights, inputs, logit_scale)
    return loss, feature_grads, param_grads

  return jax.jit(evaluate)


_SHARDED_CASES = [(losses.nce_loss, 2), (losses.omnisource_loss, 4)]


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=str)
@pytest.mark.parametrize("loss_fn,n_features", _SHARDED_CASES, ids=lambda c: getattr(c, "__name__", str(c)))
def test_sharded_batch_gives_single_device_loss_and_gradients(loss_fn, n_features, axis_type):
  mesh = _mesh(axis_type)
  rng = np.random.default_rng(3)
  batch, width = 16, 8  # 2 samples per device; every other device's samples are negatives too
  features = [jnp.asarray(_normalised(rng, batch, width)) for _ in range(n_features)]
  inputs = [jnp.asarray(rng.normal(size=(batch, 12)), jnp.float32) for _ in range(n_features)]
  weights = [jnp.asarray(rng.normal(size=(12, width)) / 4, jnp.float32) for _ in range(n_features)]
  logit_scale = jnp.float32(2.3)
  # Unsharded arrays: everything on one device.
  expected = _loss_and_gradients(loss_fn, n_features)(features, logit_scale, weights, inputs)

  by_batch = NamedSharding(mesh, P("data"))
  sharded_features = [jax.device_put(f, by_batch) for f in features]
  sharded_inputs = [jax.device_put(x, by_batch) for x in inputs]
  replicated_weights = [jax.device_put(w, NamedSharding(mesh, P())) for w in weights]
  assert sharded_features[0].sharding.spec == P("data")
  assert len(sharded_features[0].addressable_shards) == 8

  variants = {"jit": loss_fn, "shard_map": losses.shard_map_loss(loss_fn, mesh)}
  for variant, fn in variants.items():
    loss, feature_grads, param_grads = _loss_and_gradients(fn, n_features)(
        sharded_features, logit_scale, replicated_weights, sharded_inputs)
    np.testing.assert_allclose(loss, expected[0], rtol=1e-6, err_msg=variant)
    for got, want in zip(feature_grads, expected[1]):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{variant}: feature gradients")
    for got, want in zip(jax.tree.leaves(param_grads), jax.tree.leaves(expected[2])):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{variant}: parameter gradients")


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit], ids=str)
def test_sharded_clip2video_loss(axis_type):
  mesh = _mesh(axis_type)
  rng = np.random.default_rng(4)
  global_logits, tab_logits = (jnp.asarray(rng.normal(size=(16, 16)) * 10, jnp.float32) for _ in range(2))
  expected = losses.clip2video_loss(global_logits, tab_logits, 0.5)
  expected_grads = jax.grad(losses.clip2video_loss, argnums=(0, 1))(global_logits, tab_logits, 0.5)
  by_rows = NamedSharding(mesh, P("data"))
  sharded = [jax.device_put(x, by_rows) for x in (global_logits, tab_logits)]
  np.testing.assert_allclose(jax.jit(losses.clip2video_loss)(*sharded, 0.5), expected, rtol=1e-6)
  grads = jax.jit(jax.grad(losses.clip2video_loss, argnums=(0, 1)))(*sharded, 0.5)
  for got, want in zip(grads, expected_grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def _unit(key, shape):
  x = jax.random.normal(key, shape)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("name", sorted(losses.OMNISOURCE_LOSSES) + ["nce", "clip2video"])
def test_masked_rows_equal_the_loss_without_them(name):
  """A corrupt record keeps its row (valid 0): the loss equals the loss of the batch without it, the masked
  row's features get no gradient, and an all-valid mask changes nothing, bit for bit."""
  keys = jax.random.split(jax.random.key(7), 4)
  feats = [_unit(k, (6, 8)) for k in keys]
  scale = jnp.asarray(2.3)
  valid = jnp.asarray([1, 1, 0, 1, 0, 1])
  keep = np.flatnonzero(np.asarray(valid))
  if name == "nce":
    fn = lambda f, v=None: losses.nce_loss(f[0], f[1], scale, v)
  elif name == "clip2video":
    fn = lambda f, v=None: losses.clip2video_loss(10 * f[0] @ f[1].T, 10 * f[2] @ f[3].T, 0.5, v)
  else:
    loss = losses.get_omnisource_loss(name)
    fn = lambda f, v=None: loss(f[0], f[1], f[2], f[3], scale, v)
  masked = fn(feats, valid)
  np.testing.assert_allclose(masked, fn([f[keep] for f in feats]), rtol=1e-6)
  assert fn(feats, jnp.ones(6, jnp.int32)) == fn(feats)
  grads = jax.grad(lambda f: fn(f, valid))(feats)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(np.asarray(g)[[2, 4]], 0.0)
  # Every row masked: a finite zero, not NaN.
  assert fn(feats, jnp.zeros(6, jnp.int32)) == 0.0
