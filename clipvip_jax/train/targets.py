"""TPU slices and NVIDIA GPU hosts described without hardware: the compilers that describe them (libtpu; the JAX
CUDA plugin), topology names, and each chip's figures.

libtpu is the TPU runtime; with it, `jax.experimental.topologies.get_topology_desc("v5p:4x4x4")` describes a slice's
devices on any host, and XLA's TPU compiler compiles for them. It is not on the project's import path: `make tpu`
installs it into `.venv/libtpu` (a folder of its own, not site-packages), and only the planner adds that folder to
`sys.path`. Ordinary commands therefore never see it: JAX picks CPU or GPU as before, with no TPU start-up
probing or warnings. An installed `libtpu` package (a TPU VM, `pip install 'clipvip_jax[tpu]'`) is used as is;
`CLIPVIP_LIBTPU_DIR` names another folder.

GPUs the same way: the JAX CUDA plugin (jax-cuda12-plugin + jax-cuda12-pjrt, ~480 MB, no CUDA libraries and no
driver needed to compile) describes N GPUs from a device description (XLA's GpuTargetConfig; the figures below are
the vendors'), and XLA's GPU compiler compiles for them. `make gpu-plan` installs it into `.venv/cuda-plan`, again
seen by the planner only (`CLIPVIP_CUDA_PLUGIN_DIR` names another folder; a GPU machine's installed plugin is used
as is). The GPU compiler gives memory and collectives but no cost analysis: GPU plans say "no estimate" for time.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
from typing import Any

INSTALL_LINE = "make tpu  (or: pip install --target .venv/libtpu libtpu==<the version jax[tpu] pins>)"
GPU_INSTALL_LINE = ("make gpu-plan  (or: pip install --no-deps --target .venv/cuda-plan jax-cuda12-plugin==V "
                    "jax-cuda12-pjrt==V, V being the installed jax's version)")


class TargetError(ValueError):
  """A topology, libtpu or mesh problem; the message is the one sentence shown to the user."""


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip vendor figures: HBM capacity, dense bf16 peak, HBM bandwidth, ICI bandwidth (all links, one way)."""
  name: str
  hbm_bytes: int
  peak_flops: float
  hbm_bandwidth: float
  ici_bandwidth: float  # TPU: ICI; GPU: NVLink
  clock_hz: float | None = None  # TPU: the TensorCore clock, to read the compiler's per-op cycle estimates


