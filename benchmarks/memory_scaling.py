"""Per-device training memory of CLIP-ViP at scale, from XLA's compiled memory statistics on simulated devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 nice python -m benchmarks.memory_scaling
  (the script sets that flag itself when jax has not been imported yet)

For each model (B/16, L/14: 12 frames of 224x224, text length 70, 4 proxies, bfloat16 compute with float32
parameters) x parameter layout (data-only: parameters and optimiser state replicated on every device; FSDP:
split over the 8 devices along their "embed" axis) x remat (none: every block's activations kept for the
backward pass; full: only each block's input kept, the block recomputed) the trainer's own train step
(step.make_train_step with explicit shardings and donated parameters/optimiser state) is lowered with abstract
inputs (jax.ShapeDtypeStruct carrying shardings: nothing of the model is ever allocated) and compiled for the 8
simulated CPU devices; `compiled.memory_analysis()` gives the per-device program's bytes:
  params, optimiser   the per-device shards of the arguments (computed from the shardings)
  temp                XLA's temporary buffers: activations saved for the backward pass, gradients, workspace
  peak                arguments + temp + outputs not aliased to donated arguments
Two per-device batches (1 and 2 by default) give peak(b) = fixed + b * per_clip; the largest per-device batch
under a capacity C is floor((C - fixed) / per_clip). Extra: the contrastive loss alone (jit, features sharded on
the batch axis, the compiler inserts the all-gather) at a global batch of 1024 and 16384, to show what the
global-batch logits cost per device.

Caveat: this is XLA:CPU's buffer assignment and schedule. TPU/GPU compilers schedule differently (and the CPU
backend may widen some bfloat16 operations to float32), so read the figures as estimates of the right order.
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
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from benchmarks import common, ours as ours_lib  # noqa: E402
from clipvip_jax import losses  # noqa: E402
from clipvip_jax.train import model_init, optim, sharding  # noqa: E402
from clipvip_jax.train import step as step_lib  # noqa: E402

GiB = 2**30
CAPACITIES_GB = (16, 80)
LAYOUTS = {
    # mesh (data, fsdp, tensor), rules: "batch" is split 8 ways in both; FSDP also splits every "embed" axis.
    "data": ((-1, 1, 1), tuple((k, None) if k == "embed" else (k, v) for k, v in sharding.DEFAULT_RULES)),
    "fsdp": ((1, -1, 1), sharding.DEFAULT_RULES),
}
TINY_CLIP = dict(vision=dict(width=64, layers=2, heads=4, mlp_dim=128, patch_size=8, image_size=32),
                 text=dict(width=64, layers=2, heads=4, mlp_dim=128, max_len=16), projection_dim=32)


def _shard_bytes(x: Any, sh: NamedSharding) -> int:
  return int(np.prod(sh.shard_shape(tuple(x.shape)))) * jnp.dtype(x.dtype).itemsize


def _tree_shard_bytes(tree: Any, shardings: Any) -> int:
  return sum(_shard_bytes(x, s) for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def abstract_step(model: dict[str, Any], layout: str, per_device_batch: int, *, frames: int, image_size: int,
                  text_len: int, input_dtype: str) -> dict[str, Any]:
  """Compiles the trainer's step for abstract sharded inputs; returns the per-device memory figures."""
  mesh_shape, rules = LAYOUTS[layout]
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
                                        batch_sharding=batch_sharding)
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


def largest_batch(fixed: float, per_clip: float, capacity_bytes: float) -> int:
  if per_clip <= 0:
    return 0
  return max(int(math.floor((capacity_bytes - fixed) / per_clip)), 0)


def loss_memory(global_batch: int, dim: int) -> dict[str, float]:
  """Per-device bytes of the NCE loss and its gradient at `global_batch`, features split over all devices."""
  mesh = sharding.make_mesh((-1, 1, 1))
  sh = NamedSharding(mesh, P(("data", "fsdp")))
  feats = jax.ShapeDtypeStruct((global_batch, dim), jnp.float32, sharding=sh)
  scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
  fn = jax.jit(jax.value_and_grad(losses.nce_loss, argnums=(0, 1, 2)))
  mem = fn.lower(feats, feats, scale).compile().memory_analysis()
  return {"global_batch": global_batch, "temp": mem.temp_size_in_bytes,
          "logits_bytes": 4.0 * global_batch * global_batch}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="B/16,L/14")
  p.add_argument("--layouts", default="data,fsdp")
  p.add_argument("--remat", default="none,full", help="remat policies (layers.REMAT_POLICIES)")
  p.add_argument("--per-device-batches", default="1,2", help="two per-device batches for the linear fit")
  p.add_argument("--frames", type=int, default=12)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--text-len", type=int, default=70)
  p.add_argument("--num-proxies", type=int, default=4)
  p.add_argument("--dtype", default="bfloat16", help="compute dtype (parameters stay float32)")
  p.add_argument("--input-dtype", default="bfloat16", help="video dtype as the Grain pipeline delivers it")
  p.add_argument("--loss-batches", default="1024,16384", help="global batches for the loss-only figure")
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
  for name in filter(None, args.models.split(",")):
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
  print(common.markdown_table(header, table))

  loss_rows = []
  dim = model_init.model_config(ml_collections.ConfigDict(
      ours_lib.model_section(args.models.split(",")[0], clip_overrides=overrides))).clip.projection_dim
  for g in filter(None, args.loss_batches.split(",")):
    loss_rows.append(loss_memory(int(g), dim))
  if loss_rows:
    print(common.markdown_table(
        ["global batch", f"NCE loss + grad temp per device ({jax.device_count()} devices)", "one full B x B f32 logits"],
        [[r["global_batch"], common.fmt_bytes(r["temp"]), common.fmt_bytes(r["logits_bytes"])] for r in loss_rows]))
  result = {"rows": rows, "loss": loss_rows}
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2, default=float)
  return result


if __name__ == "__main__":
  main()
