"""Text-video retrieval metrics on the host (numpy): R@1/5/10, MdR, MnR for both directions, with and without DSL.

Protocols, all from one similarity matrix `sim` [N_text, N_video]:
- single caption (MSR-VTT 1k-A, LSMDC) and paragraph (DiDeMo, ActivityNet: one joined paragraph per video):
  square `sim`, text i belongs to video i; t2v ranks the videos for each text, v2t the texts for each video;
- multi caption (MSVD, VATEX): `text_to_video[i]` is the video of caption i. Every caption is a t2v query.
  For v2t each video is scored against each *video's caption set* by the max over its captions, and the
  correct set is its own (CLIP2Video's `tensor_video_to_text_sim` followed by `compute_metrics`), so v2t
  has N_video queries over N_video candidates.

Tie rule (`ties="expand"`, the default) reproduces the originals' `compute_metrics` (CLIP-ViP
`utils/metrics.py` for both its single and multi protocols; CLIP4Clip and CLIP2Video `metrics.py`): they sort
each row of -sim, and take *every* position whose value equals the correct item's score. A query whose
correct item ties with t-1 others (t items with that score, r items strictly better) therefore contributes
t ranks r, r+1, ..., r+t-1 instead of one, and every statistic is taken over the pooled ranks (R@K divides
by their total count, not by the number of queries). Without ties every query has exactly one rank r (the
number of strictly greater scores) and all rules agree. Two one-rank-per-query alternatives are offered:
`"optimistic"` (rank r) and `"pessimistic"` (rank r+t-1). CLIP2Video's multi-caption t2v path instead uses a
double `torch.argsort`, whose order among ties is unspecified; "expand" is used there too.
NaN scores raise (the originals silently drop a query whose correct score is NaN).

Memory: no row is sorted. For each query only the number of strictly greater and of equal scores is
counted, block by block, so 30k texts x 10k videos needs the matrix plus one block of temporaries; the
ranks go into a histogram over candidate positions, from which R@K, the median and the mean are exact.
"""

from collections.abc import Iterator

import numpy as np

TIE_RULES = ("expand", "optimistic", "pessimistic")
RECALL_KS = (1, 5, 10)
DIRECTIONS = ("t2v", "v2t")


def _check_sim(sim: np.ndarray) -> np.ndarray:
  sim = np.asarray(sim)
  if sim.ndim != 2 or 0 in sim.shape:
    raise ValueError(f"sim must be a non-empty [N_text, N_video] matrix, got shape {sim.shape}")
  if not np.issubdtype(sim.dtype, np.floating):
    sim = sim.astype(np.float64)
  return sim


def _check_text_to_video(text_to_video: np.ndarray | None, n_text: int, n_video: int) -> np.ndarray:
  """Video index of every text; the identity (single caption or paragraph protocol) when None."""
  if text_to_video is None:
    if n_text != n_video:
      raise ValueError(f"sim is {n_text} texts x {n_video} videos: a non-square matrix needs text_to_video "
                       "(the video index of every text)")
    return np.arange(n_text)
  labels = np.asarray(text_to_video)
  if labels.shape != (n_text,) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"text_to_video must be {n_text} integer video indices, got {labels.dtype} {labels.shape}")
  if labels.min() < 0 or labels.max() >= n_video:
    raise ValueError(f"text_to_video holds indices outside [0, {n_video}): min {labels.min()}, max {labels.max()}")
  without_text = np.setdiff1d(np.arange(n_video), labels)
  if without_text.size:
    raise ValueError(f"text_to_video: {without_text.size} videos have no text (first: {without_text[:5].tolist()}); "
                     "video-to-text retrieval needs at least one text per video")
  return labels


def _blocks(n: int, size: int) -> Iterator[slice]:
  for start in range(0, n, size):
    yield slice(start, min(start + size, n))


def _raise_on_nan(block: np.ndarray, what: str) -> None:
  if np.isnan(block).any():
    raise ValueError(f"sim has NaN scores ({what}); check the embeddings for NaN")


