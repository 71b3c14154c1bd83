"""The jitted train step: same loss and parameters on every mesh as on one device, gradient accumulation equal to
one full-batch step, non-finite steps skipped with everything unchanged. 8 simulated CPU devices, a tiny CLIP-ViP."""

import functools

import jax
import numpy as np
import pytest

from clipvip_jax.train import sharding, trainer

CONFIG_PATH = "configs/tiny_test.py"
BATCH, FRAMES, SIZE, TEXT_LEN = 8, 2, 16, 8


def _config(grad_accum: int = 1):
  from clipvip_jax.train.cli import load_config
  config = load_config(CONFIG_PATH)
  config.grad_accum = grad_accum
  config.model.clip.vision.image_size = SIZE
  config.model.config.temporal_size = FRAMES
  config.model.clip.text.max_len = TEXT_LEN
  config.optim.schedule = "constant"  # a visible lr at step 1 (warmup would start near 0)
  return config


def _batch() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 1000, (BATCH, TEXT_LEN)).astype(np.int32)
  lengths = rng.integers(3, TEXT_LEN, BATCH)
  mask = (np.arange(TEXT_LEN)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask > 0, ids, 0)
  ids[np.arange(BATCH), lengths - 1] = 49407  # end of text: the pooled (highest) id
  return {"video": rng.normal(size=(BATCH, FRAMES, SIZE, SIZE, 3)).astype(np.float32),
          "frame_mask": np.ones((BATCH, FRAMES), np.int32), "text_ids": ids, "text_mask": mask}


def _mesh(shape):
  n = int(np.prod(shape))
  if len(jax.devices()) < n:
    pytest.skip(f"needs {n} devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  return sharding.make_mesh(shape, jax.devices()[:n])


def _rules(config):
  return tuple(tuple(r) for r in config.sharding_rules)


def _place_batch(mesh, rules, batch):
  return {k: jax.device_put(v, sharding.batch_sharding(mesh, rules, v.ndim)) for k, v in batch.items()}


@functools.lru_cache(maxsize=None)
def _initial_params() -> dict[str, np.ndarray]:
  """One random init (on one device), shared by every mesh: each setup then only places it."""
  from clipvip_jax.params import flat_params
  from clipvip_jax.train import model_init
  config = _config()
  ms = model_init.init_model(config, _mesh((1, 1, 1)), _rules(config))
  return {k: np.asarray(v) for k, v in flat_params(ms.model()).items()}


@functools.lru_cache(maxsize=None)
def _setup(shape: tuple[int, int, int], grad_accum: int = 1):
  config = _config(grad_accum)
  mesh = _mesh(shape)
  return trainer.setup_training(config, mesh, _rules(config), 10, initial_params=_initial_params()), mesh


def _fresh_state(setup):
  """Copies of the initial params and optimiser state (the step donates its inputs)."""
  return jax.tree.map(lambda x: x.copy(), (setup.model.params, setup.opt_state))


@functools.lru_cache(maxsize=None)
def _one_step(shape: tuple[int, int, int], grad_accum: int = 1):
  """(loss, params after one step as numpy, finite) on `shape`."""
  setup, mesh = _setup(shape, grad_accum)
  params, opt_state = _fresh_state(setup)
  params, _, metrics = setup.train_step(params, opt_state, _place_batch(mesh, _rules(_config()), _batch()))
  return float(metrics["loss"]), jax.tree.map(np.asarray, params), bool(metrics["finite"])


def _assert_params_close(a, b, **tol):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, err_msg=jax.tree_util.keystr(path), **tol)


@pytest.mark.parametrize("shape", [(8, 1, 1), pytest.param((2, 4, 1), marks=pytest.mark.slow),
                                   pytest.param((2, 2, 2), marks=pytest.mark.slow)])
