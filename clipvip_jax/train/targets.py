"""TPU slices described without hardware: libtpu (where it is), topology names, and each chip class's figures.

libtpu is the TPU runtime; with it, `jax.experimental.topologies.get_topology_desc("v5p:4x4x4")` describes a slice's
devices on any host, and XLA's TPU compiler compiles for them. It is not on the project's import path: `make tpu`
installs it into `.venv/libtpu` (a folder of its own, not site-packages), and only the planner adds that folder to
`sys.path`. Ordinary commands therefore never see it: JAX picks CPU or GPU as before, with no TPU start-up
probing or warnings. An installed `libtpu` package (a TPU VM, `pip install 'clipvip_jax[tpu]'`) is used as is;
`CLIPVIP_LIBTPU_DIR` names another folder.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
from typing import Any

INSTALL_LINE = "make tpu  (or: pip install --target .venv/libtpu libtpu==<the version jax[tpu] pins>)"


class TargetError(ValueError):
  """A topology, libtpu or mesh problem; the message is the one sentence shown to the user."""


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip vendor figures: HBM capacity, dense bf16 peak, HBM bandwidth, ICI bandwidth (all links, one way)."""
  name: str
  hbm_bytes: int
  peak_flops: float
  hbm_bandwidth: float
  ici_bandwidth: float


GIB = 1024**3
# Keyed by the device kind libtpu reports. Public Cloud TPU figures (per chip).
CHIPS = {
    "TPU v4": Chip("v4", 32 * GIB, 275e12, 1.2e12, 300e9),
    "TPU v5 lite": Chip("v5e", 16 * GIB, 197e12, 819e9, 200e9),
    "TPU v5": Chip("v5p", 95 * GIB, 459e12, 2.765e12, 600e9),
    "TPU v6 lite": Chip("v6e", 32 * GIB, 918e12, 1.64e12, 448e9),
}
# v4 and v5p chips have two TensorCores; "megacore" presents each chip as one device, as a TPU VM does.
_CHIP_CONFIG = {"v4": "megacore"}


def _candidate_dirs() -> list[pathlib.Path]:
  """CLIPVIP_LIBTPU_DIR when set (and then only it), else `make tpu`'s folder inside the running venv."""
  if os.environ.get("CLIPVIP_LIBTPU_DIR"):
    return [pathlib.Path(os.environ["CLIPVIP_LIBTPU_DIR"])]
  return [pathlib.Path(sys.prefix) / "libtpu"]


def libtpu_dir() -> pathlib.Path | None:
  """The folder holding the `libtpu` package that `make tpu` installed (None when it is not there)."""
  for folder in _candidate_dirs():
    if (folder / "libtpu" / "libtpu.so").is_file():
      return folder
  return None


def ensure_libtpu() -> str:
  """Makes libtpu importable for this process (the planner only) and returns its version."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # not on a TPU VM: no metadata server to ask
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")  # quiets the start-up warning; the topology rules
  # The planner only compiles: it never opens a chip, so it need not take libtpu's one-process lock (which would
  # keep two plans, or a plan beside a TPU job on a TPU VM, from running at once).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    if os.environ.get("CLIPVIP_LIBTPU_DIR"):
      raise ImportError  # the folder named wins over an installed package
    import libtpu  # noqa: F401  an installed package (TPU VM, the tpu extra)
  except ImportError:
    folder = libtpu_dir()
    if folder is None:
      raise TargetError(f"libtpu is not installed; the planner needs it: {INSTALL_LINE}") from None
    sys.path.insert(0, str(folder))
    import libtpu  # noqa: F401
  from importlib import metadata
  try:
    return metadata.version("libtpu")
  except metadata.PackageNotFoundError:
    return "unknown"


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str
  devices: tuple[Any, ...]
  chip: Chip
  device_kind: str

  @property
  def num_chips(self) -> int:
    return len(self.devices)

  @property
  def num_hosts(self) -> int:
    return len({d.process_index for d in self.devices})


def describe(topology: str) -> Slice:
  """The slice `topology` names ("v5p:4x4x4", "v5e:2x2", "v4:2x2x1", "v6e:8x8"), as libtpu describes it."""
  ensure_libtpu()
  import jax
  from jax.experimental import topologies
  family, sep, shape = topology.partition(":")
  if not sep or not shape or family not in ("v4", "v5e", "v5p", "v6e"):
    raise TargetError(f"unknown topology {topology!r}: give a chip class and a shape as libtpu names slices "
                      "(v4:2x2x1, v5e:2x2, v5p:4x4x4, v6e:8x8)")
  kwargs = {"chip_config_name": _CHIP_CONFIG[family]} if family in _CHIP_CONFIG else {}
  try:
    devices = tuple(topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs).devices)
  except (jax.errors.JaxRuntimeError, RuntimeError, ValueError) as e:
    reason = str(e).split("\n")[0].removeprefix("INVALID_ARGUMENT: ")
    raise TargetError(f"libtpu does not accept the topology {topology!r}: {reason}") from None
  kind = devices[0].device_kind
  if kind not in CHIPS:
    raise TargetError(f"topology {topology!r} has devices of kind {kind!r}, which the planner has no figures for "
                      f"(known: {sorted(CHIPS)})")
  return Slice(topology, devices, CHIPS[kind], kind)
