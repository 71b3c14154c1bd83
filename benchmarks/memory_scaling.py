"""Per-device training memory of CLIP-ViP at scale, from XLA's compiled memory statistics on simulated devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 nice python -m benchmarks.memory_scaling
  (the script sets that flag itself when jax has not been imported yet)

Part 1, compiled. For each model (B/16, L/14: 12 frames of 224x224, text length 70, 4 proxies, bfloat16 compute
with float32 parameters) x parameter layout (data: parameters and optimiser state replicated on every device;
fsdp: split over the 8 devices along their "embed" axis; fsdp_constrained: fsdp plus the batch-sharding
constraint on the residual stream, config.constrain_activations) x remat (none: every block's activations kept for
the backward pass; full: only each block's input kept, the block recomputed) the trainer's own train step
(step.make_train_step with explicit shardings and donated parameters/optimiser state) is lowered with abstract
inputs (jax.ShapeDtypeStruct carrying shardings: nothing of the model is ever allocated) and compiled for the 8
simulated CPU devices; `compiled.memory_analysis()` gives the per-device program's bytes:
  params, optimiser   the per-device shards of the arguments (computed from the shardings)
  temp                XLA's temporary buffers: activations saved for the backward pass, gradients, workspace
  peak                arguments + temp + outputs not aliased to donated arguments
Two per-device batches (1 and 2 by default) give peak(b) = fixed + b * per_clip; the largest per-device batch
under a capacity C is floor((C - fixed) / per_clip). Extra: the contrastive loss alone at a global batch of 1024
and 16384 on these devices (benchmarks/loss_memory.py; run that script for 256 simulated devices).

Caveat: this is XLA:CPU's buffer assignment and schedule. In particular XLA:CPU does not turn remat into
savings (a toy stack of checkpointed blocks compiles to +17% FLOPs and the same temp bytes, whatever
xla_cpu_scheduler_type), so the compiled "full" rows are not what a TPU/GPU compiler would give.

Part 2, backend-independent: the activations autodiff keeps between the forward and the backward pass under each
remat policy, per clip, as the residuals of jax.vjp of the loss (shapes only, jax.eval_shape), from per-device
batches 1 and 2 on one device. With `fixed` = 16 bytes per parameter per device (float32 parameters, gradients,
Adam m and v; divided by the device count under FSDP) the largest per-device batch under C is
floor((C - fixed) / (saved per clip + working set)), the working set being one block's activations (the block
the backward pass recomputes under remat). A compiler adds workspace on top, so these batches are upper bounds.
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from benchmarks import common, loss_memory, ours as ours_lib  # noqa: E402
from clipvip_jax.train import model_init, optim, sharding  # noqa: E402
from clipvip_jax.train import step as step_lib  # noqa: E402

GiB = 2**30
CAPACITIES_GB = (16, 80)
DATA_RULES = tuple((k, None) if k == "embed" else (k, v) for k, v in sharding.DEFAULT_RULES)
LAYOUTS = {
    # mesh (data, fsdp, tensor), rules, config.constrain_activations: "batch" is split over all devices in every
    # layout; FSDP also splits every "embed" axis.
    "data": ((-1, 1, 1), DATA_RULES, False),
    "fsdp": ((1, -1, 1), sharding.DEFAULT_RULES, False),
    "fsdp_constrained": ((1, -1, 1), sharding.DEFAULT_RULES, True),
}
REMAT_FOR_ESTIMATE = ("none", "elementwise", "dots_no_batch", "dots", "full")
TINY_CLIP = dict(vision=dict(width=64, layers=2, heads=4, mlp_dim=128, patch_size=8, image_size=32),
                 text=dict(width=64, layers=2, heads=4, mlp_dim=128, max_len=16), projection_dim=32)


def _shard_bytes(x: Any, sh: NamedSharding) -> int:
  return int(np.prod(sh.shard_shape(tuple(x.shape)))) * jnp.dtype(x.dtype).itemsize


def _tree_shard_bytes(tree: Any, shardings: Any) -> int:
  return sum(_shard_bytes(x, s) for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def abstract_step(model: dict[str, Any], layout: str, per_device_batch: int, *, frames: int, image_size: int,
                  text_len: int, input_dtype: str) -> dict[str, Any]:
  """Compiles the trainer's step for abstract sharded inputs; returns the per-device memory figures."""
  mesh_shape, rules, constrain = LAYOUTS[layout]
  mesh = sharding.make_mesh(mesh_shape)
  kind = model["kind"]
  cfg = model_init.model_config(ml_collections.ConfigDict(model))
  graphdef, rest, shardings = model_init.param_shardings(kind, cfg, mesh, rules)
  _, abstract_params, _ = nnx.split(model_init.abstract_model(kind, cfg), nnx.Param, ...)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nnx.to_pure_dict(abstract_params), shardings)
  tx, _, param_rules = optim.make_optimizer(ml_collections.ConfigDict(ours_lib.OPTIM), params, 1000)
  opt_abstract = jax.eval_shape(tx.init, params)
  opt_shardings = step_lib.opt_state_shardings(opt_abstract, params, shardings, mesh)
  opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt_abstract,
                           opt_shardings)
  batch_sharding = sharding.batch_sharding(mesh, rules, 1)
  n = per_device_batch * mesh.size
  vc = cfg.clip.vision
  batch = {"video": jax.ShapeDtypeStruct((n, frames, image_size, image_size, vc.channels), jnp.dtype(input_dtype),
                                         sharding=batch_sharding),
           "frame_mask": jax.ShapeDtypeStruct((n, frames), jnp.int32, sharding=batch_sharding),
           "text_ids": jax.ShapeDtypeStruct((n, text_len), jnp.int32, sharding=batch_sharding),
           "text_mask": jax.ShapeDtypeStruct((n, text_len), jnp.int32, sharding=batch_sharding)}
  train_step = step_lib.make_train_step(graphdef, rest, step_lib.make_objective("nce"), tx, param_rules,
                                        param_shardings=shardings, opt_shardings=opt_shardings,
                                        batch_sharding=batch_sharding,
                                        constrain_activations=(sharding.activation_constraint(mesh, rules)
                                                               if constrain else None))
  t0 = time.perf_counter()
  compiled = train_step.fn.lower(params, opt_state, batch).compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  args = mem.argument_size_in_bytes
  peak = args + mem.temp_size_in_bytes + max(mem.output_size_in_bytes - mem.alias_size_in_bytes, 0)
  return {"params": _tree_shard_bytes(params, shardings), "optimizer": _tree_shard_bytes(opt_state, opt_shardings),
          "arguments": args, "temp": mem.temp_size_in_bytes, "output": mem.output_size_in_bytes,
          "alias": mem.alias_size_in_bytes, "peak": peak, "compile_s": seconds,
          "num_params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))}


def saved_activation_bytes(model: dict[str, Any], batch_size: int, *, frames: int, image_size: int,
                           text_len: int, input_dtype: str) -> int:
  """Bytes of the residuals jax.vjp keeps for the backward pass of the training loss (parameters included)."""
  kind = model["kind"]
  cfg = model_init.model_config(ml_collections.ConfigDict(model))
  graphdef, params, rest = nnx.split(model_init.abstract_model(kind, cfg), nnx.Param, ...)
  params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  objective = step_lib.make_objective("nce")
  batch = {"video": jax.ShapeDtypeStruct((batch_size, frames, image_size, image_size, cfg.clip.vision.channels),
                                         jnp.dtype(input_dtype)),
           "frame_mask": jax.ShapeDtypeStruct((batch_size, frames), jnp.int32),
           "text_ids": jax.ShapeDtypeStruct((batch_size, text_len), jnp.int32),
           "text_mask": jax.ShapeDtypeStruct((batch_size, text_len), jnp.int32)}

  def loss(p, b):
    model_ = nnx.merge(graphdef, p, rest)
    return objective.loss(model_, objective.features(model_, b))[0]

  residuals = jax.eval_shape(lambda p, b: jax.tree.leaves(jax.vjp(lambda q: loss(q, b), p)[1]), params, batch)
  return sum(int(np.prod(r.shape)) * jnp.dtype(r.dtype).itemsize for r in residuals)


def activation_estimates(name: str, overrides: dict, args: argparse.Namespace, frames: int, size: int,
                         text_len: int) -> list[dict[str, Any]]:
  """Saved activations per clip under each remat policy, and the batches they allow (module docstring, part 2)."""
  rows = []
  per_clip = {}
  for remat in REMAT_FOR_ESTIMATE:
    model = ours_lib.model_section(name, frames=frames, num_proxies=args.num_proxies, dtype=args.dtype,
                                   remat=remat, clip_overrides=overrides)
    b1, b2 = (saved_activation_bytes(model, b, frames=frames, image_size=size, text_len=text_len,
                                     input_dtype=args.input_dtype) for b in (1, 2))
    per_clip[remat] = b2 - b1
  cfg = model_init.model_config(ml_collections.ConfigDict(ours_lib.model_section(name, clip_overrides=overrides)))
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      nnx.state(model_init.abstract_model("clipvip", cfg), nnx.Param)))
  one_block = per_clip["none"] / cfg.clip.vision.layers  # the recomputed block's activations (vision dominates)
  for remat, saved in per_clip.items():
    working = 0.0 if remat in ("none", "elementwise") else one_block  # no block is recomputed
    row = {"model": name, "remat": remat, "num_params": num_params, "saved_per_clip": saved,
           "working_per_clip": working}
    for devices in (1, 8, 256):
      fixed = 16.0 * num_params / devices
      for c in CAPACITIES_GB:
        row[f"max_batch_{c}gb_fsdp{devices}"] = largest_batch(fixed, saved + working, c * 1e9)
    rows.append(row)
  return rows


