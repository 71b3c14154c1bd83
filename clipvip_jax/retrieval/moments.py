"""Moment results: the windows a search ranks, merged into distinct moments, a few per video.

    hits = merge(index, scores, rows, top_k=10, per_video=3)       # [(row, score), ...] best first

A moment index (encode --window) ranks windows, and the windows around a good moment score almost as well as it:
the windows overlap by half, so a raw top 10 is three or four views of the same few seconds. The rule, temporal
non-maximum suppression per video: hits are taken best first; one is dropped when its span overlaps a moment
already kept in the same video by an IoU above NMS_IOU, or when its video holds `per_video` kept moments already.
NMS_IOU = 0.3 sits just under the IoU of two neighbouring windows at the default stride (half a window: IoU 1/3),
so a neighbour never repeats a kept moment, while windows two strides apart (no overlap) are distinct moments. The
per-video limit keeps one long video from filling the page. A kept moment is a window as encoded (its start and
end), so its score is the model's score of exactly the frames it names.

Merging needs more candidates than results: `candidates` asks for CANDIDATES_PER_RESULT windows a result (the
neighbours that suppression removes), and `merged_top` widens the search until top_k moments are found or every
row was seen. "More like this" for a moment (`exclude`) leaves out the windows of the same video that overlap it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

NMS_IOU = 0.3
DEFAULT_PER_VIDEO = 3
CANDIDATES_PER_RESULT = 8
MAX_WIDENINGS = 2

Hits = list[tuple[int, float]]


def iou(a: tuple[float, float], b: tuple[float, float]) -> float:
  inter = min(a[1], b[1]) - max(a[0], b[0])
  if inter <= 0:
    return 0.0
  return inter / (max(a[1], b[1]) - min(a[0], b[0]))


def candidates(top_k: int, count: int) -> int:
  return min(count, top_k * CANDIDATES_PER_RESULT + 16)


def merge(index, scores: np.ndarray, rows: np.ndarray, top_k: int, per_video: int = DEFAULT_PER_VIDEO,
          exclude: int | None = None) -> Hits:
  """One query's ranked windows (scores, rows best first; row -1: an empty slot) -> at most top_k moments (module
  doc). exclude: a row whose moment is the query (more like this): it and the windows of its video that overlap it
  are left out."""
  rows = np.asarray(rows)
  valid = rows >= 0
  rows, scores = rows[valid], np.asarray(scores)[valid]
  spans = index.spans(rows)
  videos = [index.id(int(r)) for r in rows]
  query = None if exclude is None else (index.id(exclude), index.span(exclude))
  kept: dict[str, list[tuple[float, float]]] = {}
  out: Hits = []
  for row, score, span, video in zip(rows.tolist(), scores.tolist(), map(tuple, spans.tolist()), videos):
    if query is not None and (row == exclude or (video == query[0] and iou(span, query[1]) > 0)):
      continue
    mine = kept.setdefault(video, [])
    if len(mine) >= per_video or any(iou(span, other) > NMS_IOU for other in mine):
      continue
    mine.append(span)
    out.append((row, score))
    if len(out) == top_k:
      break
  return out


def merged_top(index, search: Callable[[int], tuple[np.ndarray, np.ndarray]], top_ks: list[int],
               per_video: int = DEFAULT_PER_VIDEO, excludes: list[int | None] | None = None) -> list[Hits]:
  """merge() for a batch of queries over search(k) -> (scores [B, k], rows [B, k]); k is widened (x4, at most
  MAX_WIDENINGS times) while some query has fewer than its top_k moments and rows remain unranked (a few videos
  with many windows each: the per-video limit leaves fewer moments than asked)."""
  excludes = excludes or [None] * len(top_ks)
  k = candidates(max(top_ks) + 1, index.count)
  for attempt in range(MAX_WIDENINGS + 1):
    scores, rows = search(k)
    hits = [merge(index, s, r, top_k, per_video, ex) for s, r, top_k, ex in zip(scores, rows, top_ks, excludes)]
    if all(len(h) >= t for h, t in zip(hits, top_ks)) or k >= index.count or attempt == MAX_WIDENINGS:
      return hits
    k = min(index.count, k * 4)
  return hits


def recall_at_iou(found: list[list[tuple[str, float, float]]], truths: list[tuple[str, float, float]],
                  ks: tuple[int, ...] = (1, 5), ious: tuple[float, ...] = (0.5, 0.7)) -> dict[str, float]:
  """The moment-retrieval convention: R@k at IoU >= t is the share of queries whose top k results hold a moment of
  the right video that overlaps the true span (video, start, end) by an IoU of at least t. found[i]: query i's
  results (video, start, end), best first; a whole-video result is (video, 0, its length)."""
  out = {}
  for k in ks:
    for t in ious:
      hits = sum(any(video == truth[0] and iou((start, end), truth[1:]) >= t - 1e-9
                     for video, start, end in results[:k]) for results, truth in zip(found, truths))
      out[f"R@{k} IoU>={t:g}"] = hits / max(1, len(truths))
  return out
