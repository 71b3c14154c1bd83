"""The table of docs/performance.md section 4, printed from the plans' JSON (`python -m clipvip_jax.plan ... --json`).

    python -m benchmarks.plan_table                       # the plans of benchmarks/results/plans/ORDER
    python -m benchmarks.plan_table PLAN.json [PLAN.json ...]

One row per plan, in the order given. "Full run" is the recipe's own length (num_epochs over its training set, at
the plan's global batch) times the planned step: pretraining per million clips of the corpus (its size is the
user's), MSR-VTT fine-tuning over the 9k-video train split as each original counts an epoch (CLIP-ViP: one sampled
caption per video, 9,000 clips; CLIP2Video: every caption, 180,000 pairs). Input pipeline and evaluation time are
not included. GPU plans have no step estimate (XLA's GPU compiler gives no cost analysis): their time columns are
empty.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

# Training examples per epoch, and epochs, of each recipe (configs/*.py num_epochs; the originals' epoch).
RECIPES = {
    "clipvip_pretrain.py": ("pretrain", 1_000_000, 5, "per 1M clips"),
    "clipvip_msrvtt.py": ("CLIP-ViP MSR-VTT", 9_000, 100, ""),
    "clip2video_msrvtt.py": ("CLIP2Video MSR-VTT", 180_000, 5, ""),
}


def _bytes(n: float) -> str:
  return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


def _recipe(command: str) -> tuple[str, str, int, int, str]:
  config = command.split("--config ")[1].split()[0]
  name, _, variant = config.partition(":")
  label, clips, epochs, unit = RECIPES[pathlib.Path(name).name]
  return f"{label} {variant or 'B/32'}".strip(), config, clips, epochs, unit


def _duration(seconds: float) -> str:
  return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def row(p: dict) -> str:
  label, _, clips, epochs, unit = _recipe(p["command"])
  hbm = (f"{'yes' if p['fits'] else 'NO'}, {p['hbm_peak_bytes'] / 1024**3:.1f} / "
         f"{p['hbm_capacity_bytes'] / 1024**3:.0f} GiB ({100 * p['headroom']:.0f}% free)")
  flops = f"{p.get('model_flops', 0) / 1e12:.2f} / " + (f"{p['compiler_flops'] / 1e12:.2f}" if p["compiler_flops"]
                                                         else "none")
  if p.get("step_seconds"):
    source = p["step_seconds_source"]
    if source == "roofline":
      roof = p["roofline"]
      source = "roofline: " + max(("compute", "compute_s"), ("HBM", "memory_s"), ("ICI", "collective_s"),
                                  key=lambda kv: roof[kv[1]])[0]
    step = f"{p['step_seconds'] * 1e3:.0f} ms ({source})"
    mfu = f"{100 * p['mfu']:.0f}%" if p.get("mfu") else ""
    steps = math.ceil(epochs * clips / p["global_batch"])
    full = _duration(steps * p["step_seconds"]) + (f" {unit}" if unit else "")
  else:
    step, mfu, full = "no estimate", "", ""
  comms = p.get("collectives") or {}
  collectives = "; ".join(
      f"{k} {v['count']}" + (f" ({v['distinct']} distinct)" if v.get("distinct", v["count"]) != v["count"] else "")
      + f", {_bytes(v['bytes'])}" for k, v in sorted(comms.items(), key=lambda kv: -kv[1]["bytes"]))
  setting = ", ".join([p["remat"], p.get("attention", "xla")]
                      + ["constrained"] * bool(p.get("constrain_activations"))
                      + ["fsdp"] * (p.get("mesh", {}).get("fsdp", 1) > 1)
                      + ["conv patches"] * (p.get("patch_embedding") == "conv")
                      + ["1-pass LN"] * bool(p.get("one_pass_layer_norm")))
  ops = p.get("op_sum")  # plans made before the planner read per-op cycles have none
  op_sum = f"{ops['seconds'] * 1e3:.0f} ms, {100 * ops['mfu']:.0f}%" if ops and ops.get("mfu") else ""
  return (f"| {label} ({p['global_batch']}, {p['per_chip_batch']:g}/chip) | {p['topology']} ({p['num_chips']}) | "
          f"{setting} | {hbm} | {flops} | {step} | {mfu} | {op_sum} | {collectives or 'unavailable'} | {full} | "
          f"{p['compile_seconds']:.0f} s |")


HEADER = ("| case (global batch, per chip) | slice (chips) | remat, attention (, constrained activations, fsdp mesh, "
          "conv patches, 1-pass LN) | fits? HBM peak / capacity | model / compiler TFLOP | step (source) | MFU "
          "| op sum, its MFU | collectives (count, bytes) | full run | compile |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")


PLANS = pathlib.Path("benchmarks/results/plans")


def default_paths() -> list[str]:
  """The plans named in PLANS/ORDER (one name per line, the table's order), else every plan by name."""
  order = PLANS / "ORDER"
  if order.exists():
    names = [line.strip() for line in order.read_text().splitlines() if line.strip()]
    return [str(PLANS / f"{name}.json") for name in names if (PLANS / f"{name}.json").exists()]
  return sorted(str(p) for p in PLANS.glob("*.json"))


def main(argv: list[str] | None = None) -> int:
  paths = (sys.argv[1:] if argv is None else argv) or default_paths()
  print(HEADER)
  for path in paths:
    print(row(json.loads(pathlib.Path(path).read_text())))
  return 0


if __name__ == "__main__":
  sys.exit(main())
