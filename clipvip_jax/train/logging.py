"""What a run reports: TensorBoard scalars (tensorboardX), the same scalars as JSON lines (WORKDIR/metrics.jsonl,
for plots and scripts without TensorBoard), a tqdm progress bar with ETA, and the MFU estimate.

Only process 0 writes. The trainer hands over host values at log steps only (one device->host transfer per
log interval), so logging never adds a synchronisation to the steps in between.
"""

from __future__ import annotations

import json
import logging as std_logging
import pathlib
import sys
from typing import Any, Mapping

import jax

log = std_logging.getLogger("clipvip_jax.train")


class _TerminalHandler(std_logging.StreamHandler):
  """stderr through tqdm.write, so that a line lands above a live progress bar instead of through it."""

  def emit(self, record: std_logging.LogRecord) -> None:
    try:
      from tqdm import tqdm
      tqdm.write(self.format(record), file=sys.stderr)
    except Exception:  # noqa: BLE001 — logging must never raise
      self.handleError(record)


def log_to_terminal(level: int = std_logging.INFO) -> None:
  """Sends this project's log lines ("clipvip_jax.*": resumed from, preempted, damaged checkpoints, changed
  settings) to stderr. The command lines call it; a library user configures logging as they like. Other
  libraries' loggers are left alone (some install a root handler at import, which made basicConfig a no-op)."""
  logger = std_logging.getLogger("clipvip_jax")
  if not any(isinstance(h, _TerminalHandler) for h in logger.handlers):
    handler = _TerminalHandler()
    handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
  logger.setLevel(level)
  logger.propagate = False


def _to_terminal() -> bool:
  return any(isinstance(h, _TerminalHandler) for h in std_logging.getLogger("clipvip_jax").handlers)

# Dense bf16 peak FLOP/s per device (vendor figures), for the MFU estimate. CPU: no meaningful peak.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
}


def peak_flops_per_device(configured: float | None = None) -> float | None:
  """The configured peak, else the table entry whose name starts the device kind (None when unknown)."""
  if configured:
    return float(configured)
  kind = jax.devices()[0].device_kind
  for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(name):
      return flops
  return None


def compiled_flops(compiled: Any) -> float | None:
  """FLOPs of one call of a compiled (per-device, SPMD-partitioned) program from XLA's cost analysis."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 — some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def _summary_writer(folder: pathlib.Path):
  """tensorboardX's SummaryWriter, imported without torch where torch is not loaded yet: tensorboardX imports it
  only to accept torch tensors (this writer gets floats), and that import costs each training process ~1.7 s of
  start-up. A None in sys.modules makes `import torch` raise ImportError, which tensorboardX handles."""
  import sys
  block = "torch" not in sys.modules
  if block:
    sys.modules["torch"] = None  # type: ignore[assignment]
  try:
    from tensorboardX import SummaryWriter
  finally:
    if block and sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]
  return SummaryWriter(str(folder))


class RunLogger:
  """TensorBoard scalars + progress bar. `scalars(step, {...})` at log steps, `advance(n)` every step."""

  def __init__(self, workdir: str | pathlib.Path, total_steps: int, start_step: int, *, progress: bool = True,
               tensorboard: bool = True):
    self.is_main = jax.process_index() == 0
    self.writer = None
    if self.is_main and tensorboard:
      self.writer = _summary_writer(pathlib.Path(workdir) / "tensorboard")
    # Appended to across resumes: a resumed run's lines repeat steps after its last checkpoint; readers keep the last.
    self.jsonl = open(pathlib.Path(workdir) / "metrics.jsonl", "a") if self.is_main else None
    self.bar = None
    if self.is_main and progress:
      from tqdm.auto import tqdm
      self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

  def advance(self, n: int = 1) -> None:
    if self.bar is not None:
      self.bar.update(n)

  def scalars(self, step: int, values: Mapping[str, float], prefix: str = "train/") -> None:
    if not self.is_main:
      return
    if self.writer is not None:
      for k, v in values.items():
        self.writer.add_scalar(prefix + k, float(v), step)
    if self.jsonl is not None:
      self.jsonl.write(json.dumps({"step": int(step), **{prefix + k: float(v) for k, v in values.items()}}) + "\n")
      self.jsonl.flush()
    if self.bar is not None and prefix == "train/":
      shown = {k: values[k] for k in ("loss", "lr", "logit_scale") if k in values}
      self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

  def message(self, text: str) -> None:
    if self.bar is not None and not _to_terminal():  # else the terminal handler writes it above the bar
      self.bar.write(text)
    log.info(text)

  def close(self) -> None:
    if self.jsonl is not None:
      self.jsonl.close()
    if self.writer is not None:
      self.writer.flush()
      self.writer.close()
    if self.bar is not None:
      self.bar.close()
