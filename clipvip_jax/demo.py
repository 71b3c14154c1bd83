"""The main job on the embedded default: CLIP-ViP vs. a meanP baseline on the synthetic twin-clip set, on CPU.

  python -m clipvip_jax.demo [--out demo_out] [--steps N] [--clips N] [--seed S] [--force]

1. Generates the synthetic video-text set (data_pipelines.synthetic) into OUT/data when it is missing.
2. Trains a small CLIP-ViP from scratch (the recipe clipvip_jax/recipes/demo.py, also configs/demo.py:clipvip) and
   the same-size meanP baseline (configs/demo.py:meanp: frame mean pooling, no temporal modelling) with the same
   data, optimiser and steps.
   Each keeps its best checkpoint by validation t2v R@1.
3. Evaluates both best checkpoints on the held-out test split and prints the table (t2v and v2t R@1/5/10, MdR,
   MnR), writes OUT/results.json, TensorBoard logs (OUT/<model>/tensorboard) and OUT/training_curves.png.
4. Encodes the test clips with the CLIP-ViP checkpoint (python -m clipvip_jax.encode -> OUT/index) and searches
   the index with every test caption (clipvip_jax.search): how often each caption finds its own clip; ends with
   the command that opens the index in the search page (python -m clipvip_jax.serve).

Every synthetic clip has a time-reversed twin whose caption differs only in the motion words, so a model that
ignores frame order can at best guess between the twins: meanP tops out near half of the pairs, CLIP-ViP can not.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from typing import Any, Sequence

from clipvip_jax import kinds

# The model and its baseline, with the names tables use (kinds.Kind.title).
MODELS = tuple((kind, kinds.get(kind).title) for kind in ("clipvip", "meanp"))
METRICS = ("R@1", "R@5", "R@10", "MdR", "MnR")
DEFAULT_CLIPS = 3000
DATA_SEED = 0


def _load_demo_config(kind: str):
  """(config, recipe module) of the demo's recipe, from the package (clipvip_jax/recipes/demo.py), so an
  installed copy runs without a checkout."""
  from clipvip_jax.recipes import demo as recipe
  return recipe.get_config(kind), recipe


def _ensure_data(data_dir: pathlib.Path, clips: int, frames: int, size: int) -> None:
  from data_pipelines import manifest, synthetic
  if (data_dir / manifest.MANIFEST_NAME).exists():
    made = manifest.read_manifest(str(data_dir))
    opts = made.get("options", {})
    if (opts.get("clips"), opts.get("frames"), opts.get("size"), opts.get("seed")) == (clips, frames, size, DATA_SEED):
      print(f"synthetic data: reusing {data_dir}")
      return
  print(f"synthetic data: generating {clips} clips ({frames} frames of {size}x{size}) into {data_dir}")
  t0 = time.time()
  synthetic.generate(str(data_dir), clips, DATA_SEED, frames=frames, size=size)
  print(f"synthetic data: done in {time.time() - t0:.0f} s")


def format_table(results: dict[str, dict[str, float]]) -> str:
  """Markdown table: one row per model, t2v and v2t metrics."""
  head = ["model"] + [f"t2v {m}" for m in METRICS] + [f"v2t {m}" for m in METRICS]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, r in results.items():
    cells = [name] + [f"{r[f'{d}/{m}']:.1f}" for d in ("t2v", "v2t") for m in METRICS]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _read_curves(workdir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
  curves: dict[str, dict[int, float]] = {}
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return {}
  for line in path.read_text().splitlines():
    row = json.loads(line)
    for key in ("train/loss", "val/t2v/R@1"):
      if key in row:
        curves.setdefault(key, {})[row["step"]] = row[key]  # a resumed run's repeated steps: keep the last
  return {k: sorted(v.items()) for k, v in curves.items()}


def plot_curves(out: pathlib.Path, workdirs: dict[str, pathlib.Path]) -> pathlib.Path:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax_loss, ax_r1) = plt.subplots(1, 2, figsize=(10, 3.8))
  for name, workdir in workdirs.items():
    curves = _read_curves(workdir)
    if "train/loss" in curves:
      steps, values = zip(*curves["train/loss"])
      ax_loss.plot(steps, values, label=name)
    if "val/t2v/R@1" in curves:
      steps, values = zip(*curves["val/t2v/R@1"])
      ax_r1.plot(steps, values, marker="o", label=name)
  ax_loss.set(title="training loss (NCE, both directions)", xlabel="step", yscale="log")
  ax_r1.set(title="validation text-to-video R@1 (%)", xlabel="step", ylim=(0, 100))
  for ax in (ax_loss, ax_r1):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  path = out / "training_curves.png"
  tmp = path.with_suffix(".tmp.png")
  fig.savefig(tmp, dpi=110)
  os.replace(tmp, path)
  plt.close(fig)
  return path


def search_check(index_dir: pathlib.Path, workdir: pathlib.Path, data_dir: pathlib.Path,
                 top_k: int = 5) -> dict[str, Any]:
  """The encode and search commands on the demo's own checkpoint: every test caption is a query; the share of
  queries whose own clip comes first / in the top k, and one example ranking."""
  from clipvip_jax import encode
  from clipvip_jax.retrieval import index as index_lib
  from clipvip_jax.retrieval import search

  which = "best" if (workdir / "best.json").exists() else "latest"
  code = encode.main(["--checkpoint", str(workdir), "--step", which, "--shards", str(data_dir), "--split", "test",
                      "--out", str(index_dir), "--force", "--quiet"])
  if code:
    raise SystemExit(f"stopped: encoding the test split with {workdir} failed (exit {code})")
  index = index_lib.read_index(index_dir)
  queries, truth = [], []
  for row in range(index.count):
    clip_id = index.id(row)
    for caption in index.captions(row):
      queries.append(caption)
      truth.append(clip_id)
  rankings = search.rank(search.load_index_model(index), index, queries, top_k)  # the index read once
  first = sum(ranking[0][0] == clip_id for ranking, clip_id in zip(rankings, truth))
  in_top = sum(clip_id in [hit for hit, _ in ranking] for ranking, clip_id in zip(rankings, truth))
  return {"queries": len(queries), "top1": 100.0 * first / len(queries), f"top{top_k}": 100.0 * in_top / len(queries),
          "example": {"query": queries[0], "truth": truth[0], "ranking": [list(hit) for hit in rankings[0]]}}


def run(out: pathlib.Path, steps: int | None = None, clips: int = DEFAULT_CLIPS, force: bool = False,
        seed: int = 0) -> dict:
  from clipvip_jax.train import cli as train_cli
  from clipvip_jax.train import trainer

  out.mkdir(parents=True, exist_ok=True)
  data_dir = out / "data"
  _, config_module = _load_demo_config("clipvip")
  _ensure_data(data_dir, clips, frames=8, size=config_module.IMAGE_SIZE)

  results, workdirs, timings = {}, {}, {}
  for kind, name in MODELS:
    config, _ = _load_demo_config(kind)
    config.data.shard_dir = str(data_dir)
    config.seed = config.data.seed = seed  # initialisation and data order; the synthetic set is fixed (DATA_SEED)
    if steps:
      config.total_steps = steps
      config.eval.every = max(steps // 3, 1)
    workdir = out / kind
    if force and workdir.exists():
      import shutil
      shutil.rmtree(workdir)
    workdirs[name] = workdir
    print(f"\n== training {name} ({config.total_steps} steps) -> {workdir}")
    t0 = time.time()
    summary = trainer.train(config, workdir)
    timings[name] = time.time() - t0
    if summary["preempted"]:
      raise SystemExit(f"stopped: {name} was interrupted at step {summary['step']} (checkpoint saved); "
                       f"run the demo again to resume")
    which = "best" if (workdir / "best.json").exists() else "latest"
    test = train_cli.evaluate_checkpoint(config, str(workdir), "test", which=which)
    results[name] = {k: float(v) for k, v in test.items() if k.startswith(("t2v/", "v2t/", "dsl_"))}
    print(f"{name}: test t2v R@1 {results[name]['t2v/R@1']:.1f} (checkpoint: {which}, "
          f"step {test.get('step')}), {timings[name]:.0f} s")

  table = format_table(results)
  vip, base = results[MODELS[0][1]]["t2v/R@1"], results[MODELS[1][1]]["t2v/R@1"]
  summary = {
      "table": table,
      "results": results,
      "train_seconds": timings,
      "clipvip_over_meanp_t2v_r1": (vip / base) if base else None,
      "seed": seed,
      "data": str(data_dir),
      "workdirs": {k: str(v) for k, v in workdirs.items()},
  }
  curves = plot_curves(out, workdirs)
  print(f"\n== encode + search: the test clips with the CLIP-ViP checkpoint -> {out / 'index'}")
  summary["search"] = search_check(out / "index", workdirs[MODELS[0][1]], data_dir)
  tmp = out / "results.json.tmp"
  tmp.write_text(json.dumps(summary, indent=2) + "\n")
  os.replace(tmp, out / "results.json")
  print("\nHeld-out synthetic test split (every caption has exactly one correct clip; twins differ only in motion):\n")
  print(table)
  ratio = f"{vip / base:.2f}x" if base else "n/a"
  print(f"\nCLIP-ViP / meanP t2v R@1: {ratio}")
  found, example = summary["search"], summary["search"]["example"]
  print(f"search (python -m clipvip_jax.search --index {out / 'index'} \"QUERY\"): each of the {found['queries']} test "
        f"captions finds its own clip first for {found['top1']:.1f}% and in the top 5 for {found['top5']:.1f}%; e.g.\n"
        f"  \"{example['query']}\" ({example['truth']}) -> " +
        ", ".join(f"{clip_id} {score:.3f}" for clip_id, score in example["ranking"][:3]))
  print(f"results: {out / 'results.json'}  curves: {curves}  TensorBoard: tensorboard --logdir {out}")
  print(f"\nLook at the clips: python -m clipvip_jax.serve --index {out / 'index'}   then open http://127.0.0.1:8000/")
  return summary


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m clipvip_jax.demo", description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="demo_out", help="output folder (data, runs, results.json, curves)")
  parser.add_argument("--steps", type=int, default=None, help="training steps per model (default: configs/demo.py)")
  parser.add_argument("--clips", type=int, default=DEFAULT_CLIPS, help="synthetic clips to generate (even)")
  parser.add_argument("--force", action="store_true", help="retrain from scratch instead of resuming")
  parser.add_argument("--seed", type=int, default=0,
                      help="training seed of both models: initialisation and data order (default 0)")
  args = parser.parse_args(argv)
  from clipvip_jax.runtime.cli_errors import quiet_library_logs
  quiet_library_logs()  # Orbax's routine absl warnings (e.g. reading a checkpoint item) are not for the user
  if args.steps is not None and args.steps < 1:
    parser.error("--steps must be >= 1")
  if args.clips < 20 or args.clips % 2:
    parser.error("--clips must be an even number >= 20")
  run(pathlib.Path(args.out), args.steps, args.clips, args.force, args.seed)
  return 0


if __name__ == "__main__":
  from clipvip_jax.runtime import host_allocator
  host_allocator.use_preferred()  # tcmalloc where installed: may re-execute this process, once
  sys.exit(main())
