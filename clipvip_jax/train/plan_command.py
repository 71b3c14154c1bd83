"""`python -m clipvip_jax.plan --config configs/X.py[:V] --topology v5p:4x4x4 [--config.key=value ...] [--json PATH]` (the
command line; the entry point is clipvip_jax/plan.py).

Compiles the trainer's step (and the evaluation encoders) for a TPU slice on this machine, with no TPU and no
data, and prints per chip: HBM against the chip's capacity, model and compiler FLOPs, the step time estimate and
its MFU, and the collectives. Where the recipe does not fit or wastes the chip it compiles alternatives and
prints the `--config` flags of the best that fits. Needs libtpu (`make tpu`); for NVIDIA GPUs (`--topology h100:8`)
the JAX CUDA plugin (`make gpu-plan`), and then gives memory and collectives, no time estimate. The library is
clipvip_jax/train/planner.py.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

PROG = "python -m clipvip_jax.plan"


def _gib(n: float) -> str:
  return f"{n / 1024**3:.2f} GiB"


def _copies(entry: dict[str, int]) -> str:
  """' (3 distinct)' where the compiler copied collectives into their consumers (planner.collectives)."""
  distinct = entry.get("distinct", entry["count"])
  return f" ({distinct} distinct)" if distinct != entry["count"] else ""


def _bytes(n: float) -> str:
  for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
    if n >= size:
      return f"{n / size:.1f} {unit}"
  return f"{int(n)} B"


def format_plan(p: dict[str, Any]) -> str:
  """The plan as the command prints it."""
  hbm = p["hbm"]
  lines = [f"{p['topology']}: {p['num_chips']} x {p['chip']} ({p['device_kind']}), {p['num_hosts']} host(s); mesh "
           f"{p['mesh']}, global batch {p['global_batch']} ({p['per_chip_batch']:g} per chip), remat {p['remat']}, "
           f"attention {p.get('attention', 'xla')}, constrained activations "
           f"{'yes' if p.get('constrain_activations') else 'no'}",
           f"  {p['compiler']}, jax {p['jax']}; train step compiled in {p['compile_seconds']:.0f} s",
           "per chip:",
           f"  HBM       {_gib(hbm['peak'])} of {_gib(p['hbm_capacity_bytes'])} "
           f"({'fits' if p['fits'] else 'DOES NOT FIT'}, headroom {100 * p['headroom']:.0f}%): arguments "
           f"{_gib(hbm['arguments'])}, temporaries {_gib(hbm['temporaries'])}, outputs {_gib(hbm['outputs'])} "
           f"({_gib(hbm['aliased'])} aliased to arguments), code {_gib(hbm['code'])}",
           f"  FLOPs     model {p.get('model_flops', 0) / 1e12:.3f} T (the trainer's MFU basis), compiler "
           + (f"{p['compiler_flops'] / 1e12:.3f} T (with recomputation)" if p["compiler_flops"] else "none given")]
  roof = p["roofline"]
  if p["step_seconds_source"] == "none":
    est = "no estimate (the compiler gives no cost analysis for this target)"
  elif p["step_seconds_source"] == "compiler":
    est = f"compiler's estimate {p['step_seconds'] * 1e3:.1f} ms"
  else:
    given = p["compiler_seconds"]
    est = (f"no usable compiler estimate ({'none' if given is None else f'{given:.3g} s'}); roofline "
           f"{p['step_seconds'] * 1e3:.1f} ms = max(compute {roof['compute_s'] * 1e3:.1f}, HBM "
           f"{roof['memory_s'] * 1e3:.1f}, ICI {roof['collective_s'] * 1e3:.1f} ms)")
  mfu = p.get("mfu")
  lines.append(f"  step      {est} -> MFU {100 * mfu:.0f}% (an estimate, not a measurement)" if mfu is not None
               else f"  step      {est}")
  ops = p.get("op_sum")
  if ops:  # the compiler's per-op cycle estimates, summed: a cross-check of the line above
    lines.append(f"  op sum    {ops['seconds'] * 1e3:.1f} ms: the compiler's per-op cycle estimates one after another "
                 f"({ops['op_seconds'] * 1e3:.1f} ms) + Pallas kernels at their declared cost "
                 f"({ops['kernel_seconds'] * 1e3:.1f} ms)" + (f" -> MFU {100 * ops['mfu']:.0f}%" if "mfu" in ops else ""))
  if p["collectives"] is None:
    lines.append("  collectives  unavailable (libtpu could not print this program)")
  else:
    lines.append("  collectives  " + (", ".join(f"{k} x{v['count']}{_copies(v)} {_bytes(v['bytes'])}"
                                                for k, v in sorted(p["collectives"].items())) or "none"))
  for name, e in (p.get("eval") or {}).items():
    lines.append(f"  {name:<12} HBM {_gib(e['hbm_peak_bytes'])}, {e['compiler_flops'] / 1e12:.3f} TFLOP, "
                 + (f"{e['step_seconds'] * 1e3:.2f} ms ({e['step_seconds_source']})" if e["step_seconds"]
                    else "no time estimate"))
  for alt in p.get("alternatives") or []:
    lines.append(f"  tried {' '.join(alt['flags'])}: HBM {_gib(alt['hbm_peak_bytes'])} "
                 f"({'fits' if alt['fits'] else 'no'}), step "
                 + (f"{alt['step_seconds'] * 1e3:.1f} ms" if alt["step_seconds"] else "(no estimate)")
                 + (f", MFU {100 * alt['mfu']:.0f}%" if alt.get("mfu") else ""))
  if p.get("suggestion"):
    lines.append(("does not fit; " if not p["fits"] else "") + "use: " + " ".join(p["suggestion"])
                 + (f"  ({p['suggestion_note']})" if p.get("suggestion_note") else ""))
  elif not p["fits"]:
    lines.append("does not fit, and no alternative tried fits" if "alternatives" in p
                 else "does not fit (--no-search: no alternatives compiled)")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  from clipvip_jax.runtime import cli_errors
  from clipvip_jax.train import cli

  def run(args_in: Sequence[str]) -> int:
    parser = cli_errors.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[1],
                                       epilog="Override any config field with --config.KEY=VALUE.")
    parser.add_argument("--config", required=True, help="config file, optionally :ARG")
    parser.add_argument("--topology", required=True, help="TPU slice as libtpu names it: v4:2x2x1, v5e:2x2, "
                        "v5p:4x4x4, v6e:8x8, ...; or GPUs: h100:8, a100:2x8 (hosts x GPUs)")
    parser.add_argument("--json", help="write the plan's facts to this JSON file")
    parser.add_argument("--no-search", action="store_true", help="report the recipe only; compile no alternatives")
    parser.add_argument("--no-eval", action="store_true", help="do not compile the evaluation encoders")
    parser.add_argument("--min-headroom", type=float, default=0.15,
                        help="HBM share a suggestion must leave free (default 0.15)")
    parser.add_argument("--hbm-gib", type=float, help="plan against this much HBM per chip instead of the chip's")
    rest, overrides = cli.split_overrides(args_in)
    args = parser.parse_args(rest)
    if not 0 <= args.min_headroom < 1:
      raise cli_errors.UsageError(f"--min-headroom {args.min_headroom} must be in [0, 1)")
    if args.hbm_gib is not None and args.hbm_gib <= 0:
      raise cli_errors.UsageError(f"--hbm-gib {args.hbm_gib} must be positive")
    config = cli.config_from_args(args.config, overrides)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host compiles; the slice is described by libtpu / the plugin
    import jax
    jax.config.update("jax_platforms", "cpu")
    from clipvip_jax.train import planner
    cli_errors.quiet_library_logs()
    result = planner.plan(config, args.topology, search=not args.no_search, min_headroom=args.min_headroom,
                          hbm_bytes=int(args.hbm_gib * 1024**3) if args.hbm_gib else None,
                          with_eval=not args.no_eval, report=lambda s: print(s, file=sys.stderr, flush=True))
    result["command"] = " ".join([PROG, *args_in])
    print(format_plan(result))
    if args.json:
      from clipvip_jax.files import write_json_atomic
      write_json_atomic(args.json, result)
    return 0

  return cli_errors.run_cli(run, sys.argv[1:] if argv is None else list(argv), prog=PROG)
