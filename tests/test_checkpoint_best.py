"""best.json always names a checkpoint that retention kept, ties included."""

import jax.numpy as jnp

from clipvip_jax.train import checkpoint


def test_best_checkpoint_survives_retention_with_ties(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, keep=1, best_metric="val/t2v/R@1", async_save=False)
  params = {"w": jnp.ones((2,))}
  for step, r1 in ((1, 5.0), (2, 7.0), (3, 7.0), (4, 3.0), (5, None)):
    metrics = None if r1 is None else {"val/t2v/R@1": r1}
    ckpt.save(step, params, {"m": jnp.zeros((2,))}, "{}", {}, {}, metrics)
  ckpt.manager.wait_until_finished()
  best = checkpoint.resolve_step(tmp_path, "best")
  assert best.name == "3" and best.exists()
  assert sorted(ckpt.all_steps()) == [3, 5]  # the best (latest of the tie) and the latest


def test_workdir_params_load_through_a_relative_path(tmp_path, monkeypatch):
  from clipvip_jax.models import clip
  from clipvip_jax.params import flat_params
  from flax import nnx

  cfg = clip.clip_config("tiny")
  model = clip.CLIP(cfg, rngs=nnx.Rngs(0))
  graph, params = nnx.split(model, nnx.Param)
  pure = nnx.to_pure_dict(params)
  ckpt = checkpoint.Checkpointer(tmp_path / "run", keep=1, async_save=False)
  ckpt.save(3, pure, {"m": jnp.zeros((1,))}, "{}", {"kind": "meanp", "model": cfg.to_dict()}, {})
  ckpt.close()
  monkeypatch.chdir(tmp_path)
  kind, loaded_cfg, flat = checkpoint.load_workdir_params("run", "latest")
  assert kind == "meanp" and loaded_cfg == cfg
  expected = {k: v for k, v in flat_params(model).items()}
  assert flat.keys() == expected.keys()
  for k in flat:
    assert (flat[k] == expected[k]).all(), k


def test_one_process_saves_replicated_arrays_without_slicing_them(tmp_path, monkeypatch):
  """Orbax's replica-parallel save cuts each replicated array into a slice per device (a dispatched device op
  each: 1.7 s per save of the tiny test model on 8 devices); on one process it is off, and the arrays read back."""
  import jax
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  slices = []
  real = jax.lax.slice_in_dim
  monkeypatch.setattr(jax.lax, "slice_in_dim", lambda *a, **k: slices.append(a) or real(*a, **k))
  replicated = NamedSharding(Mesh(np.asarray(jax.devices()), ("data",)), PartitionSpec())
  params = {"w": jax.device_put(jnp.arange(2048 * 1024.0).reshape(2048, 1024), replicated)}
  opt_state = {"m": jax.device_put(jnp.ones((512,)), replicated)}
  ckpt = checkpoint.Checkpointer(tmp_path, keep=1, async_save=False)
  ckpt.save(1, params, opt_state, "{}", {}, {})
  ckpt.manager.wait_until_finished()
  assert not slices
  shardings = lambda tree: jax.tree.map(lambda _: replicated, tree)  # noqa: E731
  restored, _, _, _ = ckpt.restore(1, params, shardings(params), opt_state, shardings(opt_state))
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(2048 * 1024.0).reshape(2048, 1024))
