"""python -m clipvip_jax.export CHECKPOINT --format onnx|stablehlo --out DIR [--frames N]

Writes a checkpoint's text and video encoders as a folder a deployment can run without this project's training
stack: the two graphs (ONNX for onnxruntime, Triton or another ONNX runtime; or StableHLO, serialized by
jax.export, for any JAX or XLA runtime), the tokenizer, the preprocessing spec and a manifest with dims,
versions and checksums. The batch size of both graphs is dynamic; the frame count is dynamic for image CLIPs,
meanP and (in StableHLO) CLIP-ViP, fixed per export otherwise (--frames, default the model's recipe).
Re-exporting to the same --out replaces the folder in one step. clipvip_jax.export.runtime runs the folder;
search and serve take it as --model DIR.
"""

from __future__ import annotations

import argparse
import pathlib
from typing import Sequence

from clipvip_jax.runtime import cli_errors
from clipvip_jax.runtime.cli_errors import ArgumentParser, UsageError, quiet_library_logs, run_cli
from clipvip_jax.export import routes, spec

PROG = "python -m clipvip_jax.export"




def _parser() -> argparse.ArgumentParser:
  p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[1],
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="examples:\n"
                            f"  {PROG} converted/clipvip-b32 --format onnx --out deploy/clipvip-b32\n"
                            f"  {PROG} runs/demo --step best --format stablehlo --out deploy/demo")
  p.add_argument("checkpoint", metavar="CHECKPOINT",
                 help="converted dir, training workdir, original checkpoint file or HF CLIP dir")
  p.add_argument("--format", required=True, choices=sorted(routes.WRITERS), help="graph format")
  p.add_argument("--out", required=True, metavar="DIR", help="export folder (an earlier export there is replaced)")
  cli_errors.add_checkpoint_options(p)
  p.add_argument("--frames", type=cli_errors.positive_int,
                 help="frame count of the video graph where it is fixed (default: the model's recipe)")
  p.add_argument("--platforms", default=",".join(routes.PLATFORMS),
                 help="stablehlo only: platforms to lower for, comma-separated (default %(default)s)")
  p.add_argument("--no-check", action="store_true",
                 help="skip running the written graphs against the JAX model before the folder is put in place")
  return p


def _declared_kind(checkpoint: pathlib.Path) -> str | None:
  """The kind a converted dir's config.json names, read before loading any weights."""
  from clipvip_jax import converted_checkpoint
  if not converted_checkpoint.is_converted_dir(checkpoint):
    return None
  return converted_checkpoint.read_meta(checkpoint)["kind"]


def _check_kind(kind: str | None, checkpoint) -> None:
  if kind is not None and kind not in spec.EXPORTABLE_KINDS:
    raise UsageError(f"checkpoint {checkpoint} is a {kind!r} model, which cannot be exported; export supports "
                     f"{', '.join(spec.EXPORTABLE_KINDS)}")


def _run(argv: Sequence[str] | None) -> int:
  args = _parser().parse_args(argv)
  quiet_library_logs()
  missing = routes.missing_package(args.format)  # before the model load: seconds, not a minute
  if missing:
    raise UsageError(missing)
  platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
  if args.format == "stablehlo" and not set(platforms) <= {"cpu", "cuda", "rocm", "tpu"}:
    raise UsageError(f"--platforms {args.platforms!r}: each must be one of cpu, cuda, rocm, tpu")
  from clipvip_jax.export import writer
  out = pathlib.Path(args.out)
  writer.check_out_dir(out.absolute())
  checkpoint = pathlib.Path(args.checkpoint).expanduser()
  _check_kind(_declared_kind(checkpoint), checkpoint)
  from clipvip_jax.retrieval.model import load_model
  # XLA's attention: a graph with a TPU kernel in it would run on TPU only (and ONNX has no such op).
  model = load_model(checkpoint, args.config, step=args.step, trust_pickle=args.trust_pickle, attention="xla")
  _check_kind(model.kind, checkpoint)
  path = writer.export_model(model, out, args.format, frames=args.frames, platforms=platforms,
                             check=not args.no_check)
  manifest = spec.read_manifest(path)
  frames = manifest["frames"]
  print(f"exported the {model.kind} encoders of {model.checkpoint} as {args.format} to {path} "
        f"({manifest['embedding_dim']}-dim, batch dynamic, frames "
        f"{'dynamic' if frames['dynamic'] else frames['count']})")
  checked = manifest.get("checked")
  if isinstance(checked, dict):
    errors = checked["max_abs_error"]
    print(f"checked against the JAX model: max abs error text {errors['text']:.2g}, video {errors['video']:.2g}")
  elif checked:
    print(checked)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return run_cli(_run, argv, prog=PROG)
