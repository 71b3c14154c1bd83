"""Exported encoders on CPU: onnxruntime and a reloaded StableHLO artifact against our JAX encode, in one run.

    nice python -m benchmarks.export_runtime --kind clipvip --variant B/32 --frames 12 --repeats 5

One random-weight model (CLIP-ViP with 4 proxies and T = --frames, CLIP2Video, or an image CLIP, which encodes
videos as meanP) is written as a converted checkpoint into --work and exported in both formats by the command
itself (python -m clipvip_jax.export, one process each: its time and peak memory are printed), then each tower is
timed three ways, interleaved (A B C A B C ...) after a warm-up so that the shared machine's load hits all alike:
  jax           the checkpoint's own jitted encode_text / encode_video (retrieval.pretrained, what encode and
                search run), the uint8 frames normalised inside the same jit as the exported graph does
  onnxruntime   clipvip_jax.export.runtime on the ONNX graphs (CPUExecutionProvider, default threads)
  stablehlo     the same runtime on jax.export's artifact, deserialized and called (no model code)
Text: batches of --text-batches token rows of the recipe's length; video: batches of --video-batches clips of
uint8 frames. Figures: the median call's latency and items (texts or clips) per second, and each runtime's max
abs difference from jax on those inputs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import interleaved, machine_lines, markdown_table


def _checkpoint(kind: str, variant: str, frames: int, path: pathlib.Path) -> pathlib.Path:
  """A converted checkpoint of `kind` around the CLIP `variant`, weights drawn N(0, 0.02) (gains 1, biases 0)."""
  from clipvip_jax import converted_checkpoint, kinds
  from clipvip_jax.convert.common import Converted
  from clipvip_jax.models import clip, clip2video, clipvip
  base = clip.clip_config(variant)
  cfg = {"clip": base, "clipvip": clipvip.CLIPViPConfig(clip=base, num_proxies=4, temporal_size=frames),
         "clip2video": clip2video.CLIP2VideoConfig.for_clip(base, center_k=5, temporal_layers=4,
                                                            num_frames=frames)}[kind]
  rng = np.random.default_rng(0)
  params = {k: (np.ones(s, np.float32) if k.endswith("/scale") else np.zeros(s, np.float32) if k.endswith("/bias")
                else rng.normal(0, 0.02, s).astype(np.float32)) for k, s in kinds.param_shapes(kind, cfg).items()}
  return converted_checkpoint.save_converted(Converted(kind, cfg, params, source="random"), path, force=True)


def _export(checkpoint: pathlib.Path, fmt: str, frames: int, out: pathlib.Path) -> str:
  """python -m clipvip_jax.export in a child process; its wall time and the children's peak RSS so far."""
  start = time.perf_counter()
  subprocess.run([sys.executable, "-m", "clipvip_jax.export", str(checkpoint), "--format", fmt, "--out", str(out),
                  "--frames", str(frames), "--platforms", "cpu", "--no-check"], check=True, stdout=subprocess.DEVNULL)
  seconds = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
  return f"{seconds:.0f} s, peak RSS of the export processes so far {peak:.1f} GiB"


def _jax_encoders(model):
  import jax
  import jax.numpy as jnp

  from data_pipelines.transforms import normalize_video
  p = model.pretrained
  text, video = p.jitted("encode_text"), p.jitted("encode_video")
  video_from_pixels = jax.jit(lambda state, frames, mask: video(state, normalize_video(frames, mask, xp=jnp), mask))
  return (lambda ids, mask: text(p.state, ids, mask)), (lambda frames, mask: video_from_pixels(p.state, frames, mask))


def _sizes(root: pathlib.Path) -> str:
  graphs = sorted(p for p in root.iterdir() if p.name.startswith(("text_encoder", "video_encoder")))
  return ", ".join(f"{p.name} {p.stat().st_size / 2**20:.0f} MiB" for p in graphs)


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--kind", default="clipvip", choices=("clipvip", "clip2video", "clip"))
  p.add_argument("--variant", default="B/32")
  p.add_argument("--frames", type=int, default=12)
  p.add_argument("--text-batches", default="1,16")
  p.add_argument("--video-batches", default="1,4")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--work", help="folder for the exports (default: a temporary one)")
  args = p.parse_args(argv)
  from clipvip_jax.export.runtime import load_exported
  from clipvip_jax.retrieval.model import load_model
  for line in machine_lines(("onnxruntime", "onnx", "jax2onnx")):
    print(line, flush=True)
  work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="export_runtime_"))
  checkpoint = _checkpoint(args.kind, args.variant, args.frames, work / "checkpoint")
  runtimes = {}
  for fmt in ("onnx", "stablehlo"):
    note = _export(checkpoint, fmt, args.frames, work / fmt)
    print(f"export {fmt}: {note} ({_sizes(work / fmt)})", flush=True)
    runtimes["onnxruntime" if fmt == "onnx" else "stablehlo"] = load_exported(work / fmt)
  model = load_model(checkpoint)
  model.recipe = model.recipe.replace(num_frames=args.frames)
  jax_text, jax_video = _jax_encoders(model)
  rng = np.random.default_rng(0)
  rows = []
  length, size = model.recipe.max_text_len, model.input_size
  cases = [("text", int(b)) for b in args.text_batches.split(",")] + \
          [("video", int(b)) for b in args.video_batches.split(",")]
  for tower, batch in cases:
    if tower == "text":
      inputs = (rng.integers(1, 49000, (batch, length)).astype(np.int32), np.ones((batch, length), np.int32))
      fns = {"jax": lambda: jax_text(*inputs),
             **{n: (lambda r=r: r.encode_text(*inputs)) for n, r in runtimes.items()}}
    else:
      inputs = (rng.integers(0, 256, (batch, args.frames, size, size, 3), dtype=np.uint8),
                np.ones((batch, args.frames), np.int32))
      fns = {"jax": lambda: jax_video(*inputs),
             **{n: (lambda r=r: r.encode_video(*inputs)) for n, r in runtimes.items()}}
    reference = np.asarray(fns["jax"]())
    errors = {f"{n}_max_abs_error": float(np.abs(np.asarray(fn()) - reference).max()) for n, fn in fns.items()
              if n != "jax"}
    out = interleaved(fns, warmup=args.warmup, repeats=args.repeats, track_memory=False)
    row = {"tower": tower, "batch": batch, **{f"{n}_ms": m.median * 1e3 for n, m in out.items()},
           **{f"{n}_spread": m.spread for n, m in out.items()}, **errors}
    rows.append(row)
    print(json.dumps(row), flush=True)
  names = ("jax", "onnxruntime", "stablehlo")
  unit = {"text": "texts/s", "video": "clips/s"}
  print()
  print(markdown_table(
      ["tower", "batch", *[f"{n} ms (items/s)" for n in names], "onnxruntime / jax", "max abs error ort, hlo"],
      [[r["tower"], r["batch"],
        *[f"{r[f'{n}_ms']:.1f} ({r['batch'] / r[f'{n}_ms'] * 1e3:.1f} {unit[r['tower']]}, spread "
          f"{r[f'{n}_spread']:.0%})" for n in names],
        f"{r['jax_ms'] / r['onnxruntime_ms']:.2f}x",
        f"{r['onnxruntime_max_abs_error']:.1e}, {r['stablehlo_max_abs_error']:.1e}"] for r in rows]))
  return rows


if __name__ == "__main__":
  main()
  sys.exit(0)
