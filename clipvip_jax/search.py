"""python -m clipvip_jax.search --index DIR "a query" ["another query" ...] [--top-k K] [--checkpoint PATH]

Ranks the videos of an index (written by python -m clipvip_jax.encode) for text queries. Each query is encoded
with the model that built the index (the checkpoint recorded in index.json unless --checkpoint names another of
the same kind and size) and scored with that model's own `similarity`: cosine for CLIP-ViP and image CLIPs, the
original's inference logits (global + temporal alignment) for CLIP2Video.

Library use:
    from clipvip_jax.search import search
    search("idx/", ["a dog catches a frisbee"], top_k=5)   # -> [[(clip_id, score), ...]] one list per query
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import warnings
from typing import Sequence

import numpy as np

from clipvip_jax.cli_errors import ArgumentParser, UsageError, quiet_library_logs, run_cli
from clipvip_jax.embedding_index import EmbeddingIndex, read_index
from clipvip_jax.retrieval_model import RetrievalModel

PROG = "python -m clipvip_jax.search"
DEFAULT_TOP_K = 10

Ranking = list[tuple[str, float]]


def check_queries(queries: str | Sequence[str]) -> list[str]:
  """A query or a list of them, each non-blank; UsageError otherwise."""
  if isinstance(queries, str):
    queries = [queries]
  queries = list(queries)
  if not queries:
    raise UsageError("no query given")
  for i, q in enumerate(queries):
    if not isinstance(q, str) or not q.strip():
      raise UsageError(f"query {i + 1} is empty" if isinstance(q, str) else f"query {i + 1} is not a string")
  return [q.strip() for q in queries]


def check_top_k(top_k: int) -> int:
  if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
    raise UsageError(f"--top-k must be an integer >= 1, got {top_k!r}")
  return int(top_k)


def load_index_model(index: EmbeddingIndex, checkpoint: str | None = None, config: str | None = None,
                     step: str | int | None = None, *, warn: bool = True) -> RetrievalModel:
  """The model to encode queries for `index`: the recorded checkpoint (with its recorded step and config), or
  `checkpoint`; then checked against the index (kind, embedding size) and given the index's text length."""
  from clipvip_jax.retrieval_model import load_model
  recorded = index.meta["checkpoint"]
  if checkpoint is None:
    if not pathlib.Path(recorded).exists():
      raise UsageError(f"the checkpoint recorded in {index.path / 'index.json'}, {recorded}, does not exist; "
                       "pass --checkpoint")
    checkpoint = recorded
    step = index.meta.get("step") if step is None else step
    config = index.meta.get("config") if config is None else config
  model = load_model(checkpoint, config, step=step, trust_pickle=bool(index.meta.get("trust_pickle")))
  check_compatible(index, model)
  text_len = (index.meta.get("options") or {}).get("max_text_len")
  if text_len:
    model.recipe = model.recipe.replace(max_text_len=min(int(text_len), model.text_positions))
  if warn and model.checkpoint != recorded:
    warnings.warn(f"the index was built with {recorded}; searching it with {model.checkpoint}", stacklevel=2)
  return model


def check_compatible(index: EmbeddingIndex, model: RetrievalModel) -> None:
  if index.modality != "video":
    raise UsageError(f"{index.path} holds {index.modality} embeddings; search needs a video index "
                     "(encode --videos or --shards)")
  if model.kind != index.kind:
    raise UsageError(f"{index.path} was built with a {index.kind} model but checkpoint {model.checkpoint} is a "
                     f"{model.kind} model; search with the checkpoint that built the index")
  dims = model.embedding_dim()
  if dims != index.dims:
    raise UsageError(f"{index.path} holds {index.dims}-dim embeddings but checkpoint {model.checkpoint} gives "
                     f"{dims}-dim ones; search with the checkpoint that built the index")


