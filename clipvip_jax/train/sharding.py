"""Mesh construction and the logical-axis -> mesh-axis rules.

Every parameter carries logical axis names (layers.param); activations are constrained with `constrain`.
The rules, a tuple of (logical name, mesh axis or tuple of mesh axes or None) pairs from the config, map them
onto the mesh, so data parallelism, FSDP and tensor parallelism are config edits:

  data only:  (("batch", ("data", "fsdp")), ("embed", None), ...)
  FSDP:       (("batch", ("data", "fsdp")), ("embed", "fsdp"), ...)    parameters and optimiser state split
  tensor:     (("mlp", "tensor"), ("heads", "tensor"), ("vocab", "tensor"), ...)

A dimension that the mapped mesh axes do not divide is left replicated (e.g. 4 heads on a tensor axis of 8),
so one rule set serves every model size; `describe_shardings` lists what was actually split.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("proj", None),
)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all). -1 in one position takes the remaining devices.
  Without `devices`, on one host, a fully specified mesh smaller than the device count uses the first devices (a
  small run on a big machine, tests on simulated devices); the trainer, the eval command and tests build theirs here.

  Axis types are chosen explicitly as Auto: shardings are given at the jit boundary and on activations by
  `constrain`, and XLA's partitioner propagates the rest, which is what the logical-rule scheme needs.
  """
  shape = [int(x) for x in shape]
  if len(shape) != 3:
    raise ValueError(f"mesh shape must have 3 entries (data, fsdp, tensor), got {shape}")
  if devices is None:
    devices = jax.devices()
    needed = int(np.prod(shape))
    if -1 not in shape and needed < len(devices) and jax.process_count() == 1:
      log.warning("mesh %s uses %d of the %d devices", tuple(shape), needed, len(devices))
      devices = devices[:needed]
  devices = list(devices)
  if shape.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {shape}")
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    if len(devices) % rest:
      raise ValueError(f"{len(devices)} devices cannot fill mesh {shape}")
    shape[shape.index(-1)] = len(devices) // rest
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh {tuple(shape)} needs {int(np.prod(shape))} devices, {len(devices)} are available")
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def _rules_dict(rules) -> dict[str, Any]:
  out = {}
  for entry in rules:
    name, axes = entry
    if isinstance(axes, list):
      axes = tuple(axes)
    out[name] = axes
  return out


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules) -> P:
  """Maps logical axis names to a PartitionSpec, leaving undividable or doubly-used mesh axes unsplit."""
  rules = _rules_dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    axes = rules.get(name) if name is not None else None
    if axes is None:
      spec.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    size = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    if not axes or dim % size:
      spec.append(None)
      continue
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules) -> Any:
  """NamedShardings for an nnx.State (or any pytree of Variables) from the Variables' logical names."""
  def one(x):
    value = x.get_value() if isinstance(x, nnx.Variable) else x
    names = x.get_metadata().get("out_sharding") if isinstance(x, nnx.Variable) else None
    shape = np.shape(value)
    if not names or len(names) != len(shape):
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
  """Leading (batch) axis split over the mesh axes that 'batch' maps to; the rest replicated."""
  axes = _rules_dict(rules).get("batch")
  return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def constrain(x: jax.Array, names: Sequence[str | None], mesh: Mesh | None, rules) -> jax.Array:
  """with_sharding_constraint by logical names; a no-op outside a mesh (single-device use, tests)."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules)))


def activation_constraint(mesh: Mesh, rules):
  """x [batch, ...] -> x split along its leading axis as the logical "batch" axis, the rest replicated: what the
  trainer hands the model (layers.activation_constraint) when config.constrain_activations is set."""
  return lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1), mesh, rules)


def resolve_constrain_activations(value: bool | str | None, mesh: Mesh, platform: str) -> bool:
  """config.constrain_activations as a bool. None (the default) or "auto": True on TPU and under FSDP (an fsdp
  mesh axis over more than one device), False otherwise. Under FSDP the constraint keeps the partitioner
  gathering weights instead of resharding activations (docs/performance.md, 3a). On TPU it also changes what the
  compiler does under plain data parallelism: the values are the same, but B/16 pretraining planned for v6e-64
  moved 23% fewer bytes per step (the proxy-attention kernel's gradients are no longer transposed in HBM around
  it; section 4)."""
  check_constrain_activations(value)
  if value is None or value == "auto":
    return platform == "tpu" or mesh.shape.get("fsdp", 1) > 1
  return value


def check_constrain_activations(value: Any) -> None:
  """One sentence (ValueError) unless `value` is True, False, "auto" or None."""
  if not (value is None or isinstance(value, bool) or value == "auto"):
    raise ValueError(f"config.constrain_activations = {value!r}; use True, False or 'auto' (None)")


def weight_gather(mesh: Mesh, rules):
  """(kernel, logical names) -> the kernel constrained to its sharding with the `fsdp` mesh axis taken out: what
  the trainer hands the model (layers.weight_gather) when the mesh has an fsdp axis. Each projection's weights
  are then all-gathered where they are used and their gradients reduce-scattered back to the shards."""
  gathered = tuple((name, tuple(a for a in ((axes,) if isinstance(axes, str) else tuple(axes or ())) if a != "fsdp")
                    or None) for name, axes in _rules_dict(rules).items())
  return lambda w, names: constrain(w, names, mesh, gathered)


def describe_shardings(shardings, state) -> list[str]:
  """Human-readable lines 'path shape -> spec' for the parameters that are actually split."""
  lines = []
  flat_sh = jax.tree_util.tree_flatten_with_path(shardings)[0]
  flat_st = jax.tree.leaves(state)
  for (path, sh), leaf in zip(flat_sh, flat_st):
    if any(a is not None for a in sh.spec):
      lines.append(f"{jax.tree_util.keystr(path)} {tuple(np.shape(leaf))} -> {sh.spec}")
  return lines
