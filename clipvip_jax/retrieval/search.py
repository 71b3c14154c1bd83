"""Text-to-video search over an index: the model loaded once, queries batched, exact or approximate top-k.

    from clipvip_jax.retrieval.search import Searcher
    searcher = Searcher("idx/")                     # opens the index (memory-mapped) and loads its model once
    searcher.search(["a dog catches a frisbee"], top_k=5)   # -> [[(clip_id, score), ...]] one list per query
    searcher.moments(["a dog catches a frisbee"], top_k=5)  # -> [[Moment(video, start, end, score, row), ...]]
    searcher.more_like(row, top_k=5)                        # the moments (or clips) most like row `row`

Each query is encoded with the model that built the index (the checkpoint recorded in index.json unless another
of the same kind and size is given) and scored with that model's similarity, a dot product of the stored rows
(cosine for CLIP-ViP and image CLIPs; CLIP2Video's inference logits in their dual-encoder form, global + temporal
alignment: clipvip_jax.models.clip2video). Backends:
  exact        chunked top-k over the memory-mapped parts (clipvip_jax.retrieval.exact): every row scored,
               memory bounded by a chunk, never a full sort
  approximate  FAISS IVF candidates re-scored exactly (clipvip_jax.retrieval.approximate); needs
               `python -m clipvip_jax.index build-approximate DIR`
  auto         approximate from APPROXIMATE_ABOVE rows when one was built, exact otherwise
A moment index (encode --window) ranks windows; they are merged into distinct moments, at most `per_video` a video
(clipvip_jax.retrieval.moments: temporal non-maximum suppression). A whole-clip index ranks clips as it always did;
moments() of a clip index gives each clip as a moment without a time (start and end None).
"""

from __future__ import annotations

import pathlib
import warnings
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np

from clipvip_jax.runtime.cli_errors import UsageError
from clipvip_jax.retrieval import approximate, exact, moments as moments_lib
from clipvip_jax.retrieval.index import EmbeddingIndex, read_index
from clipvip_jax.tokenizer import MAX_QUERY_CHARS

if TYPE_CHECKING:  # imported where a checkpoint is loaded: an exported model (--model) needs no model code
  from clipvip_jax.retrieval.model import RetrievalModel

DEFAULT_TOP_K = 10
BACKENDS = ("auto", "exact", "approximate")
# Exact search of 1M float32 rows of 512 dims takes ~80 ms per query on the 2-core machine of
# docs/performance.md; from 2M rows the approximate index (when built) answers instead.
APPROXIMATE_ABOVE = 2_000_000
QUERY_BATCH = 64  # queries encoded per compiled call (fewer are padded to a power of two: few compilations)

Ranking = list[tuple[str, float]]


class Moment(NamedTuple):
  """One result: the video (its id in the index), the seconds it spans (None, None for a whole-clip row), the
  model's score, and the row (for more_like and the index's other tables)."""
  video: str
  start: float | None
  end: float | None
  score: float
  row: int


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
    if len(q) > MAX_QUERY_CHARS:  # a file pasted by mistake: refused before any model work
      raise UsageError(f"query {i + 1} is {len(q)} characters long; the model reads a few hundred at most, so more "
                       f"than {MAX_QUERY_CHARS} is refused")
  return [q.strip() for q in queries]


def truncation_warnings(model: RetrievalModel, queries: Sequence[str], what: str = "query") -> list[str]:
  """The queries the text tower would cut at its token length, one sentence each (tokenizer.truncation_notes)."""
  from clipvip_jax.tokenizer import truncation_notes
  try:
    return truncation_notes(list(queries), model.recipe.max_text_len, model.tokenizer_dir, what=what)
  except ValueError as e:
    raise UsageError(str(e)) from None


def check_top_k(top_k: int) -> int:
  if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
    raise UsageError(f"--top-k must be an integer >= 1, got {top_k!r}")
  return int(top_k)


