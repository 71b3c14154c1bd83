"""Logical-axis rules: what is split, what falls back to replicated, and that sharded params hold the same values."""

import jax
import numpy as np
import pytest
from flax import nnx

from clipvip_jax.models import clip
from clipvip_jax.train import sharding

needs8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


@needs8
def test_logical_to_spec_maps_and_falls_back():
  mesh = sharding.make_mesh((2, 2, 2))
  rules = sharding.DEFAULT_RULES
  assert sharding.logical_to_spec(("embed", "mlp"), (64, 128), mesh, rules) == jax.sharding.PartitionSpec("fsdp", "tensor")
  # 3 is not divisible by the fsdp axis (2): replicated rather than an error.
  assert sharding.logical_to_spec(("embed", "mlp"), (3, 128), mesh, rules) == jax.sharding.PartitionSpec(None, "tensor")
  # The same mesh axis is never used twice in one spec.
  assert sharding.logical_to_spec(("mlp", "heads"), (8, 8), mesh, rules) == jax.sharding.PartitionSpec("tensor", None)
  # Batch spans data and fsdp.
  assert sharding.logical_to_spec(("batch", None), (8, 5), mesh, rules) == jax.sharding.PartitionSpec(("data", "fsdp"), None)


@needs8
def test_make_mesh_shapes_and_errors():
  assert dict(sharding.make_mesh((-1, 1, 1)).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert dict(sharding.make_mesh((2, -1, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh((4, 4, 1))
  with pytest.raises(ValueError, match="3 entries"):
    sharding.make_mesh((8, 1))


@needs8
def test_sharded_model_computes_the_same_embeddings():
  model = clip.CLIP(clip.clip_config("tiny"), rngs=nnx.Rngs(0))
  graph, state = nnx.split(model)
  mesh = sharding.make_mesh((2, 2, 2))
  shardings = sharding.state_shardings(state, mesh, sharding.DEFAULT_RULES)
  assert sharding.describe_shardings(shardings, state), "expected some parameters to be split on a (2,2,2) mesh"
  images = np.random.RandomState(0).randn(8, 32, 32, 3).astype(np.float32)

  def encode(st, x):
    return nnx.merge(graph, st).encode_image(x)

  ref = jax.jit(encode)(state, images)
  sharded_state = jax.device_put(state, shardings)
  x = jax.device_put(images, sharding.batch_sharding(mesh, sharding.DEFAULT_RULES, 4))
  out = jax.jit(encode)(sharded_state, x)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_remat_gives_the_same_values_and_gradients():
  cfg = clip.clip_config("tiny")
  images = np.random.RandomState(1).randn(2, 32, 32, 3).astype(np.float32)
  outs = []
  for remat in ("none", "full", "dots"):
    model = clip.CLIP(cfg.replace(remat=remat), rngs=nnx.Rngs(0))
    graph, state = nnx.split(model)

    def loss(st):
      return (nnx.merge(graph, st).encode_image(images) ** 3).sum()

    outs.append(jax.jit(jax.value_and_grad(loss))(state))
  for value, grads in outs[1:]:
    np.testing.assert_allclose(value, outs[0][0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(outs[0][1])):
      np.testing.assert_allclose(a, b, atol=1e-6)
