"""Exact top-k by dot product over an index's memory-mapped parts, chunk by chunk.

Each chunk of `chunk_rows` rows is scored against every query at once (one matrix product), and only the chunk's
best k per query survive (np.argpartition: linear, no sort of the chunk); those are merged into the running top k.
The process never holds more than one chunk's scores ([queries, chunk_rows] float32) and, for a float16 index, one
float32 copy of the chunk; the rows themselves stay in the page cache, mapped, not copied.

Order is score descending, then row ascending: equal scores rank in index order, as a stable full sort would, and
that holds at the chunk boundary too (every row tied with the k-th best of a chunk is kept for the merge).

Every model's `similarity` here is a dot product of what encode stored (cosine for CLIP/CLIP-ViP/meanP, and for
CLIP2Video the dual-encoder form of its inference logits: clipvip_jax.models.clip2video), so this is exact search
for all of them.
"""

from __future__ import annotations

import numpy as np

DEFAULT_CHUNK_ROWS = 65536  # 128 MiB of float32 rows at D = 512; the scores of 64 queries add 16 MiB
# Up to this many queries the product is a matrix-vector one, bound by memory bandwidth: one BLAS thread reads as
# fast as two, and on a loaded machine OpenBLAS's threads wait for each other at every call (1M rows, one query,
# load average 7 on 2 cores: 899 ms with 2 threads, 191 ms with 1; docs/performance.md).
SINGLE_THREAD_QUERIES = 8


_NO_ROW = np.iinfo(np.int64).max  # padding rows sort after every real row


def _merge(best_s: np.ndarray, best_r: np.ndarray, new_s: np.ndarray, new_r: np.ndarray,
           k: int) -> tuple[np.ndarray, np.ndarray]:
  """Top k of the union per query (row of the [B, *] arrays), by (score desc, row asc)."""
  s = np.concatenate([best_s, new_s], axis=1)
  r = np.concatenate([best_r, new_r], axis=1)
  order = np.lexsort((r, -s), axis=1)[:, :k]
  return np.take_along_axis(s, order, axis=1), np.take_along_axis(r, order, axis=1)


def top_k(index, queries: np.ndarray, k: int, *, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[np.ndarray,
                                                                                              np.ndarray]:
  """(scores [B, k'] float32, rows [B, k'] int64), k' = min(k, rows in the index), best first.

  index: a clipvip_jax.retrieval.index.EmbeddingIndex (anything with `chunks(n)` and `count`).
  queries: [B, D] float32 query embeddings.
  """
  from threadpoolctl import threadpool_limits
  queries = np.ascontiguousarray(queries, np.float32)
  b = queries.shape[0]
  with threadpool_limits(1 if b <= SINGLE_THREAD_QUERIES else None, user_api="blas"):
    return _top_k(index, queries, k, chunk_rows)


def _top_k(index, queries: np.ndarray, k: int, chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
  b = queries.shape[0]
  best_s = np.full((b, k), -np.inf, np.float32)
  best_r = np.full((b, k), _NO_ROW, np.int64)
  buffer = None
  for start, chunk in index.chunks(chunk_rows):
    if chunk.dtype != np.float32:  # float16 parts: one float32 copy of the chunk, reused
      if buffer is None or buffer.shape[0] < chunk.shape[0]:
        buffer = np.empty((chunk.shape[0], chunk.shape[1]), np.float32)
      np.copyto(buffer[:chunk.shape[0]], chunk, casting="unsafe")
      chunk = buffer[:chunk.shape[0]]
    scores = queries @ chunk.T
    c = scores.shape[1]
    if c <= k:
      cols = np.broadcast_to(np.arange(c), (b, c))
    else:
      cols = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    cand_s = np.take_along_axis(scores, cols, axis=1)
    merged_s, merged_r = _merge(best_s, best_r, cand_s, cols + start, k)
    if c > k:
      # Rows tied with a query's k-th best of this chunk that argpartition left out: the lowest row numbers
      # must win the tie, so such queries merge every tied column (rare: exact float ties).
      kth = cand_s.min(axis=1)
      for i in np.flatnonzero((scores >= kth[:, None]).sum(axis=1) > k):
        tied = np.flatnonzero(scores[i] >= kth[i])
        row_s, row_r = _merge(best_s[i:i + 1], best_r[i:i + 1], scores[i:i + 1, tied], tied[None] + start, k)
        merged_s[i], merged_r[i] = row_s[0], row_r[0]
    best_s, best_r = merged_s, merged_r
  kk = min(k, index.count)
  return best_s[:, :kk], best_r[:, :kk]


def reference_top_k(embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The brute-force definition (full matrix, full stable sort) that `top_k` must equal; for tests."""
  scores = np.asarray(queries, np.float32) @ np.asarray(embeddings, np.float32).T
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, order, axis=1), order.astype(np.int64)
