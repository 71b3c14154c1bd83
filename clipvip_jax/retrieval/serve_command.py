"""python -m clipvip_jax.serve --index DIR [--checkpoint P] [--host 127.0.0.1] [--port N]

One process serves an index (written by python -m clipvip_jax.encode) to people and programs: a web page to type
a sentence and look at the clips it finds, and a JSON API (text -> clips, clip -> similar clips, health, index
info, OpenAPI at /openapi.json). The index and its model are loaded once; queries arriving together are encoded
in one model call (clipvip_jax.retrieval.query_batcher). It binds to 127.0.0.1 unless --host says otherwise, and
serves nothing outside the index folder and the page's own files (clipvip_jax.retrieval.service).

The index is verified before it is served (python -m clipvip_jax.index verify: an index from anywhere is
untrusted input) and one with a problem is refused. Requests are answered only for the Host names of this machine
(localhost, the bound address, the address a connection reached, and --allow-host), never with absolute paths
(unless --show-paths); docs/security.md says what the service trusts. An index without thumbnails is served with
captions and scores only (python -m clipvip_jax.index thumbnails DIR writes them from its recorded source).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Sequence

from clipvip_jax.runtime.cli_errors import ArgumentParser, UsageError, quiet_library_logs, run_cli
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
  p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                 help="also answer requests whose Host is NAME (repeatable; '*' answers any, giving up the "
                      "DNS-rebinding guard); localhost, the bound address and the address a connection reached are "
                      "always answered")
  p.add_argument("--show-paths", action="store_true",
                 help="/api/index shows the absolute paths of the index, checkpoint and source (default: names)")
  p.add_argument("--video-root", action="append", default=[], metavar="DIR",
                 help="serve the video files under DIR (repeatable), so the page opens a result at its moment; a "
                      "file outside every --video-root is never served (default: none, the page shows frames)")
  p.add_argument("--request-timeout", type=float, default=None, metavar="S",
                 help="seconds a request's line, headers and body may take to arrive (default "
                      "clipvip_jax.retrieval.service.REQUEST_TIMEOUT_S)")
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
  if args.request_timeout is not None and not 0 < args.request_timeout <= 3600:
    raise UsageError(f"--request-timeout must be in (0, 3600] seconds, got {args.request_timeout}")
  for root in args.video_root:
    if not pathlib.Path(root).is_dir():
      raise UsageError(f"--video-root {root} is not a folder")
  _check_address(args.host, args.port)  # before the model load: a taken port fails in a second, not a minute
  import uvicorn

  from clipvip_jax.retrieval import service, thumbnails, verify
  report = verify.verify_index(args.index)  # before the model load, too
  if not report.ok:
    more = f" (and {len(report.problems) - 1} more)" if len(report.problems) > 1 else ""
    raise UsageError(f"{args.index} is not served: {report.problems[0]}{more}; python -m clipvip_jax.index verify "
                     f"{args.index} lists every problem")
  searcher = search.Searcher(args.index, args.checkpoint, args.config, args.step, backend=args.backend, warn=False,
                             model_dir=args.model)
  if not thumbnails.Thumbnails(searcher.index.path, searcher.index.count).available:
    print(f"{PROG}: note: {searcher.index.path} has no thumbnails, so the page shows captions and scores only "
          f"(python -m clipvip_jax.index thumbnails {searcher.index.path} writes them from its source)",
          file=sys.stderr, flush=True)
  # Compile the text tower for every batch shape the batcher can form (powers of two up to --max-batch) now, so
  # that no request waits on a compilation under load.
  size = 1
  while True:
    search.encode_queries(searcher.model, ["warm up"] * size)
    if size >= args.max_batch:
      break
    size *= 2
  allowed = service.default_allowed_hosts(args.host) + list(args.allow_host)
  app = service.create_app(searcher, max_batch=args.max_batch, allowed_hosts=allowed, show_paths=args.show_paths,
                           video_roots=args.video_root)
  timeout = service.REQUEST_TIMEOUT_S if args.request_timeout is None else args.request_timeout
  server = uvicorn.Server(service.server_config(app, args.host, args.port, request_timeout=timeout))
  host = f"[{args.host}]" if ":" in args.host else args.host
  what = "moments" if searcher.index.moments else "clips"
  print(f"serving {searcher.index.count} {what} of {searcher.index.path} on http://{host}:{args.port}/ "
        "(API: /openapi.json; Ctrl-C stops)", flush=True)
  server.run()
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return run_cli(_run, argv, prog=PROG)
