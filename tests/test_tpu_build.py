"""What a model built for a TPU target computes differently from the CPU/GPU build, and that it is the same function.

- The patch embedding's two products (layers.Product): the einsum (CPU/GPU) and the strided convolution built for
  TPU give the same tokens and gradients, in float32 and bfloat16 (where the kernel gradient must leave its product
  in float32, as every projection's does).
- LayerNorm's variance: one pass (TPU) or two (CPU/GPU), the same values and gradients on realistic residual
  streams.
The build target picks each."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clipvip_jax.models import clip, layers


def _embedding(product: str, dtype, patch: int = 8, channels: int = 3, width: int = 16):
  cfg = clip.VisionConfig(width=width, layers=1, heads=2, mlp_dim=32, patch_size=patch, image_size=32,
                          channels=channels)
  module = clip.PatchEmbedding(cfg, rngs=nnx.Rngs(0), dtype=dtype)
  module.product = product
  return module


def _tokens(module, kernel, images):
  """The module's tokens as a pure function of its kernel."""
  graph, state = nnx.split(module)
  state["kernel"] = state["kernel"].replace(kernel)
  return nnx.merge(graph, state)(images)


def _tokens_and_grads(module, images, cotangent):
  y, vjp = jax.vjp(lambda kernel, images: _tokens(module, kernel, images), module.kernel[...], images)
  dk, dx = vjp(cotangent.astype(y.dtype))
  return y, dk, dx


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_convolution_gives_the_einsums_tokens_and_gradients(dtype):
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(3, 32, 24, 3)), jnp.float32)  # a non-square grid: 4 x 3 patches
  cotangent = jnp.asarray(rng.normal(size=(3, 12, 16)), jnp.float32)
  einsum = _tokens_and_grads(_embedding("einsum", dtype), images, cotangent)
  conv = _tokens_and_grads(_embedding("conv", dtype), images, cotangent)
  assert conv[0].shape == (3, 12, 16) and conv[0].dtype == jnp.dtype(dtype)
  assert conv[1].dtype == jnp.float32 and conv[2].shape == images.shape
  # float32: the same sums in another order. bfloat16: the same bfloat16 operands and float32 accumulation; the
  # tokens and the input gradient are rounded to bfloat16 (8 bits), the kernel gradient is not.
  tol = {"y": 1e-5, "dk": 1e-5, "dx": 1e-5} if dtype == jnp.float32 else {"y": 1e-2, "dk": 1e-5, "dx": 1e-2}
  for name, a, b in zip(("y", "dk", "dx"), conv, einsum):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, rtol=tol[name], atol=tol[name] * np.abs(b).max(), err_msg=name)


def test_the_convolutions_kernel_gradient_is_the_true_one():
  """A central difference of the tokens . cotangent on a few kernel entries, in float32 through the custom
  backward pass (an identity weight gather selects it, as FSDP does; plain float32 differentiates the forward)."""
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(2, 16, 16)), jnp.float32)
  module = _embedding("conv", jnp.float32)
  kernel = module.kernel[...]
  with layers.weight_gather(lambda w, names: w):
    _, dk, _ = _tokens_and_grads(module, images, cotangent)
  objective = lambda k: float(jnp.vdot(cotangent, _tokens(module, k, images)))
  eps = 1e-2
  for index in ((0, 0, 0, 0), (1, 2, 0, 3), (7, 5, 2, 15)):
    bump = jnp.zeros_like(kernel).at[index].set(eps)
    numeric = (objective(kernel + bump) - objective(kernel - bump)) / (2 * eps)
    assert numeric == pytest.approx(float(dk[index]), rel=1e-3, abs=1e-3)


def test_the_build_target_picks_the_product():
  for platform, product in (("tpu", "conv"), ("cpu", "einsum"), ("gpu", "einsum")):
    with layers.build_target(layers.Target(platform)):
      assert clip.PatchEmbedding(clip.VisionConfig(width=16, layers=1, heads=2, mlp_dim=32, patch_size=8,
                                                   image_size=32), rngs=nnx.Rngs(0)).product == product


def _residual_stream(rng, rows: int = 64, width: int = 256, offset: float = 0.0) -> np.ndarray:
  """Rows like a pre-LN transformer's residual stream: unit noise, a few channels 50-100x larger in some rows (the
  outliers CLIP towers carry), and an optional common offset (which the one-pass variance is weakest against)."""
  x = rng.normal(size=(rows, width)) + offset
  x[rng.integers(0, rows, 8), rng.integers(0, width, 8)] = rng.uniform(50, 100, 8)
  return x.astype(np.float32)


@pytest.mark.parametrize("offset", [0.0, 10.0])
def test_the_one_pass_variance_gives_the_two_pass_values_and_gradients(offset):
  rng = np.random.default_rng(2)
  x = jnp.asarray(_residual_stream(rng, offset=offset))
  scale = jnp.asarray(rng.normal(size=(256,)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(256,)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  results = []
  for one_pass in (False, True):
    y, vjp = jax.vjp(lambda x, s, b, one_pass=one_pass: layers.layer_norm(x, s, b, 1e-5, one_pass), x, scale, bias)
    results.append((y, *vjp(cotangent)))
  for name, a, b in zip(("y", "dx", "dscale", "dbias"), results[1], results[0]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=2e-5 * float(np.abs(b).max()),
                               err_msg=name)
  # A bfloat16 stream (training's): the same bfloat16 output.
  xb = x.astype(jnp.bfloat16)
  two, one = (np.asarray(layers.layer_norm(xb, scale, bias, 1e-5, p), np.float32) for p in (False, True))
  assert np.mean(two != one) < 0.01 and np.abs(two - one).max() <= 0.02 * np.abs(two).max()


def test_layer_norms_built_for_tpu_take_one_pass():
  for platform, one_pass in (("tpu", True), ("cpu", False), ("gpu", False)):
    with layers.build_target(layers.Target(platform)):
      assert layers.LayerNorm(8).one_pass is one_pass
