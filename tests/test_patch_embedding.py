"""The patch embedding's two products (layers.Product): the einsum (CPU/GPU) and the strided convolution built for
TPU targets give the same tokens and the same gradients, in float32 and in bfloat16 (where the kernel gradient
must leave its product in float32, as every projection's does), and the build target picks between them."""

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
