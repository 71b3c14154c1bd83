"""scan_layers (layers.Encoder running its blocks under jax.lax.scan) computes the same function as the unrolled
loop, with the same parameter names: values and gradients of the CLIP towers and CLIP-ViP (with remat), the
trainer's step on a mesh of 8 simulated devices (also with constrain_activations), and a converted fixture
checkpoint loaded into a scanned model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clipvip_jax import kinds
from clipvip_jax.models import clip, layers
from clipvip_jax.models.clipvip import CLIPViP, CLIPViPConfig

import test_train_step as ts



def _clip_cfg(**kw) -> clip.CLIPConfig:
  """The tiny CLIP with 3 blocks per tower (each block's weights differ)."""
  import dataclasses
  base = clip.clip_config("tiny")
  return base.replace(vision=dataclasses.replace(base.vision, layers=3), text=dataclasses.replace(base.text, layers=3),
                      **kw)


def _value_and_grad(model_fn, cfg, args):
  """(value, grads) of a scalar of the model's outputs, jitted, for the model built from `cfg` with seed 0."""
  model = model_fn(cfg)
  graph, state = nnx.split(model)

  def loss(st):
    out = nnx.merge(graph, st)(*args)
    return sum(jnp.sum(jnp.sin(3 * v)) for v in jax.tree.leaves(out))

  return jax.jit(jax.value_and_grad(loss))(state)


def _assert_same(ref, got, rtol=1e-5):
  """Equal up to float32 rounding: each gradient leaf within rtol of its own largest entry (XLA fuses and orders
  the sums differently in the loop body than in the unrolled graph)."""
  value_ref, grads_ref = ref
  value, grads = got
  np.testing.assert_allclose(value, value_ref, rtol=rtol)
  flat_ref = jax.tree_util.tree_flatten_with_path(grads_ref)[0]
  flat = jax.tree.leaves(grads)
  assert len(flat) == len(flat_ref)
  for (path, a), b in zip(flat_ref, flat):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(b, a, rtol=0, atol=rtol * float(np.abs(a).max()) + 1e-6,
                               err_msg=jax.tree_util.keystr(path))


def test_scanned_model_has_the_unrolled_parameter_names():
  cfg = CLIPViPConfig(clip=_clip_cfg(), num_proxies=2, temporal_size=3)
  assert kinds.param_shapes("clipvip", cfg) == kinds.param_shapes("clipvip", cfg.replace(
      clip=cfg.clip.replace(scan_layers=True)))
  model = nnx.eval_shape(lambda: CLIPViP(cfg.replace(clip=cfg.clip.replace(scan_layers=True)), rngs=nnx.Rngs(0)))
  assert model.vision.encoder.scan_layers and model.text.encoder.scan_layers


@pytest.mark.parametrize("remat", [pytest.param("none", marks=pytest.mark.slow), "full", "elementwise",
                                   pytest.param("dots_no_batch", marks=pytest.mark.slow)])
def test_clip_towers_scanned_equal_unrolled(remat):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  ids = rng.integers(1, 1000, (2, 8)).astype(np.int32)
  ids[:, -1] = 49407
  mask = np.ones((2, 8), np.int32)
  mask[1, 6:] = 0
  build = lambda c: clip.CLIP(c, rngs=nnx.Rngs(0))
  ref = _value_and_grad(build, _clip_cfg(remat=remat), (images, ids, mask))
  got = _value_and_grad(build, _clip_cfg(remat=remat, scan_layers=True), (images, ids, mask))
  _assert_same(ref, got)


@pytest.mark.parametrize("remat", ["none", pytest.param("full", marks=pytest.mark.slow)])
def test_clipvip_scanned_equals_unrolled(remat):
  rng = np.random.default_rng(1)
  video = rng.normal(size=(2, 3, 32, 32, 3)).astype(np.float32)
  frame_mask = np.array([[1, 1, 1], [1, 1, 0]], np.int32)
  ids = rng.integers(1, 1000, (2, 8)).astype(np.int32)
  ids[:, -1] = 49407
  build = lambda c: CLIPViP(c, rngs=nnx.Rngs(0))
  cfg = CLIPViPConfig(clip=_clip_cfg(remat=remat), num_proxies=2, temporal_size=3, temporal_init_std=0.02)
  args = (video, ids, None, frame_mask)
  ref = _value_and_grad(build, cfg, args)
  got = _value_and_grad(build, cfg.replace(clip=cfg.clip.replace(scan_layers=True)), args)
  _assert_same(ref, got)


# ---- the trainer's step on 8 simulated devices


def _step_config(scan_layers: bool, constrain: bool, remat: str = "none"):
  config = ts._config()
  config.model.clip.vision.layers = 2
  config.model.clip.text.layers = 2
  config.model.scan_layers = scan_layers
  config.model.remat = remat
  config.constrain_activations = constrain
  return config


_INITIAL: dict = {}


def _initial_params():
  """One random init of the 2-block tiny CLIP-ViP on one device (names do not depend on scan_layers)."""
  if not _INITIAL:
    from clipvip_jax.params import flat_params
    from clipvip_jax.train import model_init
    config = _step_config(False, False)
    ms = model_init.init_model(config, ts._mesh((1, 1, 1)), ts._rules(config))
    _INITIAL.update({k: np.asarray(v) for k, v in flat_params(ms.model()).items()})
  return _INITIAL


def _setup(shape, scan_layers, constrain, remat="none"):
  from clipvip_jax.train import trainer
  config = _step_config(scan_layers, constrain, remat)
  mesh = ts._mesh(shape)
  return trainer.setup_training(config, mesh, ts._rules(config), 10, initial_params=_initial_params()), mesh


def _one_step(shape, scan_layers, constrain, remat="none"):
  setup, mesh = _setup(shape, scan_layers, constrain, remat)
  params, opt_state = setup.model.params, setup.opt_state
  params, _, metrics = setup.train_step(params, opt_state, ts._place_batch(mesh, ts._rules(ts._config()),
                                                                           ts._batch()))
  return float(metrics["loss"]), jax.tree.map(np.asarray, params), bool(metrics["finite"])


@pytest.fixture(scope="module")
def reference_step():
  """Unrolled, unconstrained, one device."""
  return _one_step((1, 1, 1), False, False)


@pytest.mark.parametrize("shape,scan,constrain,remat", [
    pytest.param((8, 1, 1), True, False, "none", marks=pytest.mark.slow),  # data parallel, scanned
    ((2, 4, 1), False, True, "elementwise"),  # FSDP, activations pinned to the batch sharding
    ((2, 4, 1), True, True, "full"),  # FSDP, scanned, pinned, rematerialised
])
def test_step_on_a_mesh_equals_the_unrolled_one_device_step(reference_step, shape, scan, constrain, remat):
  loss_1, params_1, _ = reference_step
  loss_n, params_n, finite = _one_step(shape, scan, constrain, remat)
  assert finite
  assert loss_n == pytest.approx(loss_1, rel=1e-5)
  ts._assert_params_close(params_n, params_1, rtol=1e-4, atol=1e-6)


def test_constrain_activations_reaches_every_block():
  """The constraint is in the traced step only when asked for: 3 per block (input, middle, output)."""
  counts = {}
  for constrain in (False, True):
    setup, mesh = _setup((2, 4, 1), False, constrain)
    batch = ts._place_batch(mesh, ts._rules(ts._config()), ts._batch())
    text = setup.train_step.fn.lower(setup.model.params, setup.opt_state, batch).as_text()
    counts[constrain] = text.count("sdy.sharding_constraint") + text.count("@Sharding")  # Shardy or GSPMD
  blocks = 2 + 2  # vision + text, forward pass (the backward pass adds its own)
  assert counts[True] >= counts[False] + 3 * blocks


# ---- a converted checkpoint loads into a scanned model


def test_converted_fixture_checkpoint_loads_into_a_scanned_model(fixtures_dir, tmp_path):
  import ml_collections
  import torch
  from clipvip_jax import converted_checkpoint
  from clipvip_jax.convert import clipvip as convert_clipvip
  from clipvip_jax.train import model_init, sharding
  sd = {k: v.numpy() for k, v in torch.load(fixtures_dir / "clipvip_tiny.pt", map_location="cpu").items()}
  config = json.loads((fixtures_dir / "clipvip_tiny_config.json").read_text())
  io = dict(np.load(fixtures_dir / "clipvip_tiny_io.npz"))
  out = converted_checkpoint.save_converted(convert_clipvip.convert(sd, config, "clipvip_tiny.pt"), tmp_path / "c")
  # A directory converted before scan_layers existed has no such key: it must still load.
  meta = json.loads((out / converted_checkpoint.CONFIG_FILE).read_text())
  meta["model"]["clip"].pop("scan_layers")
  (out / converted_checkpoint.CONFIG_FILE).write_text(json.dumps(meta))
  run = ml_collections.ConfigDict(dict(seed=0, model=dict(kind="clipvip", scan_layers=True),
                                       init=dict(checkpoint=str(out))))
  ms = model_init.init_model(run, sharding.make_mesh((1, 1, 1), jax.devices()[:1]), sharding.DEFAULT_RULES)
  assert ms.config.clip.scan_layers and ms.config.clip.vision.layers > 1
  model = ms.model()
  assert isinstance(model.vision.encoder, layers.Encoder) and model.vision.encoder.scan_layers
  video = io["video_T4"].transpose(0, 1, 3, 4, 2)
  hidden = nnx.jit(lambda m, v: m.vision_features(v)["last_hidden"])(model, jnp.asarray(video))
  np.testing.assert_allclose(hidden, io["video_T4_last_hidden"], atol=1e-4)
  text = nnx.jit(lambda m, i, k: m.text(i, k)["last_hidden"])(model, jnp.asarray(io["text_ids"]),
                                                               jnp.asarray(io["text_mask"]))
  np.testing.assert_allclose(text, io["text_last_hidden"], atol=1e-4)


# ---- remat "elementwise": LayerNorms and the activation recomputed, the same function


def test_elementwise_remat_gives_the_same_values_and_gradients_and_keeps_less():
  from jax._src.ad_checkpoint import saved_residuals
  rng = np.random.default_rng(2)
  images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  ids = rng.integers(1, 1000, (2, 8)).astype(np.int32)
  ids[:, -1] = 49407
  build = lambda c: clip.CLIP(c, rngs=nnx.Rngs(0))
  ref = _value_and_grad(build, _clip_cfg(), (images, ids))
  got = _value_and_grad(build, _clip_cfg(remat="elementwise"), (images, ids))
  _assert_same(ref, got)
  saved = {}
  for remat in ("none", "elementwise"):
    graph, state = nnx.split(build(_clip_cfg(remat=remat)))
    res = saved_residuals(lambda s: nnx.merge(graph, s).encode_image(images).sum(), state)
    saved[remat] = sum(int(np.prod(r.shape)) * r.dtype.itemsize for r, _ in res if r.ndim >= 3)
  assert saved["elementwise"] < 0.8 * saved["none"]


def test_auto_constrain_activations_is_on_for_tpu_and_fsdp_only():
  """config.constrain_activations "auto" (the default): on for TPU targets (B/16 pretraining planned on v6e-64
  moved 23% fewer bytes with it) and under FSDP, off for data-parallel CPU/GPU runs; True/False are kept, anything
  else is one sentence."""
  from clipvip_jax.train import config_schema, sharding
  assert config_schema.TOP["constrain_activations"].default is None  # = "auto"
  data = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  fsdp = sharding.make_mesh((1, 2, 1), jax.devices()[:2])
  resolve = sharding.resolve_constrain_activations
  assert resolve("auto", data, "tpu") and not resolve("auto", data, "cpu") and not resolve("auto", data, "gpu")
  assert resolve(None, data, "tpu") and not resolve(None, data, "cpu")
  assert resolve("auto", fsdp, "cpu") and resolve("auto", fsdp, "gpu")
  assert resolve(True, data, "cpu") and not resolve(False, data, "tpu")
  with pytest.raises(ValueError, match=r"config.constrain_activations = 'yes'; use True, False or 'auto' \(None\)"):
    resolve("yes", data, "cpu")


def test_auto_remat_is_the_fastest_measured_policy_of_the_backend():
  """The configs' default remat "auto": "elementwise" on XLA:CPU (docs/performance.md section 1), "none" on
  GPU/TPU; an explicit policy is kept, an unknown one is refused."""
  assert clip.CLIPConfig().remat == "auto"
  assert layers.resolve_remat("auto", "cpu") == "elementwise"
  assert layers.resolve_remat("auto", "gpu") == layers.resolve_remat("auto", "tpu") == "none"
  assert layers.resolve_remat("full", "cpu") == "full"
  with pytest.raises(ValueError, match="unknown remat policy 'some'"):
    layers.resolve_remat("some")
  encoder = layers.Encoder(8, 1, 2, 16, rngs=nnx.Rngs(0))
  assert jax.default_backend() == "cpu" and encoder.remat == "elementwise"
  assert encoder.blocks[0].ln_1.recompute and encoder.blocks[0].mlp.recompute_act
