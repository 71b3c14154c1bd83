"""python -m clipvip_jax.serve --index DIR [--checkpoint P] [--host 127.0.0.1] [--port N]

One process serves an index (written by python -m clipvip_jax.encode) to people and programs: a web page to type
a sentence and look at the clips it finds, and a JSON API (text -> clips, clip -> similar clips, health, index
info, OpenAPI at /openapi.json). The index and its model are loaded once; queries arriving together are encoded
in one model call (clipvip_jax.retrieval.query_batcher). It binds to 127.0.0.1 unless --host says otherwise, and
serves nothing outside the index folder and the page's own files (clipvip_jax.retrieval.service).

An index encoded before thumbnails existed gets them once, at start, from the shards or videos it was encoded
from (written into DIR/thumbnails); without them the page shows captions and scores only.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from clipvip_jax.cli_errors import ArgumentParser, UsageError, quiet_library_logs, run_cli
from clipvip_jax.retrieval import search

PROG = "python -m clipvip_jax.serve"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def _port(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
  if not 0 <= value <= 65535:
    raise argparse.ArgumentTypeError(f"must be in 0..65535, got {value}")
  return value


def _parser() -> argparse.ArgumentParser:
  p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[1],
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog=f"example:\n  {PROG} --index demo_out/index    # then open http://127.0.0.1:8000/")
  p.add_argument("--index", required=True, metavar="DIR", help="index folder written by clipvip_jax.encode")
  p.add_argument("--checkpoint", help="model to encode queries with (default: the one recorded in the index)")
  p.add_argument("--config", help="the original's config JSON, with --checkpoint naming an original file")
  p.add_argument("--step", help="with --checkpoint naming a training workdir: step number, 'latest' or 'best'")
  p.add_argument("--model", metavar="DIR", help="an exported model (python -m clipvip_jax.export) to encode the "
                 "queries with instead of a checkpoint: runs in onnxruntime or jax, without flax")
  p.add_argument("--backend", default="auto", choices=("auto", "exact", "approximate"),
                 help="search backend (see python -m clipvip_jax.search --help; default %(default)s)")
  p.add_argument("--max-batch", type=int, default=search.QUERY_BATCH,
                 help="most queries encoded in one model call (default %(default)s; 1 = no batching)")
  p.add_argument("--host", default=DEFAULT_HOST,
                 help="address to bind (default %(default)s: this machine only; 0.0.0.0 opens it to the network)")
  p.add_argument("--port", type=_port, default=DEFAULT_PORT, help="port (default %(default)s; 0 = any free one)")
  return p


def _check_address(host: str, port: int) -> None:
  import socket
  try:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
  except socket.gaierror:
    raise UsageError(f"--host {host} is not an address of this machine") from None
  family, _, _, _, address = infos[0]
  with socket.socket(family, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(address)
    except OSError as e:
      raise UsageError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port") from None


def _run(argv: Sequence[str] | None) -> int:
  args = _parser().parse_args(argv)
  quiet_library_logs()
  if args.checkpoint is None and (args.config is not None or args.step is not None):
    raise UsageError("--config and --step go with --checkpoint (the index's own checkpoint uses what it recorded)")
  if args.model is not None and args.checkpoint is not None:
    raise UsageError("--model (an exported model) and --checkpoint are alternatives; give one of them")
  if not 1 <= args.max_batch <= search.QUERY_BATCH:
    raise UsageError(f"--max-batch must be in 1..{search.QUERY_BATCH}, got {args.max_batch}")
  _check_address(args.host, args.port)  # before the model load: a taken port fails in a second, not a minute
  import uvicorn

  from clipvip_jax.retrieval import service, thumbnails
  searcher = search.Searcher(args.index, args.checkpoint, args.config, args.step, backend=args.backend, warn=False,
                             model_dir=args.model)
  if thumbnails.ensure_thumbnails(searcher.index):
    print(f"{PROG}: wrote thumbnails into {searcher.index.path / thumbnails.FOLDER} from "
          f"{searcher.index.meta.get('source')} (once: encode writes them now)", file=sys.stderr, flush=True)
  # Compile the text tower for every batch shape the batcher can form (powers of two up to --max-batch) now, so
  # that no request waits on a compilation under load.
  size = 1
  while True:
    search.encode_queries(searcher.model, ["warm up"] * size)
    if size >= args.max_batch:
      break
    size *= 2
  app = service.create_app(searcher, max_batch=args.max_batch)
  config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False)
  server = uvicorn.Server(config)
  host = f"[{args.host}]" if ":" in args.host else args.host
  print(f"serving {searcher.index.count} clips of {searcher.index.path} on http://{host}:{args.port}/ "
        "(API: /openapi.json; Ctrl-C stops)", flush=True)
  server.run()
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return run_cli(_run, argv, prog=PROG)