def rank(model: RetrievalModel, index: EmbeddingIndex, queries: Sequence[str], top_k: int) -> list[Ranking]:
  """For each query, the top_k (at most all) rows of the index by the model's similarity, best first; equal
  scores keep index order."""
  ids, mask = model.tokenize(list(queries))
  scores = np.asarray(model.similarity(model.encode_text(ids, mask), index.embeddings), np.float32)
  k = min(top_k, scores.shape[1])
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return [[(index.ids[j], float(scores[i, j])) for j in row] for i, row in enumerate(order)]


def search(index_dir: str | pathlib.Path, queries: str | Sequence[str], top_k: int = DEFAULT_TOP_K, *,
           checkpoint: str | None = None, config: str | None = None,
           model: RetrievalModel | None = None) -> list[Ranking]:
  """[(clip_id, score), ...] best first, one list per query (a single string is one query).

  `model` reuses an already loaded model (from `load_index_model`) across calls; otherwise the index's
  checkpoint (or `checkpoint`) is loaded. Bad input raises UsageError with one sentence.
  """
  queries, top_k = check_queries(queries), check_top_k(top_k)
  index = read_index(index_dir)
  if model is None:
    model = load_index_model(index, checkpoint, config)
  else:
    check_compatible(index, model)
  return rank(model, index, queries, top_k)


# ------------------------------------------------------------------------------------------------ command line


def _parser() -> argparse.ArgumentParser:
  p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="example:\n"
                                     f"  {PROG} --index idx/ \"a red circle moves to the left\" --top-k 5")
  p.add_argument("--index", required=True, metavar="DIR", help="index folder written by clipvip_jax.encode")
  p.add_argument("queries", nargs="+", metavar="QUERY", help="text query (several give one ranking each)")
  p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="results per query (default %(default)s)")
  p.add_argument("--checkpoint", help="model to encode the queries with (default: the one recorded in the index)")
  p.add_argument("--config", help="the original's config JSON, with --checkpoint naming an original file")
  p.add_argument("--step", help="with --checkpoint naming a training workdir: step number, 'latest' or 'best'")
  p.add_argument("--json", action="store_true", help="print the rankings as JSON")
  return p


def _print_rankings(index: EmbeddingIndex, queries: list[str], rankings: list[Ranking]) -> None:
  row_of = {clip_id: row for row, clip_id in enumerate(index.ids)}
  for n, (query, ranking) in enumerate(zip(queries, rankings)):
    if n:
      print()
    print(f"query: {query}")
    width = max(len(clip_id) for clip_id, _ in ranking)
    for place, (clip_id, score) in enumerate(ranking, 1):
      captions = index.captions(row_of[clip_id])
      caption = f"  {captions[0]}" if captions else ""
      print(f"{place:4d}  {score:9.4f}  {clip_id:<{width}}{caption}")


def _run(argv: Sequence[str] | None) -> int:
  args = _parser().parse_args(argv)
  quiet_library_logs()
  queries, top_k = check_queries(args.queries), check_top_k(args.top_k)
  index = read_index(args.index)
  if args.checkpoint is None and (args.config is not None or args.step is not None):
    raise UsageError("--config and --step go with --checkpoint (the index's own checkpoint uses what it recorded)")
  model = load_index_model(index, args.checkpoint, args.config, args.step, warn=False)
  if model.checkpoint != index.meta["checkpoint"]:
    print(f"{PROG}: note: the index was built with {index.meta['checkpoint']}; searching it with "
          f"{model.checkpoint}", file=sys.stderr)
  rankings = rank(model, index, queries, top_k)
  if args.json:
    print(json.dumps([{"query": q, "results": [{"id": i, "score": s} for i, s in r]}
                      for q, r in zip(queries, rankings)], indent=1, ensure_ascii=False))
  else:
    _print_rankings(index, queries, rankings)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return run_cli(_run, argv, prog=PROG)


if __name__ == "__main__":
  sys.exit(main())