GIB = 1024**3
# Keyed by the device kind libtpu reports. Public Cloud TPU figures (per chip). The clock is the bf16 peak over
# the chip's MXU throughput per cycle (multiply-adds of all its MXUs x 2): v4 2 cores x 4 MXUs of 128x128 ->
# 1.05 GHz, v5e 4 of 128x128 -> 1.5 GHz, v5p 2 x 4 of 128x128 -> 1.75 GHz, v6e 4 of 256x256 -> 1.75 GHz.
CHIPS = {
    "TPU v4": Chip("v4", 32 * GIB, 275e12, 1.2e12, 300e9, 275e12 / (8 * 128 * 128 * 2)),
    "TPU v5 lite": Chip("v5e", 16 * GIB, 197e12, 819e9, 200e9, 197e12 / (4 * 128 * 128 * 2)),
    "TPU v5": Chip("v5p", 95 * GIB, 459e12, 2.765e12, 600e9, 459e12 / (8 * 128 * 128 * 2)),
    "TPU v6 lite": Chip("v6e", 32 * GIB, 918e12, 1.64e12, 448e9, 918e12 / (4 * 256 * 256 * 2)),
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
  platform: str = "tpu"  # "tpu" | "gpu": what remat="auto" resolves for (layers.resolve_remat)
  compiler: str = ""     # "libtpu 0.0.42.1", "jax-cuda12-plugin 0.10.2"
  compiler_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # XLA's, to compile without the chips

  @property
  def num_chips(self) -> int:
    return len(self.devices)

  @property
  def num_hosts(self) -> int:
    return len({d.process_index for d in self.devices})


def describe(topology: str) -> Slice:
  """The slice `topology` names: a TPU slice as libtpu names it ("v5p:4x4x4", "v5e:2x2", "v4:2x2x1", "v6e:8x8") or
  NVIDIA GPUs ("h100:8" = one host of 8, "a100:4x8" = 4 hosts of 8)."""
  family, sep, shape = topology.partition(":")
  if family in GPUS and sep and shape:
    return _describe_gpus(topology, family, shape)
  if not sep or not shape or family not in ("v4", "v5e", "v5p", "v6e"):
    raise TargetError(f"unknown topology {topology!r}: give a chip class and a shape as libtpu names slices "
                      "(v4:2x2x1, v5e:2x2, v5p:4x4x4, v6e:8x8), or GPUs as h100:8 or a100:2x8 (hosts x GPUs)")
  version = ensure_libtpu()
  import jax
  from jax.experimental import topologies
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
  return Slice(topology, devices, CHIPS[kind], kind, "tpu", f"libtpu {version}")


# ------------------------------------------------------------------------------------------------------- GPUs


@dataclasses.dataclass(frozen=True)
class Gpu:
  """A GPU's figures for the planner (`chip`) and the device description XLA's GPU compiler reads (the rest)."""
  chip: Chip
  description: str
  compute_capability: tuple[int, int]
  cores: int
  fpus_per_core: int
  shared_memory_per_core: int
  shared_memory_per_block_optin: int
  l2_bytes: int
  clock_ghz: float


# Vendor figures: dense bf16 peak, HBM bandwidth, NVLink bandwidth one way; memory as the device reports it.
GPUS = {
    "h100": Gpu(Chip("h100", 84_929_347_584, 989e12, 3.35e12, 450e9), "NVIDIA H100 80GB HBM3", (9, 0), 132, 128,
                233_472, 232_448, 52_428_800, 1.98),
    "a100": Gpu(Chip("a100", 85_100_068_864, 312e12, 2.039e12, 300e9), "NVIDIA A100-SXM4-80GB", (8, 0), 108, 64,
                167_936, 166_912, 41_943_040, 1.41),
}


def gpu_target_config(gpu: Gpu) -> str:
  """The device description (XLA's GpuTargetConfig, text format) the GPU compiler compiles for."""
  major, minor = gpu.compute_capability
  return (
      "gpu_device_info {\n"
      "  threads_per_block_limit: 1024\n  threads_per_warp: 32\n  shared_memory_per_block: 49152\n"
      f"  shared_memory_per_core: {gpu.shared_memory_per_core}\n  threads_per_core_limit: 2048\n"
      f"  core_count: {gpu.cores}\n  fpus_per_core: {gpu.fpus_per_core}\n"
      "  block_dim_limit_x: 2147483647\n  block_dim_limit_y: 65535\n  block_dim_limit_z: 65535\n"
      f"  memory_bandwidth: {int(gpu.chip.hbm_bandwidth)}\n  l2_cache_size: {gpu.l2_bytes}\n"
      f"  clock_rate_ghz: {gpu.clock_ghz}\n  device_memory_size: {gpu.chip.hbm_bytes}\n"
      f"  shared_memory_per_block_optin: {gpu.shared_memory_per_block_optin}\n"
      f"  cuda_compute_capability {{ major: {major} minor: {minor} }}\n"
      "  registers_per_core_limit: 65536\n  registers_per_block_limit: 65536\n}\n"
      'platform_name: "CUDA"\ndnn_version_info { major: 9 minor: 7 }\n'
      f'device_description_str: "{gpu.description}"\n')


def cuda_plugin_dir() -> pathlib.Path | None:
  """The folder `make gpu-plan` installed the JAX CUDA plugin into (None when it is not there)."""
  folder = pathlib.Path(os.environ.get("CLIPVIP_CUDA_PLUGIN_DIR") or pathlib.Path(sys.prefix) / "cuda-plan")
  return folder if (folder / "jax_plugins" / "xla_cuda12").is_dir() else None


def ensure_cuda_plugin() -> str:
  """Makes the JAX CUDA plugin importable for this process (the planner only) and returns its version."""
  import importlib.util
  from importlib import metadata
  # Compiling needs neither CUDA libraries nor a driver: skip the plugin's check that they are there.
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # its "could not find cuda drivers" notice: expected here
  try:
    installed = importlib.util.find_spec("jax_plugins.xla_cuda12") is not None  # a GPU machine's jax[cuda]
  except ModuleNotFoundError:  # no jax_plugins namespace at all
    installed = False
  if not installed:
    folder = cuda_plugin_dir()
    if folder is None:
      raise TargetError(f"the JAX CUDA plugin is not installed; planning for GPUs needs it: {GPU_INSTALL_LINE}")
    sys.path.insert(0, str(folder))
    if "jax_plugins" in sys.modules:  # a namespace package jax imported before the folder was on the path
      sys.modules["jax_plugins"].__path__.append(str(folder / "jax_plugins"))
  try:
    return metadata.version("jax-cuda12-plugin")
  except metadata.PackageNotFoundError:
    return "unknown"


def _describe_gpus(topology: str, family: str, shape: str) -> Slice:
  parts = shape.split("x")
  if len(parts) > 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
    raise TargetError(f"unknown topology {topology!r}: GPUs are named {family}:N (one host of N) or {family}:HxN "
                      "(H hosts of N)")
  hosts, per_host = (1, int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
  version = ensure_cuda_plugin()
  import jax
  from jax.experimental import topologies
  gpu = GPUS[family]
  try:
    desc = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(gpu),
                                        topology=f"1x{hosts}x{per_host}")
  except (jax.errors.JaxRuntimeError, RuntimeError, ValueError, NotImplementedError) as e:
    raise TargetError(f"the JAX CUDA plugin does not accept the topology {topology!r}: "
                      f"{str(e).splitlines()[0]}") from None
  devices = tuple(desc.devices)
  # Without a GPU the compiler cannot autotune; its Triton GEMM tiling then fails on some of the model's dots
  # ("couldn't find output tile sizes"), so dots go to cuBLAS, as XLA does wherever Triton declines them.
  return Slice(topology, devices, gpu.chip, devices[0].device_kind, "gpu", f"jax-cuda12-plugin {version}",
               {"xla_gpu_enable_triton_gemm": False})
