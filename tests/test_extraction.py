"""extract_embeddings: one compiled shape for any number of inputs, results equal to unbatched encoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clipvip_jax.retrieval.pretrained import Pretrained
from clipvip_jax.retrieval.extraction import extract_embeddings, pad_batch
from clipvip_jax.kinds import build_model, param_shapes
from clipvip_jax.models.clip import clip_config


def _counting_encoder():
  """A jitted encoder that counts how often it is traced (= compiled)."""
  traces = []
  w = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)

  @jax.jit
  def encode(x, mask):
    traces.append(x.shape)
    y = (x * mask[:, :, None]).sum(1) @ w
    return y / jnp.linalg.norm(y, axis=-1, keepdims=True)

  return encode, traces


@pytest.mark.parametrize("n", [1, 7, 10, 16])
def test_one_compilation_and_unbatched_values(n):
  rng = np.random.default_rng(n)
  x = rng.normal(size=(n, 5, 6)).astype(np.float32)
  mask = (rng.random((n, 5)) > 0.3).astype(np.int32)
  encode, traces = _counting_encoder()
  got = extract_embeddings(encode, {"x": x, "mask": mask}, batch_size=4, progress=False)
  assert traces == [(4, 5, 6)]  # one trace, at the fixed batch size, whatever n is
  want = np.asarray(encode(x, mask))  # all n rows in one call
  assert got.shape == (n, 4)
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_iterator_of_batches_and_pytree_outputs():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(9, 3)).astype(np.float32)
  batches = ({"x": x[i:i + 4]} for i in range(0, 9, 4))
  traces = []

  @jax.jit
  def encode(x):
    traces.append(1)
    return {"double": 2 * x, "sum": x.sum(-1)}

  got = extract_embeddings(encode, batches, batch_size=4, total=9, progress=False)
  assert len(traces) == 1
  np.testing.assert_array_equal(got["double"], 2 * x)
  np.testing.assert_allclose(got["sum"], x.sum(-1), rtol=1e-6)


def test_pad_batch_repeats_last_row_and_keeps_none():
  padded, n = pad_batch({"ids": np.arange(6).reshape(3, 2), "frame_mask": None}, 5)
  assert n == 3 and padded["frame_mask"] is None
  np.testing.assert_array_equal(padded["ids"], [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]])


@pytest.mark.parametrize("arrays, batch_size, message", [
    ({"a": np.zeros((3, 2)), "b": np.zeros((4, 2))}, 2, "differ in their first dimension"),
    ({"a": np.zeros((3, 2))}, 0, "batch_size must be >= 1"),
    ({}, 2, "no input arrays"),
])
def test_bad_inputs(arrays, batch_size, message):
  with pytest.raises(ValueError, match=message):
    extract_embeddings(lambda **kw: kw, arrays, batch_size, progress=False)


def test_with_a_pretrained_model():
  """Pretrained.encode_text through extract_embeddings: one compilation, same rows as a single call."""
  cfg = clip_config("tiny")
  rng = np.random.default_rng(2)
  params = {k: (0.05 * rng.normal(size=s)).astype(np.float32) for k, s in param_shapes("clip", cfg).items()}
  model = Pretrained(build_model("clip", cfg, params), "clip", cfg)
  ids = rng.integers(1, 1000, size=(11, 16)).astype(np.int32)
  ids[:, 6] = 49407
  mask = np.ones_like(ids)
  got = extract_embeddings(model.encode_text, {"ids": ids, "mask": mask}, batch_size=4, progress=False)
  assert model.jitted("encode_text")._cache_size() == 1
  np.testing.assert_allclose(got, np.asarray(model.encode_text(ids, mask)), atol=1e-6)


def test_device_encoder_runs_the_tpu_kernel_per_device(monkeypatch):
  """A CLIP-ViP model with attention="pallas" (what "auto" gives on TPU) encoded over 4 devices: the kernel runs
  per device under shard_map (XLA cannot split a Pallas kernel), here in Pallas' TPU interpreter; the rows equal
  the XLA-attention model's, padded frames included."""
  from jax.experimental.pallas import tpu as pltpu

  from clipvip_jax.models.clipvip import CLIPViPConfig
  from clipvip_jax.retrieval.extraction import device_encoder
  devices = jax.local_devices()[:4]
  assert len(devices) == 4, "the suite runs with --xla_force_host_platform_device_count=8 (Makefile)"
  cfg = CLIPViPConfig(clip=clip_config("tiny"), num_proxies=2, temporal_size=2)
  rng = np.random.default_rng(3)
  params = {k: (0.05 * rng.normal(size=s)).astype(np.float32) for k, s in param_shapes("clipvip", cfg).items()}
  video = rng.normal(size=(8, 2, 32, 32, 3)).astype(np.float32)
  frame_mask = np.ones((8, 2), np.int32)
  frame_mask[3, 1] = 0
  xla = Pretrained(build_model("clipvip", cfg, params), "clipvip", cfg)
  want = np.asarray(xla.encode_video(video, frame_mask))
  kernel_cfg = CLIPViPConfig(clip=cfg.clip.replace(attention="pallas"), num_proxies=2, temporal_size=2)
  kernel = Pretrained(build_model("clipvip", kernel_cfg, params), "clipvip", kernel_cfg)
  encode = device_encoder(kernel, "encode_video", devices)
  # On a TPU an unwrapped kernel fails to compile; the interpreter's kernel would not, so the wrap is watched.
  shard_maps, shard_map = [], jax.shard_map
  monkeypatch.setattr(jax, "shard_map", lambda f, **kw: shard_maps.append(kw["mesh"]) or shard_map(f, **kw))
  with pltpu.force_tpu_interpret_mode():
    got = np.asarray(encode(video=video, frame_mask=frame_mask))
    traced = str(jax.make_jaxpr(kernel.jitted("encode_video"))(kernel.state, video, frame_mask))
  assert "pallas_call" in traced
  assert shard_maps and all(m.devices.size == 4 for m in shard_maps)  # one per layer, over the 4 devices
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
