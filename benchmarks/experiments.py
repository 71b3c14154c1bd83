"""Proposed model changes, measured in the benchmarks before they land in the model files.

Each entry is a context manager that swaps one method while a step is traced and compiled; the compiled step
keeps the variant, and the repository's code is restored on exit. Nothing here changes parameters, their names
or the maths: only how XLA is asked to compute the same function (the smoke test checks equal losses).

scan_layers — proposed for clipvip_jax/models/layers.py, Encoder.__call__:
  Run the blocks with jax.lax.scan over their parameters stacked on a new leading axis (stacked on the fly, so
  parameter names and checkpoints stay as they are), instead of a Python loop that unrolls 12 (24) blocks into
  one graph. Why (profile of the CLIP-ViP B/32 train step on XLA:CPU, docs/performance.md): in the unrolled
  backward pass XLA fuses the elementwise LayerNorm-backward + residual-add chain of the gradient across layers
  and duplicates it into every consumer, so the fusions that feed each layer's weight-gradient products re-read
  the contributions of all later layers (fan-in ~90 operands, quadratic in depth): 43% of the step's op time.
  Inside a scan the loop-carried gradient is materialised once per layer.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from clipvip_jax.models import layers

VARIANTS = ("base", "scan_layers")


def _scanned_encoder_call(self: layers.Encoder, x: jax.Array, attention_fn: layers.AttentionFn) -> jax.Array:
  blocks = list(self.blocks)
  graphdef = nnx.graphdef(blocks[0])
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in blocks])

  def body(y, state):
    return nnx.merge(graphdef, state)(y, attention_fn), None

  if self.remat != "none":
    body = jax.checkpoint(body, policy=layers.REMAT_POLICIES[self.remat], prevent_cse=False)
  return jax.lax.scan(body, x, stacked)[0]


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
  """Trace and compile inside `with variant(name):` to get that variant; "base" is the repository's code."""
  if name not in VARIANTS:
    raise ValueError(f"unknown variant {name!r}; known: {VARIANTS}")
  if name == "base":
    yield
    return
  original = layers.Encoder.__call__
  layers.Encoder.__call__ = _scanned_encoder_call
  try:
    yield
  finally:
    layers.Encoder.__call__ = original
