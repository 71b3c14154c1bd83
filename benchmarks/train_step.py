"""Training throughput on CPU: CLIP-ViP (ours, JAX) against transformers' PyTorch CLIPModel as CLIP4Clip meanP.

  nice python -m benchmarks.train_step [--variants B/32,B/16] [--batch B/32=4,B/16=2] [--repeats 3]

One step = forward of both towers on the same batch (T frames of HxW, text of n tokens), the symmetric NCE loss,
backward, global-norm clipping and AdamW, float32. Ours is the trainer's own jitted step (benchmarks/ours.py:
model_init -> optim -> step.make_train_step, compiled once ahead of time, donated buffers); the peer is
benchmarks/torch_peer.py. `--ours-variants` lists the rows of ours, each a '+'-joined set of options: "base" (the
repository's defaults), "scan_layers" (config.model.scan_layers=True), KEY=VALUE (config.model.KEY, e.g.
"remat=elementwise"), and at most one variant of benchmarks/experiments.py (e.g. "where_skip", the non-finite
guard as it was before lax.cond), so before and after sit in the same table. All run in this process with the
same number of threads (torch.set_num_threads = the cores XLA's CPU client uses, all usable cores), and their
steps are interleaved (ours, ours+scan_layers, peer, ours, ...) so that the load of a shared machine falls on all
alike; the figure is the median over `--repeats` steps after `--warmup` steps. Each variant (B/32, B/16) runs in
its own child process, and so does any run whose host allocator is not this process's: `--malloc auto` (the
default) is what the repository's commands run with (runtime/host_allocator.py: tcmalloc where installed, for
both sides), `system` glibc's malloc as the process started, `keep` glibc with common.MALLOC_KEEP. tcmalloc keeps
every freed block, and the models of a process take turns: on a 24 GiB machine a B/16 process fits one row of ours
and one peer under `auto` (two rows and the peer were killed for memory); run more rows as separate commands, or
with `--malloc system`.

Columns: clips/s = batch / median step time; "vs peer" = our clips/s over the peer's; step peak RSS = the rise of
the process's peak resident memory above what it held when the step started, in one extra untimed step per side
after the timed ones, with glibc returning freed blocks to the OS (common.memory_mode): activations, gradients and
temporaries (parameters and optimiser state were resident before; n/a under tcmalloc, which keeps freed
memory); XLA temp = the compiled step's temporary buffers (memory_analysis); FLOPs/clip: "XLA" = the compiled
step's cost_analysis / batch, "model" = the analytic count of train/model_flops.py (3 x forward matmuls), for
each side its own architecture.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks import common, experiments, ours as ours_lib
from clipvip_jax.train import model_flops

DEFAULT_BATCH = {"B/32": 4, "B/16": 2, "L/14": 1, "tiny": 4}
# Rows of the peer: float32, or its forward under torch.autocast("cpu", bfloat16) (parameters stay float32, as ours).
PEER_DTYPES = {"float32": "peer", "bfloat16": "peer+autocast=bfloat16"}
CONFIG_OPTIONS = ("scan_layers",)  # boolean config.model keys a row of --ours-variants may switch on
GOAL = 1.3
TINY = dict(frames=2, image_size=32, text_len=8,
            clip=dict(vision=dict(width=32, layers=1, heads=2, mlp_dim=64, patch_size=8, image_size=32),
                      text=dict(width=32, layers=1, heads=2, mlp_dim=64, max_len=16), projection_dim=16))


def parse_batch(spec: str) -> dict[str, int]:
  out = dict(DEFAULT_BATCH)
  for item in filter(None, spec.split(",")):
    if "=" not in item:
      raise ValueError(f"--batch entries look like B/32=4, got {item!r}")
    name, value = item.split("=", 1)
    out[name.strip()] = int(value)
  return out


def compile_counter() -> list[float]:
  """A list that grows by one entry per XLA compilation from now on (to show the timed steps compile nothing)."""
  import jax  # pylint: disable=import-outside-toplevel
  events: list[float] = []

  def listener(event: str, duration: float, **_: Any) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
      events.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  return events


def run_variant(variant: str, args: argparse.Namespace, compiles: list[float]) -> list[dict[str, Any]]:
  import jax  # pylint: disable=import-outside-toplevel
  from benchmarks.torch_peer import MeanPPeer  # pylint: disable=import-outside-toplevel
  from clipvip_jax.train import model_init  # pylint: disable=import-outside-toplevel

  batch_size = parse_batch(args.batch)[variant]
  frames, size, text_len = args.frames, args.image_size, args.text_len
  overrides = TINY["clip"] if args.tiny else {}
  if args.tiny:
    frames, size, text_len = TINY["frames"], TINY["image_size"], TINY["text_len"]
  section = ours_lib.model_section(variant, frames=frames, num_proxies=args.num_proxies,
                                   attention_pattern=args.attention_pattern, clip_overrides=overrides)
  cfg = model_init.model_config(section).clip
  batch = ours_lib.synthetic_batch(batch_size, frames, size, text_len, cfg.text.vocab_size, seed=0)

  ours, fns, device_batches = {}, {}, {}
  for name in filter(None, args.ours_variants.split(",")):
    options = [o for o in name.split("+") if o != "base"]
    config_options = {o: True for o in options if o in CONFIG_OPTIONS}
    config_options.update(dict(o.split("=", 1) for o in options if "=" in o))
    experiment = [o for o in options if o not in CONFIG_OPTIONS and "=" not in o]
    if len(experiment) > 1:
      raise ValueError(f"--ours-variants: one experiment per row, got {experiment} in {name!r}")
    impl = "+".join(["ours", *options])
    with experiments.variant(experiment[0] if experiment else "base"):  # same seed everywhere: same parameters
      ours[impl] = ours_lib.build({**section, **config_options}, batch, devices=jax.devices()[:1])
    device_batches[impl] = ours[impl].put(batch)
    fns[impl] = lambda impl=impl: ours[impl].step(device_batches[impl])
  peers = {}
  if not args.no_peer:
    for dtype in filter(None, args.peer_variants.split(",")):
      if dtype not in PEER_DTYPES:
        raise ValueError(f"--peer-variants takes {sorted(PEER_DTYPES)}, got {dtype!r}")
      name = PEER_DTYPES[dtype]
      peers[name] = MeanPPeer(cfg, foreach=args.peer_foreach, autocast_dtype=None if dtype == "float32" else dtype)
      torch_batch = peers[name].to_torch(batch)
      fns[name] = lambda p=peers[name], b=torch_batch: float(p.step(b))

  before = len(compiles)
  # Step 1 of each side (counted as warm-up): every variant of ours must give the same loss here.
  first_losses = {name: float(fn()) for name, fn in fns.items()}
  results = common.interleaved(fns, warmup=max(args.warmup - 1, 0), repeats=args.repeats, track_memory=False)
  dispatch = {}  # host seconds to launch one step (the call returns before the step has run)
  for impl, o in ours.items():
    t0 = time.perf_counter()
    loss = o.step(device_batches[impl])
    dispatch[impl] = time.perf_counter() - t0
    jax.block_until_ready(loss)
  recompiles = len(compiles) - before
  # Memory: one more, untimed step per side with freed blocks returned to the OS (see common.memory_mode).
  if common.memory_mode():
    peak_rise = {name: common.peak_rise_bytes(fn) for name, fn in fns.items()}
  else:
    peak_rise = {name: None for name in fns}

  ours_flops = model_flops.clipvip_step(cfg, frames=frames, text_len=text_len, num_proxies=args.num_proxies,
                                        batch=batch_size, pattern=args.attention_pattern).train
  peer_flops = model_flops.meanp_step(cfg, frames=frames, text_len=text_len, batch=batch_size).train
  rows: list[dict[str, Any]] = []
  for name, m in results.items():
    o = ours.get(name)
    peer = peers.get(name)
    xla_flops = o.cost_flops if o is not None else None
    rows.append({
        "variant": variant, "impl": name, "batch": batch_size, "frames": frames, "image_size": size,
        "text_len": text_len, "step_s": m.median, "spread": m.spread, "cpu_s": m.median_cpu,
        "clips_per_s": batch_size / m.median, "peak_rss_delta": peak_rise[name],
        "params": o.num_params if o is not None else peer.num_params,
        "flops_xla_per_clip": xla_flops / batch_size if xla_flops else None,
        "flops_model_per_clip": ours_flops if o is not None else peer_flops,
        "xla_temp_bytes": o.memory.temp_size_in_bytes if o is not None else None,
        "compile_s": o.compile_seconds if o is not None else None,
        "dispatch_s": dispatch.get(name), "recompiles": recompiles if o is not None else None,
        "first_loss": first_losses[name],
        "malloc": common.malloc_name(),
    })
  # Each row of ours against the peer of its compute dtype (bfloat16 rows against the autocast peer when it ran).
  rates = {r["impl"]: r["clips_per_s"] for r in rows if r["impl"] in peers}
  for r in rows:
    if r["impl"] in peers:
      continue
    reference = PEER_DTYPES["bfloat16"] if "dtype=bfloat16" in r["impl"] else PEER_DTYPES["float32"]
    reference = reference if reference in rates else next(iter(rates), None)
    if reference is not None:
      r["vs_peer"], r["peer"] = r["clips_per_s"] / rates[reference], reference
  del ours, peers, fns, device_batches
  gc.collect()
  return rows


def run_in_child(variant: str, argv: list[str], env: dict[str, str] | None = None) -> list[dict[str, Any]]:
  """This script for one variant in a child process (same arguments otherwise, environment `env`); its rows."""
  keep, skip = [], False
  for a in argv:  # drop --variants/--json (and their values) from the parent's arguments
    if skip:
      skip = False
      continue
    if a in ("--variants", "--json"):
      skip = True
      continue
    if a.startswith(("--variants=", "--json=")):
      continue
    keep.append(a)
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "rows.json")
    subprocess.run([sys.executable, "-m", "benchmarks.train_step", *keep, "--variants", variant, "--json", out],
                   check=True, stdout=subprocess.DEVNULL, env=env)
    with open(out, encoding="utf-8") as f:
      return json.load(f)


def format_rows(rows: list[dict[str, Any]]) -> str:
  header = ["variant", "impl", "batch", "step s (median)", "spread", "clips/s", "vs peer", "step peak RSS",
            "XLA temp", "params", "GFLOP/clip XLA", "GFLOP/clip model", "achieved GFLOP/s"]
  out = []
  for r in rows:
    g = lambda v: "n/a" if v is None else f"{v / 1e9:.1f}"
    out.append([r["variant"], r["impl"], r["batch"], f"{r['step_s']:.3f}", f"{100 * r['spread']:.0f}%",
                f"{r['clips_per_s']:.3f}", f"{r['vs_peer']:.2f}x" if r.get("vs_peer") else "",
                common.fmt_bytes(r["peak_rss_delta"]), common.fmt_bytes(r["xla_temp_bytes"]),
                f"{r['params'] / 1e6:.1f}M", g(r["flops_xla_per_clip"]), g(r["flops_model_per_clip"]),
                f"{r['flops_model_per_clip'] * r['clips_per_s'] / 1e9:.1f}"])
  return common.markdown_table(header, out)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variants", default="B/32,B/16", help="comma-separated CLIP variants")
  p.add_argument("--batch", default="", help="per-variant batch, e.g. B/32=4,B/16=2 (defaults: %s)" % DEFAULT_BATCH)
  p.add_argument("--frames", type=int, default=12)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--text-len", type=int, default=50)
  p.add_argument("--num-proxies", type=int, default=4)
  p.add_argument("--attention-pattern", default="block_sparse", choices=["block_sparse", "dense"])
  p.add_argument("--warmup", type=int, default=1, help="untimed steps per side after compilation (>= 1)")
  p.add_argument("--repeats", type=int, default=3, help="timed steps per side (interleaved)")
  p.add_argument("--threads", type=int, default=common.usable_cores(), help="torch threads (XLA uses all cores)")
  p.add_argument("--peer-foreach", action="store_true", help="torch AdamW(foreach=True) instead of its default")
  p.add_argument("--ours-variants", default="base,remat=none",
                 help="rows of ours: base (the configs' defaults: remat 'auto'), scan_layers (config.model."
                      "scan_layers), KEY=VALUE (config.model.KEY, e.g. remat=none, dtype=bfloat16) and/or "
                      "benchmarks/experiments.py variants, '+'-joined within a row (e.g. base,where_skip,remat=none)")
  p.add_argument("--malloc", default="auto", choices=list(common.MALLOC_CHOICES),
                 help="host allocator of the process (both sides): auto (the commands' own: tcmalloc where "
                      "installed), system (glibc's malloc as started), keep (glibc with common.MALLOC_KEEP); a "
                      "variant runs in a child process started with it where this process has another")
  p.add_argument("--peer-variants", default="float32",
                 help="rows of the peer: float32 and/or bfloat16 (torch.autocast on CPU); a row of ours with "
                      "dtype=bfloat16 is compared with the bfloat16 peer when it runs")
  p.add_argument("--no-peer", action="store_true")
  p.add_argument("--tiny", action="store_true", help="a 1-layer width-32 model on 2 frames of 32x32 (smoke test)")
  p.add_argument("--json", default="", help="also write the rows here")
  args = p.parse_args(argv)

  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(args.threads)
  compiles = compile_counter()
  for line in common.machine_lines(("torch", "transformers")):
    print(line)
  print(f"threads: XLA CPU client = {common.usable_cores()} (all usable cores), torch = {torch.get_num_threads()}")
  rows = []
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  malloc_env = common.malloc_env(args.malloc)  # None: this process already runs with that allocator
  for variant in variants:
    # A fresh process per variant: memory_mode() must not change the next one's timing; and an allocator is
    # chosen only at process start.
    if len(variants) > 1 or malloc_env is not None:
      new = run_in_child(variant, argv if argv is not None else sys.argv[1:], malloc_env)
    else:
      new = run_variant(variant, args, compiles)
    r = new[0]
    print(f"{variant}: batch {r['batch']}, {r['frames']} frames {r['image_size']}x{r['image_size']}, text "
          f"{r['text_len']}; host allocator {r['malloc']}; {r['recompiles']} compilations during the timed steps",
          flush=True)
    for r in new:
      if r["compile_s"] is not None:
        print(f"  {r['impl']}: compiled in {r['compile_s']:.1f}s, dispatch {1000 * r['dispatch_s']:.1f} ms/step, "
              f"first-step loss {r['first_loss']:.6f}", flush=True)
    rows += new
  print(format_rows(rows))
  for r in rows:
    if r.get("vs_peer"):
      verdict = "met" if r["vs_peer"] >= GOAL else "not met"
      print(f"{r['variant']}: {r['impl']} / {r['peer']} = {r['vs_peer']:.2f}x (goal {GOAL}x: {verdict})")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=2)
  return rows


if __name__ == "__main__":
  main()
  sys.exit(0)