def load_index_model(index: EmbeddingIndex, checkpoint: str | None = None, config: str | None = None,
                     step: str | int | None = None, *, warn: bool = True) -> RetrievalModel:
  """The model to encode queries for `index`: the recorded checkpoint (with its recorded step and config), or
  `checkpoint`; then checked against the index (kind, embedding size) and given the index's text length.

  The index's "trust_pickle" is not honoured: an index comes from anywhere, and must not be able to make this
  process unpickle a file (run code). A pickled original checkpoint is converted once instead (the error says
  how), or loaded with load_model(..., trust_pickle=True) by a caller that trusts it."""
  from clipvip_jax.retrieval.model import load_model
  recorded = index.meta["checkpoint"]
  if checkpoint is None:
    if not pathlib.Path(recorded).exists():
      raise UsageError(f"the checkpoint recorded in {index.path / 'index.json'}, {recorded}, does not exist; "
                       "pass --checkpoint")
    checkpoint = recorded
    step = index.meta.get("step") if step is None else step
    config = index.meta.get("config") if config is None else config
  model = load_model(checkpoint, config, step=step)
  check_compatible(index, model)
  _use_index_text_length(index, model)
  if warn and model.checkpoint != recorded:
    warnings.warn(f"the index was built with {recorded}; searching it with {model.checkpoint}", stacklevel=2)
  return model


def load_exported_index_model(index: EmbeddingIndex, model_dir: str | pathlib.Path):
  """An exported model (python -m clipvip_jax.export; search/serve --model DIR) to encode queries for `index`,
  checked against it and given its text length. It runs in onnxruntime or jax alone: no flax, no model code."""
  from clipvip_jax.export.runtime import load_exported
  model = load_exported(model_dir)
  check_compatible(index, model)
  _use_index_text_length(index, model)
  return model


def _use_index_text_length(index: EmbeddingIndex, model) -> None:
  text_len = (index.meta.get("options") or {}).get("max_text_len")
  if text_len:
    model.recipe = model.recipe.replace(max_text_len=min(int(text_len), model.text_positions))


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


def check_backend(backend: str) -> str:
  if backend not in BACKENDS:
    raise UsageError(f"--backend {backend!r} is not one of {BACKENDS}")
  return backend


def encode_queries(model: RetrievalModel, queries: Sequence[str]) -> np.ndarray:
  """float32 [len(queries), D] query embeddings, in batches of QUERY_BATCH (fewer: padded to a power of two, so a
  process compiles the text tower for a handful of shapes, once each)."""
  from clipvip_jax.retrieval.extraction import extract_embeddings
  ids, mask = model.tokenize(list(queries))
  batch = min(QUERY_BATCH, 1 << max(0, (len(queries) - 1).bit_length()))
  return np.asarray(extract_embeddings(model.encode_text, {"ids": ids, "mask": mask}, batch, progress=False),
                    np.float32)


def top_rows(index: EmbeddingIndex, query_embeddings: np.ndarray, top_k: int, backend: str = "auto",
             approx: approximate.ApproximateIndex | None = None) -> tuple[np.ndarray, np.ndarray, str]:
  """(scores [B, k], rows [B, k], backend used) for query embeddings; row -1 marks a slot that no rankable row
  filled (the index holds non-finite rows): callers drop those."""
  check_backend(backend)
  if backend == "approximate" and approx is None:
    raise UsageError(f"{index.path} has no approximate index; build one with python -m clipvip_jax.index "
                     f"build-approximate {index.path}")
  if backend == "approximate" or (backend == "auto" and approx is not None and index.count >= APPROXIMATE_ABOVE):
    scores, rows = approximate.search(approx, index, query_embeddings, top_k)
    return scores, rows, "approximate"
  scores, rows = exact.top_k(index, query_embeddings, top_k)
  return scores, rows, "exact"


