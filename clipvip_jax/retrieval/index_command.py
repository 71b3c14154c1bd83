"""python -m clipvip_jax.index (info | verify | thumbnails | build-approximate | delete) DIR: what an index holds,
whether it can be trusted, its thumbnails, its approximate-search index, and removing rows.

  info DIR                 the format version, rows, dims, dtype, parts, model, source, skipped inputs, options
                           and the approximate index (with its measured recall@10), if any
  verify DIR               every check of an index as untrusted input, in one pass (clipvip_jax.retrieval.verify):
                           every problem named, exit status 1 if there is one (serve runs it before serving)
  thumbnails DIR           writes the thumbnail strips of an index encoded before encode wrote them, from the videos
                           or shards recorded as its source (serve reads nothing outside the index, so it does not)
  build-approximate DIR    trains and fills a FAISS IVF index in DIR/approximate/, measures recall@10 against
                           exact search and picks nprobe (clipvip_jax.retrieval.approximate); search uses it from
                           clipvip_jax.retrieval.search.APPROXIMATE_ABOVE rows, or with --backend approximate
  delete DIR --id ID...    removes every row of these ids (a moment index: every window of the video), or with
         DIR --vanished    --vanished those whose video file is gone from the source folder; published in one
                           atomic exchange, readers see the old or the new index (clipvip_jax.retrieval.growth)
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from clipvip_jax.runtime.cli_errors import ArgumentParser, UsageError, quiet_library_logs, run_cli

PROG = "python -m clipvip_jax.index"


def _parser() -> argparse.ArgumentParser:
  p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  commands = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
  info = commands.add_parser("info", help="print what an index holds")
  info.add_argument("index", metavar="DIR")
  verify = commands.add_parser("verify", help="check an index as untrusted input; name every problem")
  verify.add_argument("index", metavar="DIR")
  strips = commands.add_parser("thumbnails", help="write the thumbnails of an index from its recorded source")
  strips.add_argument("index", metavar="DIR")
  build = commands.add_parser("build-approximate", help="build the approximate-search index of DIR")
  build.add_argument("index", metavar="DIR")
  build.add_argument("--nlist", type=int, help="IVF clusters (default ~sqrt(rows), a power of two <= 1024)")
  build.add_argument("--codes", choices=("auto", "sq8", "pq"), default="auto",
                     help="row codes: 8-bit scalar or product quantisation (8x smaller, slow to train); auto: PQ from "
                          "2M rows (default %(default)s)")
  build.add_argument("--refine", type=int, default=200, help="candidates re-scored exactly (default %(default)s)")
  build.add_argument("--target-recall", type=float, default=0.95,
                     help="smallest nprobe reaching this recall@10 is chosen (default %(default)s)")
  delete = commands.add_parser("delete", help="remove rows by id, or those of vanished video files")
  delete.add_argument("index", metavar="DIR")
  delete.add_argument("--id", action="append", default=[], dest="ids", metavar="ID",
                      help="a row id to remove (repeatable); it is recorded so that --append does not add it again")
  delete.add_argument("--vanished", action="store_true",
                      help="remove the rows of videos whose file is no longer in the source folder")
  return p


def _run(argv: Sequence[str] | None) -> int:
  from clipvip_jax.retrieval import approximate
  from clipvip_jax.retrieval.index import describe, read_index
  args = _parser().parse_args(argv)
  quiet_library_logs()
  if args.command == "verify":
    from clipvip_jax.retrieval.verify import describe_report, verify_index
    report = verify_index(args.index)
    print(describe_report(report))
    return 0 if report.ok else 1
  if args.command == "delete":
    from clipvip_jax.retrieval import growth
    if not args.ids and not args.vanished:
      raise UsageError("delete needs --id ID (repeatable) or --vanished")
    removed, left = growth.delete(args.index, args.ids, args.vanished,
                                  log=lambda line: print(line, file=sys.stderr))
    print(f"removed {removed} row(s) from {args.index}; {left} left" if removed else
          f"{args.index} holds no row to remove; unchanged ({left} rows)")
    return 0
  index = read_index(args.index)
  if args.command == "thumbnails":
    from clipvip_jax.retrieval import thumbnails
    if thumbnails.exists_inside(index.path, thumbnails.FOLDER):
      raise UsageError(f"{index.path / thumbnails.FOLDER} exists already")
    if not thumbnails.write_thumbnails(index.path):
      raise UsageError(f"the source recorded in {index.path / 'index.json'}, {index.meta.get('source')}, is not a "
                       "folder of videos or shards any more (or the index is not of videos)")
    print(f"wrote the thumbnails of {index.count} clips into {index.path / thumbnails.FOLDER} from "
          f"{index.meta.get('source')}")
    return 0
  if args.command == "info":
    print(describe(index))
    return 0
  for name in ("nlist", "refine"):
    value = getattr(args, name)
    if value is not None and value < 1:
      raise UsageError(f"--{name} must be >= 1, got {value}")
  if not 0 < args.target_recall <= 1:
    raise UsageError(f"--target-recall must be in (0, 1], got {args.target_recall}")
  meta = approximate.build(index, nlist=args.nlist, codes=args.codes, refine=args.refine,
                           target_recall=args.target_recall, log=lambda line: print(line, file=sys.stderr))
  print(f"built {meta['factory']} for {meta['count']} rows in {index.path / approximate.APPROXIMATE_DIR}: nprobe "
        f"{meta['nprobe']}, recall@10 {meta['recall_at_10']} against exact search")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return run_cli(_run, argv, prog=PROG)
