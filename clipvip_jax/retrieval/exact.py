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


def _merge(best_s: np.ndarray, best_r: np.ndarray, new_s: np.ndarray, new_r: np.ndarray,
           k: int) -> tuple[np.ndarray, np.ndarray]:
  """Top k of the union, by (score desc, row asc), for one query."""
  s = np.concatenate([best_s, new_s])
  r = np.concatenate([best_r, new_r])
  order = np.lexsort((r, -s))[:k]
  return s[order], r[order]


def _chunk_candidates(scores: np.ndarray, k: int) -> list[np.ndarray]:
  """Per query, the columns of `scores` [B, c] that can be in its top k: the k best and every column tied with the
  k-th best (so ties at the cut are decided by row number in the merge, not by argpartition's arbitrary pick)."""
  c = scores.shape[1]
  if c <= k:
    return [np.arange(c)] * scores.shape[0]
  part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
  kth = np.take_along_axis(scores, part, axis=1).min(axis=1)
  ties = (scores >= kth[:, None]).sum(axis=1)
  return [part[i] if ties[i] == k else np.flatnonzero(scores[i] >= kth[i]) for i in range(scores.shape[0])]


def top_k(index, queries: np.ndarray, k: int, *, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> tuple[np.ndarray,
                                                                                              np.ndarray]:
  """(scores [B, k'] float32, rows [B, k'] int64), k' = min(k, rows in the index), best first.

  index: a clipvip_jax.retrieval.index.EmbeddingIndex (anything with `chunks(n)` and `dims`).
  queries: [B, D] float32 query embeddings.
  """
  queries = np.ascontiguousarray(queries, np.float32)
  b = queries.shape[0]
  best_s = [np.zeros(0, np.float32) for _ in range(b)]
  best_r = [np.zeros(0, np.int64) for _ in range(b)]
  buffer = None
  for start, chunk in index.chunks(chunk_rows):
    if chunk.dtype != np.float32:  # float16 parts: one float32 copy of the chunk, reused
      if buffer is None or buffer.shape[0] < chunk.shape[0]:
        buffer = np.empty((chunk.shape[0], chunk.shape[1]), np.float32)
      np.copyto(buffer[:chunk.shape[0]], chunk, casting="unsafe")
      chunk = buffer[:chunk.shape[0]]
    scores = queries @ chunk.T
    for i, cols in enumerate(_chunk_candidates(scores, k)):
      best_s[i], best_r[i] = _merge(best_s[i], best_r[i], scores[i, cols], cols.astype(np.int64) + start, k)
  kk = min((len(s) for s in best_s), default=0)
  return (np.stack([s[:kk] for s in best_s]).astype(np.float32, copy=False) if b else np.zeros((0, 0), np.float32),
          np.stack([r[:kk] for r in best_r]) if b else np.zeros((0, 0), np.int64))


def reference_top_k(embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """The brute-force definition (full matrix, full stable sort) that `top_k` must equal; for tests."""
  scores = np.asarray(queries, np.float32) @ np.asarray(embeddings, np.float32).T
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, order, axis=1), order.astype(np.int64)