def largest_batch(fixed: float, per_clip: float, capacity_bytes: float) -> int:
  if per_clip <= 0:
    return 0
  return max(int(math.floor((capacity_bytes - fixed) / per_clip)), 0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="B/16,L/14")
  p.add_argument("--layouts", default="data,fsdp,fsdp_constrained")
  p.add_argument("--remat", default="none,full", help="remat policies (layers.REMAT_POLICIES)")
  p.add_argument("--per-device-batches", default="1,2", help="two per-device batches for the linear fit")
  p.add_argument("--frames", type=int, default=12)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--text-len", type=int, default=70)
  p.add_argument("--num-proxies", type=int, default=4)
  p.add_argument("--dtype", default="bfloat16", help="compute dtype (parameters stay float32)")
  p.add_argument("--input-dtype", default="bfloat16", help="video dtype as the Grain pipeline delivers it")
  p.add_argument("--loss-batches", default="1024,16384", help="global batches for the loss-only figure")
  p.add_argument("--no-compile", action="store_true", help="part 2 (activation estimates) only")
  p.add_argument("--tiny", action="store_true", help="a 2-layer width-64 model on 2 frames of 32x32 (smoke test)")
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  if jax.device_count() < 2:
    raise RuntimeError("memory_scaling needs simulated devices: run with "
                       "XLA_FLAGS=--xla_force_host_platform_device_count=8 (set before jax is imported)")
  frames, size, text_len = args.frames, args.image_size, args.text_len
  overrides = {}
  if args.tiny:
    frames, size, text_len, overrides = 2, 32, 8, TINY_CLIP
  batches = [int(b) for b in args.per_device_batches.split(",")]
  if len(batches) != 2 or batches[0] == batches[1]:
    raise ValueError(f"--per-device-batches needs two different values, got {args.per_device_batches!r}")

  for line in common.machine_lines():
    print(line)
  print(f"{jax.device_count()} simulated devices; {frames} frames of {size}x{size}, text {text_len}, "
        f"{args.num_proxies} proxies, compute {args.dtype}, parameters float32, video input {args.input_dtype}")
  rows = []
  for name in filter(None, args.models.split(",") if not args.no_compile else []):
    for layout in filter(None, args.layouts.split(",")):
      for remat in filter(None, args.remat.split(",")):
        model = ours_lib.model_section(name, frames=frames, num_proxies=args.num_proxies, dtype=args.dtype,
                                       remat=remat, clip_overrides=overrides)
        points = [abstract_step(model, layout, b, frames=frames, image_size=size, text_len=text_len,
                                input_dtype=args.input_dtype) for b in batches]
        per_clip = (points[1]["peak"] - points[0]["peak"]) / (batches[1] - batches[0])
        fixed = points[0]["peak"] - per_clip * batches[0]
        row = {"model": name, "layout": layout, "remat": remat, "num_params": points[0]["num_params"],
               "params": points[0]["params"], "optimizer": points[0]["optimizer"],
               "temp_b1": points[0]["temp"], "peak_b1": points[0]["peak"], "fixed": fixed, "per_clip": per_clip,
               "compile_s": sum(pt["compile_s"] for pt in points), "points": points,
               **{f"max_batch_{c}gb": largest_batch(fixed, per_clip, c * 1e9) for c in CAPACITIES_GB}}
        rows.append(row)
        print(f"  {name} {layout} remat={remat}: compiled 2 batches in {row['compile_s']:.0f}s", flush=True)
  header = ["model", "layout", "remat", f"per-device batch {batches[0]}: params", "optimiser",
            "temp (activations, grads)", "peak", "fixed", "per clip",
            *[f"max batch/device {c} GB" for c in CAPACITIES_GB]]
  table = [[r["model"], r["layout"], r["remat"], common.fmt_bytes(r["params"]), common.fmt_bytes(r["optimizer"]),
            common.fmt_bytes(r["temp_b1"]), common.fmt_bytes(r["peak_b1"]), common.fmt_bytes(r["fixed"]),
            common.fmt_bytes(r["per_clip"]), *[r[f"max_batch_{c}gb"] for c in CAPACITIES_GB]] for r in rows]
  if rows:
    print(common.markdown_table(header, table))

  estimates = []
  for name in filter(None, args.models.split(",")):
    estimates += activation_estimates(name, overrides, args, frames, size, text_len)
  print("saved activations per clip (jax.vjp residuals) and upper bounds on the per-device batch "
        "(16 bytes/parameter / devices + per clip x batch <= capacity):")
  caps = [(d, c) for d in (1, 8, 256) for c in CAPACITIES_GB]
  print(common.markdown_table(
      ["model", "remat", "saved per clip", "+ working set", *[f"{c} GB, {'replicated' if d == 1 else f'FSDP/{d}'}"
                                                              for d, c in caps]],
      [[e["model"], e["remat"], common.fmt_bytes(e["saved_per_clip"]), common.fmt_bytes(e["working_per_clip"]),
        *[e[f"max_batch_{c}gb_fsdp{d}"] for d, c in caps]] for e in estimates]))

  loss_rows = []
  dim = model_init.model_config(ml_collections.ConfigDict(
      ours_lib.model_section(args.models.split(",")[0], clip_overrides=overrides))).clip.projection_dim
  for g in filter(None, args.loss_batches.split(",")):
    loss_rows.append(loss_memory.loss_memory(int(g), dim))
  if loss_rows:
    print(loss_memory.table(loss_rows))
  result = {"rows": rows, "estimates": estimates, "loss": loss_rows}
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2, default=float)
  return result


if __name__ == "__main__":
  main()