class _RankHistogram:
  """Pooled ranks as counts per candidate position; each query adds ranks [first, first + count)."""

  def __init__(self, n_candidates: int, ties: str):
    if ties not in TIE_RULES:
      raise ValueError(f"ties must be one of {TIE_RULES}, got {ties!r}")
    self.ties = ties
    self.delta = np.zeros(n_candidates + 1, np.int64)

  def add(self, greater: np.ndarray, equal: np.ndarray) -> None:
    """`greater`, `equal`: per query, the candidates scoring above and equal to the correct one (itself included)."""
    if self.ties == "expand":
      first, count = greater, equal
    elif self.ties == "optimistic":
      first, count = greater, np.ones_like(greater)
    else:
      first, count = greater + equal - 1, np.ones_like(greater)
    size = self.delta.size
    self.delta += np.bincount(first, minlength=size)[:size]
    self.delta -= np.bincount(first + count, minlength=size)[:size]

  def metrics(self) -> dict[str, float]:
    counts = np.cumsum(self.delta[:-1])
    total = int(counts.sum())
    cumulative = np.cumsum(counts)

    def pooled_rank(i: int) -> int:  # the i-th smallest pooled rank
      return int(np.searchsorted(cumulative, i, side="right"))

    if total % 2:
      median = float(pooled_rank(total // 2))
    else:
      median = 0.5 * (pooled_rank(total // 2 - 1) + pooled_rank(total // 2))
    result = {f"R@{k}": 100.0 * float(counts[:k].sum()) / total for k in RECALL_KS}
    result["MdR"] = median + 1.0
    result["MnR"] = float(np.dot(counts, np.arange(counts.size, dtype=np.float64))) / total + 1.0
    return result


def _text_to_video_histogram(sim: np.ndarray, labels: np.ndarray, ties: str, chunk_size: int) -> _RankHistogram:
  """Every text is a query over the videos (rows of `sim`)."""
  hist = _RankHistogram(sim.shape[1], ties)
  for rows in _blocks(sim.shape[0], chunk_size):
    block = sim[rows]
    _raise_on_nan(block, f"texts {rows.start}..{rows.stop - 1}")
    target = block[np.arange(block.shape[0]), labels[rows]][:, None]
    hist.add((block > target).sum(axis=1), (block == target).sum(axis=1))
  return hist


def _video_to_text_histogram(sim: np.ndarray, labels: np.ndarray, single: bool, ties: str,
                             chunk_size: int) -> _RankHistogram:
  """Every video is a query over the caption sets (columns of `sim`; a set scores the max over its captions)."""
  n_video = sim.shape[1]
  hist = _RankHistogram(n_video, ties)
  if not single:
    order = np.argsort(labels, kind="stable")
    set_starts = np.flatnonzero(np.r_[True, np.diff(labels[order]) != 0])
  for cols in _blocks(n_video, chunk_size):
    block = sim[:, cols]
    _raise_on_nan(block, f"videos {cols.start}..{cols.stop - 1}")
    if not single:  # [N_video sets, chunk]: row g = max over the captions of video g
      block = np.maximum.reduceat(block[order], set_starts, axis=0)
    own = np.arange(cols.start, cols.stop)
    target = block[own, np.arange(own.size)][None, :]
    hist.add((block > target).sum(axis=0), (block == target).sum(axis=0))
  return hist


def retrieval_metrics(sim: np.ndarray, text_to_video: np.ndarray | None = None, *, ties: str = "expand",
                      chunk_size: int = 1024) -> dict[str, float]:
  """R@1, R@5, R@10 (percent), MdR = median(rank) + 1, MnR = mean(rank) + 1, text-to-video and video-to-text.

  Args:
    sim: [N_text, N_video] similarity (higher = more similar), e.g. raw cosine as CLIP-ViP evaluates.
    text_to_video: [N_text] video index of each text for the multi-caption protocol; None for the
      single-caption and paragraph protocols (square `sim`, text i <-> video i).
    ties: "expand" (the originals' rule, see the module docstring), "optimistic" or "pessimistic".
    chunk_size: texts (t2v) or videos (v2t) scored per block; bounds the temporary memory.

  Returns:
    {"t2v/R@1", "t2v/R@5", "t2v/R@10", "t2v/MdR", "t2v/MnR", and the same under "v2t/"}: floats.
  """
  sim = _check_sim(sim)
  single = text_to_video is None
  labels = _check_text_to_video(text_to_video, *sim.shape)
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  histograms = {
      "t2v": _text_to_video_histogram(sim, labels, ties, chunk_size),
      "v2t": _video_to_text_histogram(sim, labels, single, ties, chunk_size),
  }
  return {f"{direction}/{name}": value
          for direction, hist in histograms.items() for name, value in hist.metrics().items()}


def dual_softmax_host(sim: np.ndarray, temperature: float = 100.0, chunk_size: int = 1024) -> np.ndarray:
  """DSL on the host: sim * softmax(temperature * sim, axis=0) (over texts, per video), CLIP-ViP's `np_softmax`.

  Computed in `sim`'s floating dtype (float32 for float32 features, as the original), video block by video
  block. Equals `clipvip_jax.losses.dual_softmax`, which is the on-device version.
  """
  sim = _check_sim(sim)
  out = np.empty_like(sim)
  for cols in _blocks(sim.shape[1], chunk_size):
    scaled = sim[:, cols] * sim.dtype.type(temperature)
    weights = np.exp(scaled - scaled.max(axis=0, keepdims=True))
    out[:, cols] = sim[:, cols] * (weights / weights.sum(axis=0, keepdims=True))
  return out


def with_dual_softmax(sim: np.ndarray, text_to_video: np.ndarray | None = None, *, temperature: float = 100.0,
                      ties: str = "expand", chunk_size: int = 1024) -> dict[str, float]:
  """`retrieval_metrics` of `sim` and of its DSL re-scoring, as CLIP-ViP reports both ("simple" and "DSL").

  Returns the keys of `retrieval_metrics` for the raw scores, and the same prefixed "dsl_" ("dsl_t2v/R@1", ...).
  """
  raw = retrieval_metrics(sim, text_to_video, ties=ties, chunk_size=chunk_size)
  dsl = retrieval_metrics(dual_softmax_host(sim, temperature, chunk_size), text_to_video, ties=ties,
                          chunk_size=chunk_size)
  return {**raw, **{f"dsl_{key}": value for key, value in dsl.items()}}