def test_one_step_on_a_mesh_equals_one_device(shape):
  loss_1, params_1, _ = _one_step((1, 1, 1))
  loss_n, params_n, finite = _one_step(shape)
  assert finite and np.isfinite(loss_1)
  assert loss_n == pytest.approx(loss_1, rel=1e-5)
  _assert_params_close(params_n, params_1, rtol=1e-4, atol=1e-6)
  # The step moved the parameters (the comparison is not between two untouched inits).
  init = _initial_params()
  from clipvip_jax.train.optim import flat_names
  moved = [np.abs(x - init[n]).max() for n, x in zip(flat_names(params_1), jax.tree.leaves(params_1))]
  assert max(moved) > 1e-4


def test_the_pallas_attention_step_on_a_mesh_equals_xla_on_one_device():
  """attention="pallas" (the proxy-attention TPU kernel, run by Pallas' TPU interpreter) inside the trainer's step
  on a 4-device batch mesh: the kernel runs per device under shard_map (layers.kernel_partition), and the loss and
  updated parameters equal the XLA attention's step on one device."""
  from jax.experimental.pallas import tpu as pltpu
  loss_1, params_1, _ = _one_step((1, 1, 1))
  config = _config()
  config.model.attention = "pallas"
  mesh = _mesh((4, 1, 1))
  setup = trainer.setup_training(config, mesh, _rules(config), 10, initial_params=_initial_params())
  params, opt_state = _fresh_state(setup)
  batch = _place_batch(mesh, _rules(config), _batch())
  with pltpu.force_tpu_interpret_mode():
    # The kernel is in the traced step (not a silent fallback to XLA's attention), inside a shard_map.
    jaxpr = str(jax.make_jaxpr(setup.train_step.fn)(params, opt_state, batch))
    assert "pallas_call" in jaxpr and "shard_map" in jaxpr
    params, _, metrics = setup.train_step(params, opt_state, batch)
  assert bool(metrics["finite"])
  assert float(metrics["loss"]) == pytest.approx(loss_1, rel=1e-5)
  _assert_params_close(jax.tree.map(np.asarray, params), params_1, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(4, 1, 1), pytest.param((1, 4, 1), marks=pytest.mark.slow)])
def test_a_step_built_for_tpu_with_the_patch_convolution_equals_the_einsum_on_one_device(shape):
  """A model built for a TPU target computes its patch embedding as a strided convolution (clip.PATCH_CONV, its own
  float32 kernel gradient), the CPU build as an einsum. The TPU build's step, on a 4-device batch mesh or under
  FSDP (where the convolution's kernel is gathered), gives the einsum step's loss and parameters."""
  from clipvip_jax.models import layers
  loss_1, params_1, _ = _one_step((1, 1, 1))
  config = _config()
  mesh = _mesh(shape)
  with layers.build_target(layers.Target("tpu")):
    setup = trainer.setup_training(config, mesh, _rules(config), 10, initial_params=_initial_params())
  assert setup.model.graphdef is not None and "conv_general_dilated" in str(jax.make_jaxpr(setup.train_step.fn)(
      *_fresh_state(setup), _place_batch(mesh, _rules(config), _batch())))
  params, opt_state = _fresh_state(setup)
  params, _, metrics = setup.train_step(params, opt_state, _place_batch(mesh, _rules(config), _batch()))
  assert bool(metrics["finite"])
  assert float(metrics["loss"]) == pytest.approx(loss_1, rel=1e-5)
  _assert_params_close(jax.tree.map(np.asarray, params), params_1, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 1, 1), pytest.param((2, 2, 2), marks=pytest.mark.slow)])
def test_gradient_accumulation_of_two_half_batches_equals_one_full_batch_step(shape):
  loss_full, params_full, _ = _one_step(shape, 1)
  loss_accum, params_accum, finite = _one_step(shape, 2)
  assert finite
  # The loss is the full-batch contrastive loss (all 8 negatives), not the mean of two 4-sample losses.
  assert loss_accum == pytest.approx(loss_full, rel=1e-5)
  _assert_params_close(params_accum, params_full, rtol=1e-4, atol=1e-6)


