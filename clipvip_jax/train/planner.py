"""Plans a training run on a TPU slice before one is booked: the trainer's own step compiled by the TPU compiler.

  from clipvip_jax.train import planner
  plan = planner.plan(config, "v5p:4x4x4")        # config: the run's ConfigDict (configs/*.py get_config())
  plan["fits"], plan["hbm_peak_bytes"], plan["collectives"], plan.get("suggestion")

The program is the trainer's: `trainer.setup_training(..., abstract=True)` builds the same model, sharding rules,
mesh, optimiser, loss and jitted step as a real run, with ShapeDtypeStructs for the weights and the optimiser
state and `step.batch_spec` for the batch, and "auto" settings resolved for the slice's chip
(`layers.build_target`). Lowered and compiled for the slice's devices (libtpu, `targets.describe`), it gives per
chip: HBM (arguments, temporaries, outputs, code), the compiler's FLOPs and its time estimate where it gives one
(else a roofline from its FLOPs and bytes), and every collective of the program (count and bytes; a loop body's
collectives count once). The evaluation's encoders are compiled the same way.

When the recipe does not fit, or leaves the chip's memory mostly idle under a recomputing remat policy, the
planner compiles alternatives (remat policy, an fsdp mesh axis, gradient accumulation) and names the best that
fits with the requested headroom, as the `--config` flags that select it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import time
from typing import Any, Callable, Iterable

import jax
import ml_collections

from clipvip_jax.models import clip, layers
from clipvip_jax.train import model_flops, sharding, targets, trainer
from clipvip_jax.train import step as step_lib

PlanError = targets.TargetError

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def _shape_bytes(text: str) -> list[int]:
  out = []
  for dtype, dims in _SHAPE.findall(text):
    if dtype in _DTYPE_BYTES:
      out.append(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d))
  return out


_CHANNEL = re.compile(r"\bchannel_id=([0-9]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {"count", "bytes"}} of the collectives in an optimised HLO module's text (bytes: each op's result,
  per device; an async op counted at its start, a loop body once). The TPU compiler writes a reduce-scatter as
  an all-reduce inside a fusion computation named all-reduce-scatter.N: counted as a reduce-scatter (bytes: the
  unscattered size). "distinct": the program's collectives before the compiler copied them: the TPU compiler fuses a
  small all-gather into each consumer (the copies share the op's channel_id and run once per consumer), e.g. one
  logical gather of CLIP2Video's normalised features appears 54 times."""
  out: dict[str, dict[str, int]] = {}
  computation, channels = "", set()
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head:
      computation = head.group(1)
      continue
    m = _OP.search(line)
    if not m or line.lstrip().startswith("ROOT %tuple"):
      continue
    result, kind, start = m.group(1), m.group(2), m.group(3)
    if kind == "all-reduce" and computation.startswith("all-reduce-scatter"):
      kind = "reduce-scatter"
    sizes = _shape_bytes(result)
    if start and kind == "collective-permute":
      sizes = sizes[1:2]  # (operand, result, contexts...)
    elif start and kind in ("all-gather", "reduce-scatter", "all-to-all") and len(sizes) > 1:
      sizes = sizes[len(sizes) // 2:]  # (operands..., results...)
    entry = out.setdefault(kind, {"count": 0, "bytes": 0, "distinct": 0})
    entry["count"] += 1
    entry["bytes"] += int(sum(sizes))
    channel = _CHANNEL.search(line)
    if channel is None or (kind, channel.group(1)) not in channels:
      entry["distinct"] += 1
      if channel is not None:
        channels.add((kind, channel.group(1)))
  return out


_CYCLES = re.compile(r'"estimated_cycles":"([0-9]+)"')
_KERNEL_COST = re.compile(r'"cost_estimate":\{"flops":"([0-9]+)",(?:"transcendentals":"[0-9]+",)?"bytes_accessed":"([0-9]+)"')
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_CALLEE = re.compile(r"\b(?:to_apply|body)=%?([\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"([0-9]+)"')


def op_sum(hlo_text: str, chip: targets.Chip) -> dict[str, float] | None:
  """The TPU compiler's own per-op estimates, summed as the TensorCore runs them, one op after another: each
  top-level op's `estimated_cycles` (its backend config) at the chip's clock, plus each Pallas kernel at the
  roofline of the cost it declares (the compiler gives kernels no cycles). A conditional counts its dearer
  branch, a loop its body times its known trip count; async copies and collectives count nothing (they overlap).
  A cross-check of `optimal_seconds`, and an estimate where that one is missing (e.g. v6e): on the B/16 step on
  v5p-64 it is 14% above it (docs/performance.md section 4). None without cycles or a clock (GPU programs)."""
  if not chip.clock_hz:
    return None
  body: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head:
      current = head.group(1)
      body[current] = []
      entry = current if line.startswith("ENTRY") else entry
    elif current is not None and line.startswith("  "):
      body[current].append(line)
  totals: dict[str, tuple[int, float]] = {}

  def walk(name: str) -> tuple[int, float]:  # (cycles, kernel seconds) of one run of a computation
    if name not in totals:
      cycles, kernel_s = 0, 0.0
      for line in body.get(name, ()):
        if (m := _CYCLES.search(line)):
          cycles += int(m.group(1))
        if "tpu_custom_call" in line and (k := _KERNEL_COST.search(line)):
          kernel_s += max(int(k.group(1)) / chip.peak_flops, int(k.group(2)) / chip.hbm_bandwidth)
        if (b := _BRANCHES.search(line)):
          branches = [walk(x.strip().lstrip("%")) for x in b.group(1).split(",")]
          c, k = max(branches, key=lambda ck: ck[0] / chip.clock_hz + ck[1])
          cycles, kernel_s = cycles + c, kernel_s + k
        if (" call(" in line or " while(" in line) and (callee := _CALLEE.search(line)):
          trips = int(t.group(1)) if (t := _TRIP_COUNT.search(line)) else 1
          c, k = walk(callee.group(1))
          cycles, kernel_s = cycles + trips * c, kernel_s + trips * k
      totals[name] = (cycles, kernel_s)
    return totals[name]

  if entry is None:
    return None
  cycles, kernel_s = walk(entry)
  if not cycles:
    return None
  return {"seconds": cycles / chip.clock_hz + kernel_s, "op_seconds": cycles / chip.clock_hz,
          "kernel_seconds": kernel_s, "cycles": float(cycles)}


def _hlo_text(compiled: Any) -> str | None:
  try:
    return compiled.as_text()
  except Exception:  # noqa: BLE001 — libtpu cannot print some programs; the facts that need it say "unavailable"
    return None


def memory(compiled: Any) -> dict[str, int]:
  m = compiled.memory_analysis()
  args, out, alias = m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes
  temp, code = m.temp_size_in_bytes, m.generated_code_size_in_bytes
  return {"arguments": int(args), "outputs": int(out), "aliased": int(alias), "temporaries": int(temp),
          "code": int(code), "peak": int(args + out - alias + temp + code)}


def cost(compiled: Any) -> dict[str, float]:
  c = compiled.cost_analysis()
  c = (c[0] if c else {}) if isinstance(c, (list, tuple)) else (c or {})
  return {k: float(c[k]) for k in ("flops", "bytes accessed", "optimal_seconds", "transcendentals") if k in c}


def analyse(compiled: Any, chip: targets.Chip, model_flops_per_chip: float | None = None) -> dict[str, Any]:
  """Per-chip facts of a compiled program: HBM, FLOPs, time estimate (compiler's, else roofline), collectives."""
  mem, c = memory(compiled), cost(compiled)
  text = _hlo_text(compiled)
  comms = collectives(text) if text is not None else None
  flops, accessed = c.get("flops", 0.0), c.get("bytes accessed", 0.0)
  comm_bytes = sum(v["bytes"] for v in comms.values()) if comms else 0
  roofline = {"compute_s": flops / chip.peak_flops, "memory_s": accessed / chip.hbm_bandwidth,
              "collective_s": comm_bytes / chip.ici_bandwidth}
  estimate = c.get("optimal_seconds")
  if estimate is not None and estimate > 0:
    step_s, source = estimate, "compiler"
  elif flops > 0:
    step_s, source = max(roofline.values()), "roofline"
  else:  # no cost analysis at all (XLA's GPU compiler): no time, rather than one from FLOPs alone
    step_s, source, roofline = None, "none", None
  facts = {"hbm": mem, "hbm_peak_bytes": mem["peak"], "hbm_capacity_bytes": chip.hbm_bytes,
           "headroom": 1.0 - mem["peak"] / chip.hbm_bytes, "fits": mem["peak"] <= chip.hbm_bytes,
           "compiler_flops": flops, "bytes_accessed": accessed, "compiler_seconds": estimate,
           "roofline": roofline, "step_seconds": step_s, "step_seconds_source": source,
           "collectives": comms, "collective_bytes": comm_bytes if comms is not None else None,
           "op_sum": op_sum(text, chip) if text is not None else None}
  if model_flops_per_chip:
    facts["model_flops"] = model_flops_per_chip
    facts["mfu"] = model_flops_per_chip / (step_s * chip.peak_flops) if step_s else None
    if facts["op_sum"]:
      facts["op_sum"]["mfu"] = model_flops_per_chip / (facts["op_sum"]["seconds"] * chip.peak_flops)
  return facts


# ------------------------------------------------------------------------------------------------ the programs


def _check_divisible(config: ml_collections.ConfigDict, mesh) -> None:
  devices = trainer.batch_devices(mesh, config.sharding_rules)
  batch, accum = int(config.data.batch_size), int(config.get("grad_accum", 1))
  if batch % devices:
    raise PlanError(f"the global batch {batch} does not divide over the {devices} devices of the mesh's batch axes "
                    f"(config.data.batch_size; mesh {tuple(mesh.shape.values())})")
  if batch % accum or (batch // accum) % devices:
    raise PlanError(f"config.grad_accum {accum} leaves micro-batches of {batch / accum:g} rows, which do not divide "
                    f"over the {devices} devices of the mesh's batch axes")


def make_mesh(config: ml_collections.ConfigDict, devices: Iterable[Any]):
  devices = list(devices)
  try:
    return sharding.make_mesh(tuple(int(x) for x in config.mesh), devices)
  except ValueError as e:
    raise PlanError(f"config.mesh {tuple(config.mesh)} does not match the slice's {len(devices)} chips: {e}") from None


def lower_train_step(config: ml_collections.ConfigDict, mesh, target: layers.Target | None = None):
  """(TrainingSetup, Lowered) of the run's training step on `mesh`, with no weights: the trainer's own setup in
  its abstract mode. `target`: the chip "auto" settings are resolved for (None: this machine's backend)."""
  config = trainer.as_config_dict(config)
  trainer.check_config(config)
  _check_divisible(config, mesh)
  rules = config.sharding_rules
  with layers.build_target(target):
    setup = trainer.setup_training(config, mesh, rules, int(config.get("total_steps") or 10_000), abstract=True)
  batch = step_lib.batch_spec(config.data, setup.objective, sharding.batch_sharding(mesh, rules, 1))
  return setup, setup.train_step.fn.lower(setup.model.params, setup.opt_state, batch)


def lower_eval_steps(config: ml_collections.ConfigDict, setup: Any, mesh) -> dict[str, Any]:
  """{"encode_video", "encode_text"}: the evaluator's programs lowered for the run's eval batch."""
  from clipvip_jax.train.evaluator import encode_functions
  from data_pipelines import pipeline
  data = pipeline.DataConfig.from_config(trainer.eval_data_config(config))
  bs = sharding.batch_sharding(mesh, config.sharding_rules, 1)
  devices = trainer.batch_devices(mesh, config.sharding_rules)
  if data.batch_size % devices:
    raise PlanError(f"the evaluation batch {data.batch_size} does not divide over the {devices} devices of the "
                    "mesh's batch axes (config.eval.batch_size)")
  video_fn, text_fn, _ = encode_functions(setup.model.graphdef, setup.model.rest, setup.model.shardings, bs)
  spec = pipeline.batch_spec(data)

  def arg(name, dtype=None):
    shape, dt = spec[name]
    return jax.ShapeDtypeStruct(shape, dtype or dt, sharding=sharding.batch_sharding(mesh, config.sharding_rules,
                                                                                       len(shape)))

  params = setup.model.params
  return {"encode_video": video_fn.lower(params, arg("video"), arg("frame_mask"), arg("valid"), arg("valid")),
          "encode_text": text_fn.lower(params, arg("text_ids"), arg("text_mask"))}


def train_flops_per_chip(config: ml_collections.ConfigDict, setup: Any, num_chips: int) -> float:
  return model_flops.train_step_flops(config.mode, setup.model.kind, setup.model.config, config.data) / num_chips


# ------------------------------------------------------------------------------------------------ alternatives


@dataclasses.dataclass(frozen=True)
class Variant:
  """A change to the recipe: `--config` flags and the edit they make."""
  flags: tuple[str, ...]

  def apply(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    from clipvip_jax.train import cli
    out = copy.deepcopy(config)
    for flag in self.flags:
      key, _, value = flag.removeprefix("--config.").partition("=")
      cli.apply_override(out, key, value)
    return out


def _remat_variants(config) -> list[Variant]:
  return [Variant((f"--config.model.remat={r}",)) for r in ("none", "elementwise", "dots_no_batch", "dots", "full")
          if r != config.model.get("remat")]


def _memory_variants(config, num_chips: int) -> list[Variant]:
  """Ways to need less memory, cheapest first: full remat, then FSDP over the whole slice, then accumulation."""
  out = []
  if config.model.get("remat") != "full":
    out.append(Variant(("--config.model.remat=full",)))
  fsdp = ("--config.mesh=(1,-1,1)",)
  if tuple(config.mesh) != (1, -1, 1):
    out.append(Variant(fsdp))
  batch, accum = int(config.data.batch_size), int(config.get("grad_accum", 1))
  for k in (2, 4, 8, 16):
    if batch % (accum * k) == 0 and (batch // (accum * k)) % num_chips == 0:
      out.append(Variant(fsdp + (f"--config.grad_accum={accum * k}", "--config.model.remat=full")))
  return out


def _batch_variants(config, facts: dict[str, Any]) -> list[Variant]:
  """A per-chip batch the idle HBM allows to grow: the global batch x2 and x4 on the same chips. It changes the
  optimisation (a larger batch wants its learning rate retuned), so it is offered for throughput, never forced."""
  if facts["headroom"] <= 0.5 or int(config.get("grad_accum", 1)) > 1:
    return []
  batch = int(config.data.batch_size)
  return [Variant((f"--config.data.batch_size={batch * k}",)) for k in (2, 4)]


def _sharding_variants(facts: dict[str, Any]) -> list[Variant]:
  """FSDP over the whole slice, for a data-parallel program on several chips whose time the compiler estimates:
  every chip then updates only its share of the weights and Adam moments instead of all of them (B/16 pretraining
  planned 9% faster on v5p-64 and v6e-64 with it: docs/performance.md section 4). Offered where faster."""
  mesh = facts["mesh"]
  if facts["step_seconds"] is None or mesh.get("data", 1) < 2 or mesh.get("fsdp", 1) > 1 or mesh.get("tensor", 1) > 1:
    return []
  return [Variant(("--config.mesh=(1,-1,1)",))]


def _seconds_per_clip(facts: dict[str, Any]) -> float:
  return facts["step_seconds"] / facts["global_batch"]


def _fits(facts: dict[str, Any], min_headroom: float) -> bool:
  return facts["fits"] and facts["headroom"] >= min_headroom


def _wastes(config, facts: dict[str, Any], platform: str) -> bool:
  """Recomputation paid for memory the chip does not need: a whole-block remat policy under half the HBM."""
  return layers.resolve_remat(config.model.get("remat", "auto"), platform) in layers.BLOCK_REMAT and \
      facts["headroom"] > 0.5


# ------------------------------------------------------------------------------------------------ the plan


def compile_facts(config: ml_collections.ConfigDict, slice_: targets.Slice, *, with_eval: bool = False,
                  report: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
  """Compiles the run's training step (and, with `with_eval`, its evaluation encoders) for the slice."""
  mesh = make_mesh(config, slice_.devices)
  target = layers.Target(slice_.platform, slice_.device_kind)
  t0 = time.time()
  setup, lowered = lower_train_step(config, mesh, target)
  compiled = lowered.compile(slice_.compiler_options or None)
  facts = analyse(compiled, slice_.chip, train_flops_per_chip(config, setup, slice_.num_chips))
  facts["compile_seconds"] = time.time() - t0
  facts["remat"] = layers.resolve_remat(config.model.get("remat", "auto"), slice_.platform, slice_.device_kind)
  with layers.build_target(target):
    facts["attention"] = layers.resolve_attention(config.model.get("attention"))
    facts["patch_embedding"] = clip.resolve_patch_product()
    facts["one_pass_layer_norm"] = layers.resolve_one_pass_variance()
    facts["constrain_activations"] = trainer.constrain_activations(config, mesh)
  facts["mesh"] = dict(mesh.shape)
  facts["per_chip_batch"] = int(config.data.batch_size) / trainer.batch_devices(mesh, config.sharding_rules)
  report(f"compiled the training step in {facts['compile_seconds']:.0f}s")
  if with_eval:
    facts["eval"] = {}
    for name, low in lower_eval_steps(config, setup, mesh).items():
      facts["eval"][name] = analyse(low.compile(slice_.compiler_options or None), slice_.chip)
    report("compiled the evaluation encoders")
  return facts


def plan(config: Any, topology: str, *, search: bool = True, min_headroom: float = 0.15,
         hbm_bytes: int | None = None, with_eval: bool = True,
         report: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
  """The plan of `config` on the slice `topology`: facts of the recipe as given and, where it does not fit (or
  wastes the chip), the best alternative that fits with `min_headroom` of the HBM free. `hbm_bytes` plans
  against a smaller memory than the chip's (another job's share, a safety margin)."""
  config = trainer.as_config_dict(config)
  slice_ = targets.describe(topology)
  # A program compiled for devices this process cannot run on cannot be stored in (or read back from) JAX's
  # persistent compilation cache: it is left out of it while planning.
  from jax.experimental.compilation_cache import compilation_cache
  cache_was = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()  # JAX decides on the cache once per process: make it decide again, now and after
  try:
    return _plan(config, slice_, search=search, min_headroom=min_headroom, hbm_bytes=hbm_bytes,
                 with_eval=with_eval, report=report)
  finally:
    jax.config.update("jax_enable_compilation_cache", cache_was)
    compilation_cache.reset_cache()


def _plan(config, slice_, *, search, min_headroom, hbm_bytes, with_eval, report):
  topology = slice_.name
  if hbm_bytes:
    slice_ = dataclasses.replace(slice_, chip=dataclasses.replace(slice_.chip, hbm_bytes=int(hbm_bytes)))
  facts = compile_facts(config, slice_, with_eval=with_eval, report=report)
  result = {"topology": topology, "chip": slice_.chip.name, "device_kind": slice_.device_kind,
            "num_chips": slice_.num_chips, "num_hosts": slice_.num_hosts, "platform": slice_.platform,
            "compiler": slice_.compiler,
            "jax": jax.__version__, "global_batch": int(config.data.batch_size), **facts}
  if not search:
    return result
  candidates: list[Variant] = []
  if not _fits(facts, min_headroom):
    candidates = _memory_variants(config, slice_.num_chips)
  else:
    if _wastes(config, facts, slice_.platform) or int(config.get("grad_accum", 1)) > 1:
      candidates = _remat_variants(config)
    if int(config.get("grad_accum", 1)) > 1:
      candidates.append(Variant(("--config.grad_accum=1",)))
    candidates += _sharding_variants(facts)
    candidates += _batch_variants(config, facts)
  tried = []
  for variant in candidates:
    try:
      changed = variant.apply(config)
      alt = compile_facts(changed, slice_, report=report)
      alt["global_batch"] = int(changed.data.batch_size)
    except PlanError as e:
      report(f"{' '.join(variant.flags)}: {e}")
      continue
    tried.append({"flags": list(variant.flags), "fits": _fits(alt, min_headroom), "hbm": alt["hbm"],
                  "hbm_peak_bytes": alt["hbm_peak_bytes"], "headroom": alt["headroom"],
                  "step_seconds": alt["step_seconds"],
                  "global_batch": alt["global_batch"], "mfu": alt.get("mfu")})
    report(f"{' '.join(variant.flags)}: HBM {alt['hbm_peak_bytes'] / targets.GIB:.1f} GiB, step "
           + (f"{alt['step_seconds'] * 1e3:.0f} ms" if alt["step_seconds"] else "(no estimate)"))
    if not _fits(facts, min_headroom) and _fits(alt, min_headroom):
      break  # memory variants come cheapest first: the first that fits is the suggestion
  result["alternatives"] = tried
  fitting = [t for t in tried if t["fits"]]
  if facts["step_seconds"] is None:  # no time estimate (GPU): only a program that does not fit gets a suggestion,
    if fitting and not _fits(facts, min_headroom):  # the first alternative that fits (cheapest first)
      result["suggestion"] = fitting[0]["flags"]
  elif fitting:  # the fastest per clip (a variant with a larger batch takes longer per step, less per clip)
    best = min(fitting, key=_seconds_per_clip)
    if not _fits(facts, min_headroom) or _seconds_per_clip(best) < _seconds_per_clip(result) * 0.98:
      result["suggestion"] = best["flags"]
      if best["global_batch"] != result["global_batch"]:
        result["suggestion_note"] = (f"a global batch of {best['global_batch']} instead of {result['global_batch']}: "
                                     "faster per clip, but it changes the optimisation (retune the learning rate)")
  return result
