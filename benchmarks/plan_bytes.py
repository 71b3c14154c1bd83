"""Where a TPU program's bytes go: the trainer's step compiled for a slice (as `python -m clipvip_jax.plan` does),
its optimised HLO read op by op (operands + results of each top-level instruction, grouped by the JAX operation
that made it), and, given a second config, the difference (e.g. one more layer). docs/performance.md section 4
("v6e: where the remaining bytes go") comes from:

  python -m benchmarks.plan_bytes --topology v6e:2x2 --config benchmarks/plan_experiments.py:pallas \
      --minus benchmarks/plan_experiments.py:pallas,2

the compiler's per-op estimates of the whole B/16 step as shipped on v6e-64, by op (section 4, "The compiler's
per-op estimates": where v6e's time goes; the second table):

  python -m benchmarks.plan_bytes --topology v6e:8x8 --config configs/clipvip_pretrain.py:B/16

and why the recipes constrain activations on TPU (the whole B/16 step on v6e-64; the table is the unconstrained
program's bytes less the constrained one's, i.e. what the constraint saves):

  python -m benchmarks.plan_bytes --topology v6e:8x8 --config configs/clipvip_pretrain.py:B/16 \
      --set constrain_activations=True --minus-set constrain_activations=False

Each compile takes 1.5-3 minutes on 2 cores, a whole B/16 step 4-5 (one at a time: libtpu allows one process).
The per-op sum is this script's reading, not the compiler's: on these programs it comes to 70-80% of
cost_analysis()'s "bytes accessed", and it counts operands in on-chip memory (layouts with S(1)) separately.
"""

from __future__ import annotations

import argparse
import collections
import re
from collections.abc import Sequence

from clipvip_jax.models import layers
from clipvip_jax.train import cli, planner, targets

_ITEM = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(bf16|f16|f32|s32|u32|pred|s8|u8|s64|u64|f64)\[([0-9,]*)\](\{[^}]*\})?")
_INSTR = re.compile(r"\s+(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
# No data moved (views, tuples, the halves of async pairs counted at their start) or moved by their operands' ops.
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id", "copy-done", "slice-done", "opt-barrier", "all-reduce-done", "all-gather-done",
         "collective-permute-done"}


def _bytes(text: str) -> tuple[int, int]:
  """(bytes in HBM, bytes in on-chip memory S(1)) of the arrays named in an HLO shape string."""
  hbm = vmem = 0
  for dtype, dims, layout in _ARRAY.findall(text):
    n = _ITEM[dtype]
    for d in filter(None, dims.split(",")):
      n *= int(d)
    if layout and "S(1)" in layout:
      vmem += n
    else:
      hbm += n
  return hbm, vmem


def _nth_array(shape: str, n: int) -> str:
  arrays = [m.group(0) for m in _ARRAY.finditer(shape)]
  return arrays[n] if len(arrays) > n else ""


def op_bytes(hlo: str) -> dict[str, list[int]]:
  """{JAX op name (digits folded): [HBM bytes, on-chip bytes]} over the entry computation's instructions."""
  entry = hlo[hlo.index("\nENTRY"):]
  entry = entry[:entry.index("\n}\n")]
  shapes, out = {}, collections.defaultdict(lambda: [0, 0])
  for line in entry.splitlines()[1:]:
    m = _INSTR.match(line)
    if not m:
      continue
    name, shape, op, rest = m.groups()
    shapes[name] = shape
    if op in _FREE or 'custom_call_target="ConcatBitcast"' in rest:
      continue
    if op in ("copy-start", "slice-start"):  # (source, destination, context): the destination read and written
      destination = _bytes(_nth_array(shape, 1))
      moved = [destination, destination]
    else:
      moved = [_bytes(shape)]
      moved += [_bytes(shapes[a]) for a in re.findall(r"%([\w.\-]+)", rest.split("), ")[0]) if a in shapes]
    meta = re.search(r'op_name="([^"]*)"', line)
    key = re.sub(r"\d+", "#", meta.group(1)) if meta else f"({op}, no op name)"
    for hbm, vmem in moved:
      out[key][0] += hbm
      out[key][1] += vmem
  return dict(out)