def test_non_finite_batch_is_skipped_with_params_and_optimizer_state_unchanged():
  setup, mesh = _setup((2, 1, 1))
  rules = _rules(_config())
  params, opt_state = _fresh_state(setup)
  batch = _batch()
  good = _place_batch(mesh, rules, batch)
  params, opt_state, m1 = setup.train_step(params, opt_state, good)
  before = jax.tree.map(np.array, (params, opt_state))
  # A copy: on CPU device_put may alias the host array, and `good` must stay good for the third step.
  batch = dict(batch, video=batch["video"].copy())
  batch["video"][3, 1, 2, 2, 0] = np.nan  # one pixel of one clip
  params, opt_state, m2 = setup.train_step(params, opt_state, _place_batch(mesh, rules, batch))
  assert bool(m1["finite"]) and not bool(m2["finite"])
  assert not np.isfinite(float(m2["loss"]))
  after = jax.tree.map(np.array, (params, opt_state))
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(x, y)  # bit-identical: moments, count and parameters
  # The run goes on: the next good batch is applied normally.
  params, opt_state, m3 = setup.train_step(params, opt_state, good)
  assert bool(m3["finite"]) and int(after[1][1].count) + 1 == int(opt_state[1].count)


def test_uint8_frames_are_normalised_on_device_as_the_host_pipeline_does():
  """data.dtype "uint8" ships raw frames; the step normalises them (padded frames zeroed) to the same loss and
  gradients as frames normalised by the host pipeline."""
  from clipvip_jax.train import step as step_lib
  from data_pipelines import transforms

  rng = np.random.default_rng(1)
  raw = rng.integers(0, 256, (BATCH, FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
  mask = np.ones((BATCH, FRAMES), np.int32)
  mask[0, -1] = 0
  host = transforms.normalize_frames(raw, mask, np.float32)
  np.testing.assert_allclose(np.asarray(step_lib.pixels(jax.numpy.asarray(raw), mask)), host, rtol=0, atol=2e-6)
  assert step_lib.pixels(jax.numpy.asarray(host)) is not None and step_lib.pixels(host) is host  # float: as is

  setup, mesh = _setup((1, 1, 1))
  out = []
  for video in (host, raw):
    params, opt_state = _fresh_state(setup)
    batch = dict(_batch(), video=video, frame_mask=mask)
    _, _, metrics = setup.train_step(params, opt_state, _place_batch(mesh, _rules(_config()), batch))
    out.append((float(metrics["loss"]), float(metrics["grad_norm"])))
  assert out[1] == pytest.approx(out[0], rel=1e-5)


def test_a_masked_row_trains_like_a_batch_without_it():
  """A corrupt record's row (valid 0; whatever finite pixels its placeholder holds) leaves the step exactly as if
  the batch were the other rows: same loss and gradient norm as the 7-row batch without it; the count comes back
  as masked_rows."""
  setup, mesh = _setup((1, 1, 1))
  rules = _rules(_config())
  batch = _batch()
  batch["video"] = batch["video"].copy()
  batch["video"][5] = 1e3  # far from any real clip: it would dominate the loss if it counted
  valid = np.ones(BATCH, np.int32)
  valid[5] = 0
  params, opt_state = _fresh_state(setup)
  _, _, masked = setup.train_step(params, opt_state, _place_batch(mesh, rules, dict(batch, valid=valid)))
  keep = np.flatnonzero(valid)
  params, opt_state = _fresh_state(setup)
  _, _, reference = setup.train_step(params, opt_state, _place_batch(mesh, rules,
                                                                     {k: v[keep] for k, v in batch.items()}))
  assert bool(masked["finite"]) and float(masked["masked_rows"]) == 1.0
  assert float(masked["loss"]) == pytest.approx(float(reference["loss"]), rel=1e-5)
  assert float(masked["grad_norm"]) == pytest.approx(float(reference["grad_norm"]), rel=1e-5)
