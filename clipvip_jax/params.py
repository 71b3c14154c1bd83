"""Flat views of a model's parameters: {"vision/encoder/blocks/0/attn/query/kernel": array, ...}.

Converters produce flat dicts, checkpoints store them, and `assign_params` checks them against a model
(missing, unexpected and mis-shaped keys are all reported by name) before writing a single value.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from flax import nnx


class ParamMismatchError(ValueError):
  """Raised when a flat parameter dict does not fit a model; the message lists every offending key."""


def path_name(path) -> str:
  """'/'-joined name of a pytree path ("vision/encoder/blocks/0/attn/query/kernel"): the one spelling of a
  parameter's name, in flat dicts, checkpoints and the optimiser's per-parameter rules."""
  parts = []
  for p in path:
    p = getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))
    parts.append(str(p))
  return "/".join(parts)


def flat_params(model: nnx.Module) -> dict[str, jax.Array]:
  """All nnx.Param values of `model`, keyed by their '/'-joined path."""
  state = nnx.state(model, nnx.Param)
  leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]
  return {path_name(path): leaf for path, leaf in leaves}


def shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
  return {k: tuple(v.shape) for k, v in flat_params(model).items()}


def check_params(expected: Mapping[str, tuple[int, ...]], given: Mapping[str, np.ndarray], *,
                 source: str = "checkpoint") -> None:
  missing = sorted(set(expected) - set(given))
  unexpected = sorted(set(given) - set(expected))
  misshaped = sorted(k for k in set(expected) & set(given) if tuple(np.shape(given[k])) != tuple(expected[k]))
  if missing or unexpected or misshaped:
    lines = [f"{source} does not fit the model:"]
    if missing:
      lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
    if unexpected:
      lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:20])
                   + (" ..." if len(unexpected) > 20 else ""))
    for k in misshaped[:20]:
      lines.append(f"  wrong shape for {k}: {tuple(np.shape(given[k]))}, model expects {tuple(expected[k])}")
    raise ParamMismatchError("\n".join(lines))


def assign_params(model: nnx.Module, flat: Mapping[str, np.ndarray], *, source: str = "checkpoint") -> nnx.Module:
  """Writes `flat` into `model` in place (float32), after checking every key and shape."""
  state = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
  expected = {path_name(path): tuple(leaf.shape) for path, leaf in leaves}
  check_params(expected, flat, source=source)
  new_leaves = [jax.numpy.asarray(np.asarray(flat[path_name(path)]), dtype=leaf.dtype) for path, leaf in leaves]
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, new_leaves))
  nnx.update(model, state)
  return model