def op_cycles(hlo: str) -> dict[str, int]:
  """{JAX op name (digits folded): the compiler's estimated cycles} over the entry computation's instructions (each
  op's `estimated_cycles`; a conditional's branches are not entered: the optimiser update is one op here)."""
  entry = hlo[hlo.index("\nENTRY"):]
  entry = entry[:entry.index("\n}\n")]
  out: dict[str, int] = collections.defaultdict(int)
  for line in entry.splitlines()[1:]:
    m, cycles = _INSTR.match(line), re.search(r'"estimated_cycles":"([0-9]+)"', line)
    if not (m and cycles):
      continue
    meta = re.search(r'op_name="([^"]*)"', line)
    out[re.sub(r"\d+", "#", meta.group(1)) if meta else f"({m.group(3)}, no op name)"] += int(cycles.group(1))
  return dict(out)


def compile_hlo(spec: str, topology: str, overrides: Sequence[str] = ()) -> tuple[str, dict[str, float]]:
  config = cli.load_config(spec)
  for item in overrides:  # KEY=VALUE, as --config.KEY=VALUE on a command line
    key, _, value = item.partition("=")
    cli.apply_override(config, key, value)
  slice_ = targets.describe(topology)
  mesh = planner.make_mesh(config, slice_.devices)
  _, lowered = planner.lower_train_step(config, mesh, layers.Target(slice_.platform, slice_.device_kind))
  compiled = lowered.compile(slice_.compiler_options or None)
  return compiled.as_text(), planner.cost(compiled)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--minus", help="a second config; the table is --minus's bytes less --config's")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override of --config")
  parser.add_argument("--minus-set", action="append", default=[], metavar="KEY=VALUE",
                      help="override of --minus (which defaults to --config when only overrides are given)")
  parser.add_argument("--topology", default="v6e:2x2")
  parser.add_argument("--top", type=int, default=25)
  args = parser.parse_args()
  import jax
  jax.config.update("jax_platforms", "cpu")
  targets.ensure_libtpu()
  if args.minus_set and not args.minus:
    args.minus = args.config
  hlo, cost = compile_hlo(args.config, args.topology, args.set)
  table, cycles = op_bytes(hlo), op_cycles(hlo)
  print(f"{args.config} on {args.topology}: compiler {cost.get('bytes accessed', 0) / 1e9:.2f} GB, "
        f"{cost.get('flops', 0) / 1e12:.3f} TFLOP")
  if args.minus:
    hlo2, cost2 = compile_hlo(args.minus, args.topology, args.minus_set)
    other, other_cycles = op_bytes(hlo2), op_cycles(hlo2)
    cycles = {k: other_cycles.get(k, 0) - cycles.get(k, 0) for k in set(cycles) | set(other_cycles)}
    print(f"{args.minus}: compiler {cost2.get('bytes accessed', 0) / 1e9:.2f} GB, "
          f"{cost2.get('flops', 0) / 1e12:.3f} TFLOP; difference "
          f"{(cost2.get('bytes accessed', 0) - cost.get('bytes accessed', 0)) / 1e9:.2f} GB")
    table = {k: [other.get(k, [0, 0])[i] - table.get(k, [0, 0])[i] for i in (0, 1)] for k in set(table) | set(other)}
  total = [sum(v[i] for v in table.values()) for i in (0, 1)]
  clock = targets.describe(args.topology).chip.clock_hz
  print(f"\n| op (JAX name) | HBM GB | on-chip GB |\n|---|---|---|")
  for key, (hbm, vmem) in sorted(table.items(), key=lambda kv: -sum(kv[1]))[:args.top]:
    print(f"| {key[:100]} | {hbm / 1e9:.3f} | {vmem / 1e9:.3f} |")
  print(f"| total (read off the HLO) | {total[0] / 1e9:.3f} | {total[1] / 1e9:.3f} |")
  # The compiler's per-op estimates (planner.op_sum sums them): where the time goes, which bytes do not say.
  print(f"\n| op (JAX name) | compiler's estimate, ms at {clock / 1e9:.2f} GHz | share |\n|---|---|---|")
  whole = sum(cycles.values()) or 1
  for key, n in sorted(cycles.items(), key=lambda kv: -abs(kv[1]))[:args.top]:
    print(f"| {key[:100]} | {n / clock * 1e3:.2f} | {100 * n / whole:.1f}% |")
  print(f"| total (entry computation) | {whole / clock * 1e3:.2f} | |")


if __name__ == "__main__":
  main()