def ranked_hits(index: EmbeddingIndex, vectors: np.ndarray, top_ks: Sequence[int], backend: str = "auto",
                approx: approximate.ApproximateIndex | None = None, *, per_video: int = moments_lib.DEFAULT_PER_VIDEO,
                excludes: Sequence[int | None] | None = None) -> list[list[tuple[int, float]]]:
  """[(row, score), ...] best first for each query vector, top_ks[i] of them at most: clips of a whole-clip index,
  merged moments of a moment index (moments.merge). excludes[i]: a row that is the query itself (more like this),
  left out with, in a moment index, the windows of its video that overlap it."""
  excludes = list(excludes) if excludes is not None else [None] * len(top_ks)
  if index.moments:
    return moments_lib.merged_top(index, lambda k: top_rows(index, vectors, k, backend, approx)[:2], list(top_ks),
                                  per_video, excludes)
  k = min(max(t + (e is not None) for t, e in zip(top_ks, excludes)), index.count)
  scores, rows, _ = top_rows(index, vectors, k, backend, approx)
  out = []
  for srow, rrow, top_k, ex in zip(scores, rows, top_ks, excludes):
    hits = [(int(r), float(sc)) for sc, r in zip(srow, rrow) if r >= 0 and r != ex]
    out.append(hits[:top_k])
  return out


def as_moments(index: EmbeddingIndex, hits: Sequence[tuple[int, float]]) -> list[Moment]:
  out = []
  for row, score in hits:
    span = index.span(row)
    out.append(Moment(index.id(row), *(span if span is not None else (None, None)), float(score), int(row)))
  return out


def rank(model: RetrievalModel, index: EmbeddingIndex, queries: Sequence[str], top_k: int, *,
         backend: str = "auto", approx: approximate.ApproximateIndex | None = None) -> list[Ranking]:
  """For each query, the top_k (at most all) rows of the index by the model's similarity, best first; equal
  scores keep index order (exact backend). Rows holding NaN or infinite values are never ranked (fewer results).
  A moment index gives its merged moments, each as (video id, score)."""
  hits = ranked_hits(index, encode_queries(model, queries), [top_k] * len(queries), backend, approx)
  return [[(index.id(r), s) for r, s in h] for h in hits]


class Snapshot(NamedTuple):
  """One state of the index, opened whole (every file mapped): what a query is answered from, start to end."""
  index: EmbeddingIndex
  approx: approximate.ApproximateIndex | None
  stamp: tuple[int, int, int] | None  # index.json's (inode, mtime ns, size) when it was opened


def index_stamp(index_dir: str | pathlib.Path) -> tuple[int, int, int] | None:
  """What changes when an index is replaced, appended to or has rows deleted (a new index.json: a new inode)."""
  try:
    st = (pathlib.Path(index_dir) / "index.json").stat()
  except OSError:
    return None
  return st.st_ino, st.st_mtime_ns, st.st_size


def open_snapshot(index_dir: str | pathlib.Path, backend: str, tries: int = 3) -> Snapshot:
  """The index as one state: opened again when index.json changed while its parts were being opened (an append,
  a deletion or a --force encode published then), so no snapshot mixes two states."""
  for attempt in range(tries):
    before = index_stamp(index_dir)
    index = read_index(index_dir)
    uses_approx = backend == "approximate" or (backend == "auto" and index.count >= APPROXIMATE_ABOVE)
    approx = approximate.load(index) if uses_approx else None
    if index_stamp(index_dir) == before or attempt == tries - 1:
      return Snapshot(index, approx, before)
  raise AssertionError("unreachable")


