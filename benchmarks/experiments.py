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

constrain_activations — proposed for clipvip_jax/models/layers.py, ResidualBlock.__call__ (with the mesh and
  rules reaching the model through a context the trainer sets, e.g. sharding.constrain on logical names
  ("batch", None, None)): pin the residual stream [B, S, D] to batch sharding at each block's input, middle and
  output. Why (memory_scaling, 8 simulated devices, B/16 bf16): under FSDP ("embed" -> fsdp) nothing tells the
  partitioner that activations stay batch-sharded, and for a per-device batch of 1-2 clips it prefers to
  reshard activations rather than gather weights: 1.2 GiB per clip per device instead of 0.5 GiB (2 layers).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clipvip_jax.models import layers

VARIANTS = ("base", "scan_layers", "constrain_activations")


def _scanned_encoder_call(self: layers.Encoder, x: jax.Array, attention_fn: layers.AttentionFn) -> jax.Array:
  blocks = list(self.blocks)
  graphdef = nnx.graphdef(blocks[0])
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in blocks])

  def body(y, state):
    return nnx.merge(graphdef, state)(y, attention_fn), None

  if self.remat != "none":
    body = jax.checkpoint(body, policy=layers.REMAT_POLICIES[self.remat], prevent_cse=False)
  return jax.lax.scan(body, x, stacked)[0]


def _batch_constrained_block_call(spec: NamedSharding):
  def call(self: layers.ResidualBlock, x: jax.Array, attention_fn: layers.AttentionFn) -> jax.Array:
    x = jax.lax.with_sharding_constraint(x, spec)
    x = jax.lax.with_sharding_constraint(x + self.attn(self.ln_1(x), attention_fn), spec)
    return jax.lax.with_sharding_constraint(x + self.mlp(self.ln_2(x)), spec)
  return call


@contextlib.contextmanager
def variant(name: str, mesh: Mesh | None = None, batch_axes: Any = ("data", "fsdp")) -> Iterator[None]:
  """Trace and compile inside `with variant(name):` to get that variant; "base" is the repository's code.
  constrain_activations needs the `mesh` (and the mesh axes the batch is split over)."""
  if name not in VARIANTS:
    raise ValueError(f"unknown variant {name!r}; known: {VARIANTS}")
  if name == "base":
    yield
    return
  if name == "scan_layers":
    owner, method, replacement = layers.Encoder, "__call__", _scanned_encoder_call
  else:
    if mesh is None:
      raise ValueError("variant 'constrain_activations' needs the mesh")
    owner, method = layers.ResidualBlock, "__call__"
    replacement = _batch_constrained_block_call(NamedSharding(mesh, P(batch_axes, None, None)))
  original = getattr(owner, method)
  setattr(owner, method, replacement)
  try:
    yield
  finally:
    setattr(owner, method, original)
