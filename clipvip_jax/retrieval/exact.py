"""Exact top-k by dot product over an index's memory-mapped parts, chunk by chunk.

Each chunk of `chunk_rows` rows is scored against every query at once (one matrix product), and only the chunk's
best k per query survive (np.argpartition: linear, no sort of the chunk); those are merged into the running top k.
`threads` workers (default: the usable cores, at most 2) take alternate chunks, each with one BLAS thread: for a few
queries the product is matrix-vector and bound by memory bandwidth, and separate chunks per thread stream memory
without the per-call synchronisation of a multi-threaded BLAS call, which on a loaded machine stalls (1M rows, one
query, load average 7 on the 2 cores: 899 ms with one 2-thread BLAS call per chunk, 191 ms single-threaded).
The process holds at most `threads` chunks' scores ([queries, chunk_rows] float32 each) and, for a float16 index,
as many float32 copies of chunks; the rows themselves stay in the page cache, mapped, not copied.

With an accelerator (jax's default backend is not the CPU; or `on_device=True`), each chunk is copied to the
device, padded to `chunk_rows` rows so that one compiled function serves every chunk, and scored there with
lax.top_k; the host merges the per-chunk results the same way (a query whose k-th best is tied inside a chunk is
re-done on the host from the chunk, so the tie order is the same).

Order is score descending, then row ascending: equal scores rank in index order, as a stable full sort would, and
that holds at the chunk boundary too (every row tied with the k-th best of a chunk is kept for the merge).

A row that holds NaN or an infinity (a damaged or hostile index: encode never writes one) is never ranked: a
non-finite score counts as -inf, and a result slot left with -inf gets row -1, which every caller drops. So a
query over an index with such rows gets fewer than k results rather than a NaN ranking.

Every model's `similarity` here is a dot product of what encode stored (cosine for CLIP/CLIP-ViP/meanP, and for
CLIP2Video the dual-encoder form of its inference logits: clipvip_jax.models.clip2video), so this is exact search
for all of them.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading

import numpy as np

DEFAULT_CHUNK_ROWS = 65536  # 128 MiB of float32 rows at D = 512; the scores of 64 queries add 16 MiB
_NO_ROW = np.iinfo(np.int64).max  # padding rows sort after every real row


def default_threads() -> int:
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
  return max(1, min(2, cores))


def _merge(best_s: np.ndarray, best_r: np.ndarray, new_s: np.ndarray, new_r: np.ndarray,
           k: int) -> tuple[np.ndarray, np.ndarray]:
  """Top k of the union per query (row of the [B, *] arrays), by (score desc, row asc)."""
  s = np.concatenate([best_s, new_s], axis=1)
  r = np.concatenate([best_r, new_r], axis=1)
  order = np.lexsort((r, -s), axis=1)[:, :k]
  return np.take_along_axis(s, order, axis=1), np.take_along_axis(r, order, axis=1)


def _empty(b: int, k: int) -> tuple[np.ndarray, np.ndarray]:
  return np.full((b, k), -np.inf, np.float32), np.full((b, k), _NO_ROW, np.int64)


class _ChunkScorer:
  """A chunk's own top k per query (ties at its k-th best decided by row); a float32 buffer per thread."""

  def __init__(self, queries: np.ndarray, k: int):
    self.queries, self.k = queries, k
    self._local = threading.local()

  def __call__(self, start: int, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k, b = self.k, self.queries.shape[0]
    if chunk.dtype != np.float32:  # float16 parts: one float32 copy of the chunk, reused by this thread
      buffer = getattr(self._local, "buffer", None)
      if buffer is None or buffer.shape != chunk.shape:
        buffer = self._local.buffer = np.empty(chunk.shape, np.float32)
      np.copyto(buffer, chunk, casting="unsafe")
      chunk = buffer
    with np.errstate(invalid="ignore", over="ignore"):
      scores = self.queries @ chunk.T
    finite = np.isfinite(scores)
    if not finite.all():  # NaN/Inf rows (or queries): never ranked
      scores = np.where(finite, scores, -np.inf).astype(np.float32, copy=False)
    c = scores.shape[1]
    cols = np.broadcast_to(np.arange(c), (b, c)) if c <= k else np.argpartition(-scores, k - 1, axis=1)[:, :k]
    cand_s = np.take_along_axis(scores, cols, axis=1)
    best_s, best_r = _merge(*_empty(b, k), cand_s, cols + start, k)
    if c > k:
      # Columns tied with a query's k-th best that argpartition left out: the lowest row numbers must win the
      # tie, so such queries merge every tied column (rare: exact float ties).
      kth = cand_s.min(axis=1)
      for i in np.flatnonzero((scores >= kth[:, None]).sum(axis=1) > k):
        tied = np.flatnonzero(scores[i] >= kth[i])
        row_s, row_r = _merge(*_empty(1, k), scores[i:i + 1, tied], tied[None] + start, k)
        best_s[i], best_r[i] = row_s[0], row_r[0]
    return best_s, best_r


class _DeviceChunkScorer:
  """_ChunkScorer's result computed on the default JAX device (one compiled shape: [chunk_rows, D])."""

  def __init__(self, queries: np.ndarray, k: int, chunk_rows: int):
    import jax
    import jax.numpy as jnp
    self.host, self.k, self.chunk_rows = _ChunkScorer(queries, k), k, chunk_rows
    self.queries = jax.device_put(queries)
    kk = min(k, chunk_rows)

    @jax.jit
    def score(q, chunk, valid):
      scores = jnp.dot(q, chunk.astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
      scores = jnp.where((jnp.arange(chunk.shape[0])[None] < valid) & jnp.isfinite(scores), scores, -jnp.inf)
      values, cols = jax.lax.top_k(scores, kk)
      ties = jnp.sum(scores >= values[:, -1:], axis=1)
      return values, cols, ties

    self._score = score

  def __call__(self, start: int, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = chunk.shape[0]
    if c < self.k:
      return self.host(start, chunk)
    padded = chunk if c == self.chunk_rows else np.concatenate(
        [chunk, np.zeros((self.chunk_rows - c, chunk.shape[1]), chunk.dtype)])
    values, cols, ties = (np.asarray(x) for x in self._score(self.queries, padded, np.int32(c)))
    b = values.shape[0]
    best_s, best_r = _merge(*_empty(b, self.k), values.astype(np.float32), cols.astype(np.int64) + start, self.k)
    tied = np.flatnonzero(ties > self.k)
    if len(tied):  # exact ties at the cut: the host decides them by row, as everywhere else
      host_s, host_r = _ChunkScorer(self.host.queries[tied], self.k)(start, np.asarray(chunk))
      best_s[tied], best_r[tied] = host_s, host_r
    return best_s, best_r


def top_k(index, queries: np.ndarray, k: int, *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
          threads: int | None = None, on_device: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(scores [B, k'] float32, rows [B, k'] int64), k' = min(k, rows in the index), best first; row -1 (score -inf)
  in the slots left when fewer rows could be ranked (non-finite rows are never ranked).

  index: a clipvip_jax.retrieval.index.EmbeddingIndex (anything with `chunks(n)` and `count`).
  queries: [B, D] float32 query embeddings. on_device: score on the JAX default device (None: when it is not
  the CPU).
  """
  from threadpoolctl import threadpool_limits
  queries = np.ascontiguousarray(queries, np.float32)
  if on_device is None:
    import jax
    on_device = jax.default_backend() != "cpu"
  if on_device:
    scorer = _DeviceChunkScorer(queries, k, chunk_rows)
    best_s, best_r = _empty(queries.shape[0], k)
    for start, chunk in index.chunks(chunk_rows):
      best_s, best_r = _merge(best_s, best_r, *scorer(start, chunk), k)
    return _unranked_to_minus_one(best_s, best_r, min(k, index.count))
  threads = threads or default_threads()
  scorer = _ChunkScorer(queries, k)
  best_s, best_r = _empty(queries.shape[0], k)
  with threadpool_limits(1, user_api="blas"):
    if threads == 1:
      for start, chunk in index.chunks(chunk_rows):
        best_s, best_r = _merge(best_s, best_r, *scorer(start, chunk), k)
    else:
      with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        pending = []
        for start, chunk in index.chunks(chunk_rows):
          pending.append(pool.submit(scorer, start, chunk))
          if len(pending) >= threads:  # at most `threads` chunks in flight: memory stays bounded
            best_s, best_r = _merge(best_s, best_r, *pending.pop(0).result(), k)
        for future in pending:
          best_s, best_r = _merge(best_s, best_r, *future.result(), k)
  return _unranked_to_minus_one(best_s, best_r, min(k, index.count))


def _unranked_to_minus_one(best_s: np.ndarray, best_r: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
  """The first kk slots; a slot no rankable row filled (score -inf: only non-finite rows were left) gets row -1."""
  best_s, best_r = best_s[:, :kk], best_r[:, :kk].copy()
  best_r[best_s == -np.inf] = -1
  return best_s, best_r


def reference_top_k(embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The brute-force definition (full matrix, full stable sort) that `top_k` must equal; for tests."""
  scores = np.asarray(queries, np.float32) @ np.asarray(embeddings, np.float32).T
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, order, axis=1), order.astype(np.int64)
