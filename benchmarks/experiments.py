"""Variants of our step that are not (or no longer) the repository's default, for before/after rows in one table.

Each entry is a context manager that swaps one function while a step is traced and compiled; the compiled step
keeps the variant, and the repository's code is restored on exit. Nothing here changes parameters, their names
or the maths: only how XLA is asked to compute the same function (the smoke tests check equal losses).

where_skip — the non-finite-step guard as it was before it moved to jax.lax.cond (clipvip_jax/train/step.py,
  skip_unless): compute the update unconditionally, then jnp.where(finite, new, old) on every leaf of the
  parameters and both Adam moments. Kept so the benchmarks can show what the change bought.

Landed changes are config options now, not variants: config.model.scan_layers (benchmarks/ours.py
model_section(scan_layers=True)) and config.constrain_activations (benchmarks/ours.py build(constrain_activations=True)).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax
import jax.numpy as jnp

from clipvip_jax.train import step as step_lib

VARIANTS = ("base", "where_skip")


def _where_skip(finite, update, keep, operands):
  return jax.tree.map(lambda new, old: jnp.where(finite, new, old), update(operands), keep(operands))


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
  """Trace and compile inside `with variant(name):` to get that variant; "base" is the repository's code."""
  if name not in VARIANTS:
    raise ValueError(f"unknown variant {name!r}; known: {VARIANTS}")
  if name == "base":
    yield
    return
  swaps = {
      "where_skip": [(step_lib, "skip_unless", _where_skip)],
  }[name]
  originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in swaps]
  for owner, attr, replacement in swaps:
    setattr(owner, attr, replacement)
  try:
    yield
  finally:
    for owner, attr, original in originals:
      setattr(owner, attr, original)
