"""The two export formats: a jitted encoder (weights baked in as constants) + abstract inputs -> a file.

  onnx       jax2onnx turns the function's jaxpr into an ONNX graph directly (opset OPSET); symbolic dimensions
             become named dynamic axes. docs/design.md "Deployable exports" has the measurements behind this route.
  stablehlo  jax.export: StableHLO lowered for PLATFORMS, serialized with its calling-convention version; reloaded
             with jax.export.deserialize(...).call, no model code needed.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import logging
import pathlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_JAX_EINSUM = jnp.einsum  # bound before jax2onnx can replace it (write_onnx)
OPSET = 23
# ONNX protobufs stop at 2 GiB; larger models keep their weights in a .data file beside the graph.
ONNX_EXTERNAL_DATA_ABOVE = 1_800_000_000
PLATFORMS = ("cpu", "cuda", "tpu")

# format -> the modules writing it needs, and the line that installs them
REQUIREMENTS = {"onnx": (("jax2onnx", "onnx"), "pip install jax2onnx onnxruntime"), "stablehlo": ((), "")}


def missing_package(fmt: str) -> str | None:
  """One sentence naming what --format `fmt` needs and how to install it, or None when it is all there."""
  modules, install = REQUIREMENTS[fmt]
  missing = [m for m in modules if _find(m) is None]
  if not missing:
    return None
  return f"--format {fmt} needs the package(s) {', '.join(missing)}, which are not installed: {install}"


def _find(module: str):
  try:
    return importlib.util.find_spec(module)
  except (ImportError, ValueError):  # a module blocked or half-present counts as missing
    return None


def version(distribution: str) -> str | None:
  try:
    return importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return None


@contextlib.contextmanager
def _quiet(*loggers: str):
  """jax2onnx's IR serialiser logs a warning per constant whose type it leaves to be inferred; none matter."""
  saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in loggers]
  for logger, _ in saved:
    logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    for logger, level in saved:
      logger.setLevel(level)


def write_onnx(fn: Callable, args: Sequence[jax.ShapeDtypeStruct], input_names: Sequence[str], path: pathlib.Path,
               name: str) -> dict[str, Any]:
  import jax2onnx
  import onnx
  # jax2onnx swaps in its own versions of some jax.numpy functions while it traces. Its jnp.einsum broadcasts a
  # Dense kernel over the input's static leading axes (the text's L), which onnxruntime then folds into an L-fold
  # copy of every weight (11 GB for the B/32 text tower); the model's einsums are traced with `_matmul_einsum`
  # instead.
  def with_jax_einsum(*inputs):
    swapped, jnp.einsum = jnp.einsum, _matmul_einsum
    try:
      return fn(*inputs)
    finally:
      jnp.einsum = swapped

  with _quiet("onnx_ir", "onnx_ir.serde", "jax2onnx"):
    proto = jax2onnx.to_onnx(with_jax_einsum, list(args), model_name=name, opset=OPSET,
                             input_names=list(input_names), output_names=["embedding"])
  external = proto.ByteSize() > ONNX_EXTERNAL_DATA_ABOVE
  onnx.save_model(proto, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                  location=path.name + ".data")
  return {"opset": OPSET, "external_data": external}


def _matmul_einsum(equation: str, a, b, **kwargs):
  """jnp.einsum, with the projections' form "...<k labels>,<the same k labels><rest>->...<rest>" (the layers'
  Dense and attention-head kernels) written as one 2-D matmul between reshapes: ONNX MatMul, which onnxruntime
  runs several times faster than the Einsum that dot_general with a 3-D kernel becomes. Same sums, same values."""
  lhs, _, out = equation.replace(" ", "").partition("->")
  a_spec, _, b_spec = lhs.partition(",")
  contracted = a_spec.removeprefix("...")
  k = len(contracted)
  if (kwargs or not a_spec.startswith("...") or "..." in b_spec or not b_spec.startswith(contracted) or k == 0
      or out != "..." + b_spec[k:] or b.ndim != len(b_spec)):
    return _JAX_EINSUM(equation, a, b, **kwargs)
  size = int(np.prod(b.shape[:k]))
  y = jnp.matmul(a.reshape(a.shape[:a.ndim - k] + (size,)), b.reshape(size, -1))
  return y.reshape(a.shape[:a.ndim - k] + b.shape[k:])


def write_stablehlo(fn: Callable, args: Sequence[jax.ShapeDtypeStruct], input_names: Sequence[str],
                    path: pathlib.Path, name: str, platforms: Sequence[str] = PLATFORMS) -> dict[str, Any]:
  del input_names, name  # jax.export's calling convention is positional
  exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(*args)
  path.write_bytes(exported.serialize())
  return {"platforms": list(exported.platforms), "calling_convention_version": exported.calling_convention_version}


WRITERS = {"onnx": write_onnx, "stablehlo": write_stablehlo}


def versions(fmt: str) -> dict[str, str | None]:
  names = ("jax", "jaxlib", "flax") + (("jax2onnx", "onnx") if fmt == "onnx" else ())
  return {n: version(n) for n in ("clipvip_jax",) + names}
