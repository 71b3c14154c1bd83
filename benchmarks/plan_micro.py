"""Single operations compiled for a TPU slice, read by the compiler's own per-op estimates (docs/performance.md
section 4, "The patch embedding on TPU" and "LayerNorm on TPU"): the LayerNorm's two variances (two passes, one
pass) and the patch embedding's two products (einsum, strided convolution), each forward and backward on one
chip's share of the B/16 pretraining step (16 clips of 12 frames), and the two products timed on this CPU.

  python -m benchmarks.plan_micro --topology v6e:2x2

Each TPU compile takes seconds (`make tpu` first). The estimates are the compiler's, not measurements; "us" is
the compiler's per-op cycle estimates summed at the chip's clock (`planner.op_sum`, as a plan's "op sum").
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np


def _tpu_table(topology: str) -> None:
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from clipvip_jax.models import clip, layers
  from clipvip_jax.train import planner, targets
  slice_ = targets.describe(topology)
  mesh = Mesh(np.array(slice_.devices).reshape(-1), ("x",))
  n = len(slice_.devices)
  rows, width, frames, size, patch = 16 * 2356, 768, 16 * 12, 224, 16

  def spec(shape, dtype, split=True):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P("x") if split else P()))

  def forward_and_backward(f, wrt_first_only=False):
    def step(*args):
      if wrt_first_only:
        y, vjp = jax.vjp(lambda first: f(first, *args[1:]), args[0])
      else:
        y, vjp = jax.vjp(f, *args)
      return vjp(y)
    return step

  def patches(product):
    def f(kernel, video):  # the step's layout: clips x frames; the gradient is the kernel's (frames need none)
      images = video.reshape(-1, *video.shape[2:])
      with layers.weight_gather(lambda w, names: w):  # the custom backward pass bf16 training takes
        b, h, w, c = images.shape
        if product == "conv":
          return layers.project(images, kernel, None, clip.PATCH_CONV, jnp.bfloat16, (None,) * 4)
        x = images.reshape(b, h // patch, patch, w // patch, patch, c)
        return layers.project(x, kernel, None, clip.PATCH_EQS, jnp.bfloat16, (None,) * 4)
    return f

  ln_args = (spec((rows * n, width), jnp.bfloat16), spec((width,), jnp.float32, False),
             spec((width,), jnp.float32, False))
  patch_args = (spec((patch, patch, 3, width), jnp.float32, False), spec((16 * n, 12, size, size, 3), jnp.bfloat16))
  cases = [(f"LayerNorm, {'one pass' if one else 'two passes'}, {mode}", fn, ln_args)
           for one in (False, True)
           for mode, fn in (("forward", lambda x, s, b, one=one: layers.layer_norm(x, s, b, 1e-5, one)),
                            ("forward + backward", forward_and_backward(
                                lambda x, s, b, one=one: layers.layer_norm(x, s, b, 1e-5, one))))]
  cases += [(f"patch embedding, {product}, forward + kernel gradient",
             forward_and_backward(patches(product), wrt_first_only=True), patch_args) for product in ("einsum", "conv")]
  print(f"{topology} ({slice_.compiler}), per chip: [{rows} x {width}] LayerNorm input, {frames} frames of {size}^2\n")
  print("| operation | compiler's estimate, us | compiler's bytes, MB |\n|---|---|---|")
  for name, fn, args in cases:
    compiled = jax.jit(fn).lower(*args).compile(slice_.compiler_options or None)
    estimate = planner.op_sum(compiled.as_text(), slice_.chip)["seconds"]
    print(f"| {name} | {estimate * 1e6:.0f} | {planner.cost(compiled).get('bytes accessed', 0) / 1e6:.0f} |")


def _cpu_table(frames: int = 24, repeats: int = 5) -> None:
  """The two patch products' forward and kernel gradient, timed on this CPU (why CPU builds keep the einsum)."""
  import jax
  import jax.numpy as jnp

  from clipvip_jax.models import clip
  rng = np.random.default_rng(0)
  print(f"\nCPU: {platform.processor() or platform.machine()}, {frames} frames of 224^2 -> 768 channels, "
        f"forward + kernel gradient, best of {repeats}\n")
  print("| dtype | einsum, ms | convolution, ms | convolution / einsum |\n|---|---|---|---|")
  einsum = clip.PATCH_EQS
  for dtype in (jnp.float32, jnp.bfloat16):
    images = jnp.asarray(rng.normal(size=(frames, 224, 224, 3)), dtype)
    kernel = jnp.asarray(rng.normal(size=(16, 16, 3, 768)), dtype)
    grad = jnp.asarray(rng.normal(size=(frames, 14, 14, 768)), dtype)
    six = lambda x: x.reshape(frames, 14, 16, 14, 16, 3)
    fns = {"einsum": jax.jit(lambda x, k, g: (jnp.einsum(einsum[0], six(x), k),
                                             jnp.einsum(einsum[2], six(x), g, preferred_element_type=jnp.float32))),
           "conv": jax.jit(lambda x, k, g: (clip.PATCH_CONV.forward(x, k), clip.PATCH_CONV.kernel_grad(x, g)))}
    best = {}
    for name, fn in fns.items():
      jax.block_until_ready(fn(images, kernel, grad))
      times = []
      for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(images, kernel, grad))
        times.append(time.perf_counter() - t)
      best[name] = min(times)
    print(f"| {jnp.dtype(dtype).name} | {best['einsum'] * 1e3:.1f} | {best['conv'] * 1e3:.1f} | "
          f"{best['conv'] / best['einsum']:.2f}x |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--topology", default="v6e:2x2")
  parser.add_argument("--no-cpu", action="store_true", help="skip the CPU timing")
  args = parser.parse_args()
  import jax
  jax.config.update("jax_platforms", "cpu")
  from clipvip_jax.train import targets
  targets.ensure_libtpu()
  _tpu_table(args.topology)
  if not args.no_cpu:
    _cpu_table()


if __name__ == "__main__":
  main()
