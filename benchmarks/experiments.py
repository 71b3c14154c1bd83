"""Variants of our step that are not (or no longer) the repository's default, for before/after rows in one table.

Each entry is a context manager that swaps one function while a step is traced and compiled; the compiled step
keeps the variant, and the repository's code is restored on exit. Nothing here changes parameters, their names
or the maths: only how XLA is asked to compute the same function (the smoke tests check equal losses).

where_skip — the non-finite-step guard as it was before it moved to jax.lax.cond (clipvip_jax/train/step.py,
  skip_unless): compute the update unconditionally, then jnp.where(finite, new, old) on every leaf of the
  parameters and both Adam moments. Kept so the benchmarks can show what the change bought.

Landed, kept as shims for scripts that still name them (benchmarks/gpu_train_step.py):
  scan_layers            = config.model.scan_layers=True (layers.Encoder scans its blocks). New code: set the
                           config key (benchmarks/ours.py model_section(scan_layers=True)).
  constrain_activations  = config.constrain_activations=True (sharding.activation_constraint handed to
                           step.make_train_step). New code: pass it to make_train_step.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from clipvip_jax.models import layers
from clipvip_jax.train import sharding
from clipvip_jax.train import step as step_lib

VARIANTS = ("base", "where_skip", "scan_layers", "constrain_activations")


def _where_skip(finite, update, keep, operands):
  return jax.tree.map(lambda new, old: jnp.where(finite, new, old), update(operands), keep(operands))


def _scanning_encoder_call(self: layers.Encoder, x: jax.Array, attention_fn: layers.AttentionFn) -> jax.Array:
  return self._scanned(x, attention_fn) if len(self.blocks) > 1 else _UNSCANNED_CALL(self, x, attention_fn)


_UNSCANNED_CALL = layers.Encoder.__call__


@contextlib.contextmanager
def variant(name: str, mesh: Mesh | None = None, batch_axes: Any = ("data", "fsdp")) -> Iterator[None]:
  """Trace and compile inside `with variant(name):` to get that variant; "base" is the repository's code.
  constrain_activations needs the `mesh` (and the mesh axes the batch is split over)."""
  if name not in VARIANTS:
    raise ValueError(f"unknown variant {name!r}; known: {VARIANTS}")
  if name == "base":
    yield
    return
  if name == "constrain_activations":
    if mesh is None:
      raise ValueError("variant 'constrain_activations' needs the mesh")
    with layers.activation_constraint(sharding.activation_constraint(mesh, (("batch", batch_axes),))):
      yield
    return
  swaps = {
      "where_skip": [(step_lib, "skip_unless", _where_skip)],
      "scan_layers": [(layers.Encoder, "__call__", _scanning_encoder_call)],
  }[name]
  originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in swaps]
  for owner, attr, replacement in swaps:
    setattr(owner, attr, replacement)
  try:
    yield
  finally:
    for owner, attr, original in originals:
      setattr(owner, attr, original)