class Searcher:
  """An index opened and its model loaded once, for any number of `search` calls (a server, a notebook).

  reload_if_changed() opens the index again when it was replaced since (encode --append, index delete, encode
  --force): the next queries are answered from the new state, a query already running finishes on the one it
  started with (`snapshot` is swapped whole, and every file of an opened index stays mapped)."""

  def __init__(self, index_dir: str | pathlib.Path, checkpoint: str | None = None, config: str | None = None,
               step: str | int | None = None, *, model: RetrievalModel | None = None, backend: str = "auto",
               warn: bool = True, model_dir: str | pathlib.Path | None = None):
    self.backend = check_backend(backend)
    self.index_dir = pathlib.Path(index_dir)
    self.snapshot = open_snapshot(index_dir, backend)
    if model_dir is not None:  # an exported model (python -m clipvip_jax.export)
      model = load_exported_index_model(self.index, model_dir)
    elif model is None:
      model = load_index_model(self.index, checkpoint, config, step, warn=warn)
    else:
      check_compatible(self.index, model)
    self.model = model
    # The approximate index is loaded only where it may be used (open_snapshot): FAISS's reader is the one reader
    # here not written for hostile files.
    if backend == "approximate" and self.approx is None:
      top_rows(self.index, np.zeros((0, self.index.dims), np.float32), 1, backend, None)  # raises the sentence

  @property
  def index(self) -> EmbeddingIndex:
    return self.snapshot.index

  @property
  def approx(self) -> approximate.ApproximateIndex | None:
    return self.snapshot.approx

  def changed(self) -> bool:
    return index_stamp(self.index_dir) != self.snapshot.stamp

  def reload_if_changed(self) -> bool:
    """Opens the index again if it changed on disk; True when the searcher now answers from a new state. A new
    state that cannot be used (damaged, another model, no approximate index where one is required) raises
    UsageError and leaves the searcher on the state it had."""
    if not self.changed():
      return False
    snapshot = open_snapshot(self.index_dir, self.backend)
    check_compatible(snapshot.index, self.model)
    if self.backend == "approximate" and snapshot.approx is None:
      top_rows(snapshot.index, np.zeros((0, snapshot.index.dims), np.float32), 1, self.backend, None)
    self.snapshot = snapshot
    return True

  def search(self, queries: str | Sequence[str], top_k: int = DEFAULT_TOP_K) -> list[Ranking]:
    snap = self.snapshot
    return rank(self.model, snap.index, check_queries(queries), check_top_k(top_k), backend=self.backend,
                approx=snap.approx)

  def moments(self, queries: str | Sequence[str], top_k: int = DEFAULT_TOP_K,
              per_video: int = moments_lib.DEFAULT_PER_VIDEO) -> list[list[Moment]]:
    """Moments (video, start, end, score, row) best first for each query; distinct moments, at most per_video a
    video (a whole-clip index: its clips, start and end None)."""
    queries, top_k, snap = check_queries(queries), check_top_k(top_k), self.snapshot
    hits = ranked_hits(snap.index, encode_queries(self.model, queries), [top_k] * len(queries), self.backend,
                       snap.approx, per_video=check_per_video(per_video))
    return [as_moments(snap.index, h) for h in hits]

  def more_like(self, row: int, top_k: int = DEFAULT_TOP_K,
                per_video: int = moments_lib.DEFAULT_PER_VIDEO) -> list[Moment]:
    """The moments (or clips) most like row `row` of the index, the row itself (and, for a moment, the windows of
    its video that overlap it) left out."""
    snap = self.snapshot
    if not 0 <= int(row) < snap.index.count:
      raise UsageError(f"row {row} is outside the index's {snap.index.count} rows")
    hits = ranked_hits(snap.index, snap.index.rows([int(row)]), [check_top_k(top_k)], self.backend, snap.approx,
                       per_video=check_per_video(per_video), excludes=[int(row)])
    return as_moments(snap.index, hits[0])


def check_per_video(per_video: int) -> int:
  if isinstance(per_video, bool) or not isinstance(per_video, (int, np.integer)) or per_video < 1:
    raise UsageError(f"--per-video must be an integer >= 1, got {per_video!r}")
  return int(per_video)


def search(index_dir: str | pathlib.Path, queries: str | Sequence[str], top_k: int = DEFAULT_TOP_K, *,
           checkpoint: str | None = None, config: str | None = None, model: RetrievalModel | None = None,
           backend: str = "auto") -> list[Ranking]:
  """[(clip_id, score), ...] best first, one list per query (a single string is one query); one-off use (a
  Searcher keeps the model between calls). Bad input raises UsageError with one sentence."""
  queries, top_k = check_queries(queries), check_top_k(top_k)
  return Searcher(index_dir, checkpoint, config, model=model, backend=backend).search(queries, top_k)
