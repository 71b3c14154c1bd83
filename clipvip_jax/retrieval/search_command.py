"""python -m clipvip_jax.search --index DIR "a query" ["another query" ...] [--top-k K] [--checkpoint PATH]

Ranks the videos of an index (written by python -m clipvip_jax.encode) for text queries, all queries in one
batch with the model loaded once. Each query is encoded with the model that built the index (the checkpoint
recorded in index.json unless --checkpoint names another of the same kind and size) and scored with that model's
own similarity: cosine for CLIP-ViP and image CLIPs, the original's inference logits (global + temporal
alignment) for CLIP2Video. Large indexes with an approximate index (python -m clipvip_jax.index
build-approximate) are searched approximately; see clipvip_jax.retrieval.search. An index of moments (encode
--window) gives moments: the video, the seconds it spans, the score; overlapping windows of one video are merged
and each video gives at most --per-video of them (clipvip_jax.retrieval.moments).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from clipvip_jax.runtime.cli_errors import ArgumentParser, UsageError, quiet_library_logs, run_cli
from clipvip_jax.retrieval.index import EmbeddingIndex
from clipvip_jax.retrieval.index_checks import VERIFY_HINT
from clipvip_jax.retrieval.moments import DEFAULT_PER_VIDEO
from clipvip_jax.retrieval.search import (APPROXIMATE_ABOVE, BACKENDS, DEFAULT_TOP_K, Moment, Searcher, as_moments,
                                          check_backend, check_per_video, check_queries, check_top_k)

PROG = "python -m clipvip_jax.search"


def _parser() -> argparse.ArgumentParser:
  p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[1],
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="example:\n"
                            f"  {PROG} --index idx/ \"a red circle moves to the left\" --top-k 5")
  p.add_argument("--index", required=True, metavar="DIR", help="index folder written by clipvip_jax.encode")
  p.add_argument("queries", nargs="+", metavar="QUERY", help="text query (several give one ranking each)")
  p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="results per query (default %(default)s)")
  p.add_argument("--backend", default="auto", choices=BACKENDS,
                 help=f"exact, approximate, or auto: approximate from {APPROXIMATE_ABOVE} rows when the index has "
                      "an approximate index (default %(default)s)")
  p.add_argument("--checkpoint", help="model to encode the queries with (default: the one recorded in the index)")
  p.add_argument("--config", help="the original's config JSON, with --checkpoint naming an original file")
  p.add_argument("--step", help="with --checkpoint naming a training workdir: step number, 'latest' or 'best'")
  p.add_argument("--model", metavar="DIR", help="an exported model (python -m clipvip_jax.export) to encode the "
                 "queries with instead of a checkpoint: runs in onnxruntime or jax, without flax")
  p.add_argument("--per-video", type=int, default=DEFAULT_PER_VIDEO,
                 help="moment indexes: at most this many moments of one video (default %(default)s)")
  p.add_argument("--json", action="store_true", help="print the rankings as JSON (moments: with start and end in "
                                                      "seconds)")
  return p


def _span_text(moment: Moment) -> str:
  return "" if moment.start is None else f"  {_clock(moment.start)}-{_clock(moment.end)}"


def _clock(seconds: float) -> str:
  minutes, rest = divmod(seconds, 60)
  hours, minutes = divmod(int(minutes), 60)
  return (f"{hours}:{minutes:02d}:" if hours else f"{minutes}:") + f"{rest:04.1f}"


def _format_rankings(index: EmbeddingIndex, queries: list[str], rankings: list[list[Moment]]) -> list[str]:
  """The table's lines, every id and caption read before anything is printed: a damaged index stops the command
  with its one sentence, not halfway through the table."""
  lines = []
  for n, (query, ranking) in enumerate(zip(queries, rankings)):
    if n:
      lines.append("")
    lines.append(f"query: {query}")
    width = max((len(m.video) for m in ranking), default=0)
    for place, moment in enumerate(ranking, 1):
      captions = index.captions(moment.row)
      caption = f"  {captions[0]}" if captions else ""
      lines.append(f"{place:4d}  {moment.score:9.4f}  {moment.video:<{width}}{_span_text(moment)}{caption}")
  return lines


def _json_result(moment: Moment) -> dict:
  result = {"id": moment.video, "score": moment.score}
  if moment.start is not None:
    result.update(start=moment.start, end=moment.end)
  return result


def _run(argv: Sequence[str] | None) -> int:
  from clipvip_jax.retrieval.search import encode_queries, ranked_hits, truncation_warnings
  args = _parser().parse_args(argv)
  quiet_library_logs()
  queries, top_k = check_queries(args.queries), check_top_k(args.top_k)
  per_video = check_per_video(args.per_video)
  check_backend(args.backend)
  if args.checkpoint is None and (args.config is not None or args.step is not None):
    raise UsageError("--config and --step go with --checkpoint (the index's own checkpoint uses what it recorded)")
  if args.model is not None and args.checkpoint is not None:
    raise UsageError("--model (an exported model) and --checkpoint are alternatives; give one of them")
  searcher = Searcher(args.index, args.checkpoint, args.config, args.step, backend=args.backend, warn=False,
                      model_dir=args.model)
  index = searcher.index
  if searcher.model.checkpoint != index.meta["checkpoint"]:
    print(f"{PROG}: note: the index was built with {index.meta['checkpoint']}; searching it with "
          f"{searcher.model.checkpoint}", file=sys.stderr)
  for note in truncation_warnings(searcher.model, queries):
    print(f"{PROG}: note: {note}", file=sys.stderr)
  hits = ranked_hits(index, encode_queries(searcher.model, queries), [top_k] * len(queries), args.backend,
                     searcher.approx, per_video=per_video)
  rankings = [as_moments(index, h) for h in hits]
  if args.json:
    text = json.dumps([{"query": q, "results": [_json_result(m) for m in r]}
                       for q, r in zip(queries, rankings)], indent=1, ensure_ascii=False)
  else:
    text = "\n".join(_format_rankings(index, queries, rankings))
  wanted = min(top_k, index.count)
  short = min(len(r) for r in rankings)
  if short < wanted and index.moments:
    print(f"{PROG}: note: {short} distinct moments (at most {per_video} a video) were found for the {wanted} asked "
          "for", file=sys.stderr)
  elif short < wanted:
    print(f"{PROG}: note: only {short} of the {wanted} results asked for could be ranked: the index holds rows "
          f"with NaN or infinite values, which are never ranked ({VERIFY_HINT} {index.path} lists them)",
          file=sys.stderr)
  print(text)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return run_cli(_run, argv, prog=PROG)
