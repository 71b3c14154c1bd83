"""Approximate search for large indexes: a FAISS IVF index over the rows, its candidates re-scored exactly.

    python -m clipvip_jax.index build-approximate DIR      # -> DIR/approximate/{faiss.index, approximate.json}

Search asks the IVF index for `refine` candidates per query (probing `nprobe` of its `nlist` clusters and scoring
8-bit codes), then reads those rows from the memory-mapped parts and re-scores them exactly, so the returned
scores are the model's own and only the candidate set is approximate. Recall@10 against exact search is measured
when the index is built (queries: index rows plus noise, renormalised) and nprobe is the smallest of NPROBES that
reaches `target_recall`; both are recorded in approximate.json and printed by `info`.

Why FAISS IVF (faiss-cpu) with 8-bit codes: measured on 200k clustered rows of 512 dims on the 2-core machine
(docs/performance.md), after the exact re-scoring the recall was set by nprobe alone (0.858 / 0.895 / 0.932 / 0.954
at nprobe 8 / 16 / 32 / 64 for SQ8, PQ64 and PQ128 alike; at 10M rows PQ64 needs more candidates, which the
build's sweep finds), so the codes mostly decide speed and memory: SQ8
("IVF{nlist},SQ8", 512 bytes a row) trains in seconds (7 s there, against 196 s for PQ64 and 370 s for PQ128)
and is the default below PQ_FROM rows; from there PQ64 (64 bytes a row: 0.7 GB at 10M x 512 instead of 5.1 GB,
and 8x fewer bytes scanned per probe) is worth its fixed training time. HNSW over the rows themselves keeps float
vectors plus a graph in memory (> 20 GB at 10M x 512), more than the 24 GB machine holds beside anything else.
The coarse quantiser is exact (flat): assigning 10M rows to 1024 clusters is one matrix product per chunk.
Inner-product metric: the stored rows are what the model's similarity takes a dot product of.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import time
from typing import Any

import numpy as np

from clipvip_jax.runtime.cli_errors import UsageError

APPROXIMATE_DIR = "approximate"
FAISS_FILE = "faiss.index"
META_FILE = "approximate.json"
NPROBES = (4, 8, 16, 32, 64, 128, 256)
DEFAULT_REFINE = 200  # candidates re-scored exactly per query
DEFAULT_TARGET_RECALL = 0.95
RECALL_QUERIES = 200
TRAIN_PER_LIST = 64  # k-means training rows per cluster (FAISS warns below 39)
PQ_FROM = 2_000_000  # rows from which codes="auto" picks PQ64 over SQ8


def default_nlist(count: int) -> int:
  """~sqrt(N) clusters, a power of two in [16, 1024]; capped so that assigning every row (N x nlist x D
  multiply-adds) stays minutes for 10M rows on 2 cores (pass nlist for more on a bigger machine)."""
  return int(min(1024, max(16, 2 ** round(math.log2(math.sqrt(max(count, 1)))))))


def default_pq(dims: int) -> int:
  """PQ sub-quantisers: 8 dimensions each (64 for D = 512), the largest divisor of D at most D / 8."""
  m = max(1, dims // 8)
  while dims % m:
    m -= 1
  return m


@dataclasses.dataclass
class ApproximateIndex:
  faiss_index: Any
  meta: dict[str, Any]

  def candidates(self, queries: np.ndarray, count: int, nprobe: int | None = None) -> np.ndarray:
    """int64 [B, count] row numbers (-1 where fewer were found), by the quantised scores."""
    import faiss
    params = faiss.SearchParametersIVF(nprobe=int(nprobe or self.meta["nprobe"]))
    _, rows = self.faiss_index.search(np.ascontiguousarray(queries, np.float32), count, params=params)
    return rows


def approximate_dir(index_path: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(index_path) / APPROXIMATE_DIR


def load(index) -> ApproximateIndex | None:
  """The approximate index built for `index` (an EmbeddingIndex), None if there is none; UsageError if it was built
  for other rows (the index was rebuilt since), or its files are damaged or lead outside the index folder.

  faiss.index is read by FAISS's own (C++) reader, which is not written for hostile files: search uses an
  approximate index only where it is asked for or needed (search.Searcher), and docs/security.md says to rebuild
  the one of an index from elsewhere (python -m clipvip_jax.index build-approximate)."""
  from clipvip_jax.retrieval.index_checks import IndexDamaged, exists_inside, inside, is_int, read_json
  folder = approximate_dir(index.path)
  if not exists_inside(index.path, APPROXIMATE_DIR, META_FILE):
    return None
  import faiss
  meta = read_json(inside(index.path, APPROXIMATE_DIR, META_FILE))
  if not isinstance(meta, dict):
    raise IndexDamaged(f"{folder / META_FILE} holds no JSON object")
  for name in ("count", "dims", "nprobe", "refine"):
    if not (is_int(meta.get(name)) and meta[name] >= (0 if name == "count" else 1)):
      raise IndexDamaged(f"{folder / META_FILE}: field {name!r} must be a positive integer, not {meta.get(name)!r}")
  inside(index.path, APPROXIMATE_DIR, FAISS_FILE)
  if meta.get("count") != index.count or meta.get("dims") != index.dims:
    raise UsageError(f"{folder} was built for {meta.get('count')} rows of {meta.get('dims')} dims but the index "
                     f"holds {index.count} of {index.dims}; rebuild it with python -m clipvip_jax.index "
                     "build-approximate")
  return ApproximateIndex(faiss.read_index(str(folder / FAISS_FILE)), meta)


def recall_queries(index, n: int = RECALL_QUERIES, seed: int = 0, noise: float = 0.5) -> np.ndarray:
  """Queries near the data: random rows plus Gaussian noise of `noise` times their norm, renormalised to it."""
  rng = np.random.default_rng(seed)
  rows = np.sort(rng.choice(index.count, size=min(n, index.count), replace=False))
  x = index.rows(rows)
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  x = x + noise * norms * rng.standard_normal(x.shape).astype(np.float32) / math.sqrt(x.shape[1])
  return (x / np.linalg.norm(x, axis=1, keepdims=True) * norms).astype(np.float32)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
  """Mean over queries of |found_i & truth_i| / |truth_i|."""
  return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / max(len(t), 1) for f, t in zip(found, truth)]))


def rescore(index, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Exact (score, row) top k among each query's candidate rows, (score desc, row asc) as exact search orders.
  The candidates of all queries are read from the parts in one gather."""
  valid = candidates >= 0
  unique, where = np.unique(np.where(valid, candidates, 0), return_inverse=True)
  rows = index.rows(unique)
  where = where.reshape(candidates.shape)
  with np.errstate(invalid="ignore", over="ignore"):
    scores = np.einsum("bd,bcd->bc", np.asarray(queries, np.float32), rows[where])
  scores = np.where(valid & np.isfinite(scores), scores, -np.inf).astype(np.float32)  # NaN/Inf rows: never ranked
  cand = np.where(valid, candidates, np.iinfo(np.int64).max)
  order = np.lexsort((cand, -scores), axis=1)[:, :k]
  out_s, out_r = np.take_along_axis(scores, order, axis=1), np.take_along_axis(cand, order, axis=1)
  kk = min(k, int(valid.sum(axis=1).min()))
  out_s, out_r = out_s[:, :kk], out_r[:, :kk].copy()
  out_r[out_s == -np.inf] = -1  # as exact.top_k: a slot no rankable row filled
  return out_s, out_r


def search(approx: ApproximateIndex, index, queries: np.ndarray, k: int, *, refine: int | None = None,
           nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(scores, rows) [B, k]: approximate candidates, exactly re-scored."""
  refine = max(k, int(refine or approx.meta.get("refine", DEFAULT_REFINE)))
  return rescore(index, queries, approx.candidates(queries, refine, nprobe), k)


CODES = ("auto", "sq8", "pq")


def _zero_non_finite(rows: np.ndarray) -> np.ndarray:
  """Rows holding NaN or an infinity set to zero (FAISS's k-means and codes need finite values; exact re-scoring
  of the stored rows then never ranks them)."""
  rows = np.ascontiguousarray(rows, np.float32)
  bad = ~np.isfinite(rows).all(axis=1)
  if bad.any():
    rows[bad] = 0.0
  return rows


def build(index, *, nlist: int | None = None, codes: str = "auto", refine: int = DEFAULT_REFINE,
          target_recall: float = DEFAULT_TARGET_RECALL, train_rows: int | None = None, add_rows: int = 262144,
          seed: int = 0, log=print) -> dict[str, Any]:
  """Trains and fills the IVF index for `index`, measures recall@10 per nprobe, writes DIR/approximate/
  atomically; returns approximate.json's content."""
  import faiss
  if index.count < 2:
    raise UsageError(f"{index.path} holds {index.count} row(s); an approximate index needs more")
  d = index.dims
  nlist = nlist or default_nlist(index.count)
  nlist = min(nlist, max(1, index.count // 39))
  if codes not in CODES:
    raise UsageError(f"--codes {codes!r} is not one of {CODES}")
  if codes == "auto":
    codes = "pq" if index.count >= PQ_FROM else "sq8"
  factory = f"IVF{nlist},{'SQ8' if codes == 'sq8' else f'PQ{default_pq(d)}'}"
  ivf = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
  rng = np.random.default_rng(seed)
  n_train = min(index.count, train_rows or max(nlist * TRAIN_PER_LIST, 65536))
  t0 = time.perf_counter()
  sample = _zero_non_finite(index.rows(np.sort(rng.choice(index.count, size=n_train, replace=False))))
  ivf.train(sample)
  del sample
  log(f"trained {factory} on {n_train} rows in {time.perf_counter() - t0:.0f} s")
  t0 = time.perf_counter()
  for start, chunk in index.chunks(add_rows):
    ivf.add(_zero_non_finite(np.array(chunk, np.float32)))  # NaN/Inf rows: stored as zeros, masked when re-scored
  log(f"added {index.count} rows in {time.perf_counter() - t0:.0f} s")
  return _measure_and_write(index, ivf, {"factory": factory, "nlist": nlist, "codes": codes,
                                         "trained_count": index.count}, refine, target_recall, seed, log)


def update(index, old: ApproximateIndex, first_new_row: int, trained_count: int, *, seed: int = 0,
           log=print) -> dict[str, Any]:
  """The approximate index of `index` from `old`, built for its first `first_new_row` rows: the rows after them
  added to the trained IVF lists (no retraining; clipvip_jax.retrieval.growth says when), recall measured again and
  nprobe chosen again, written to DIR/approximate atomically."""
  import faiss
  if old.faiss_index.ntotal != first_new_row:
    raise ValueError(f"the approximate index holds {old.faiss_index.ntotal} rows, not {first_new_row}")
  ivf = faiss.clone_index(old.faiss_index)
  t0 = time.perf_counter()
  rows = np.arange(first_new_row, index.count)
  for start in range(0, len(rows), 262144):
    ivf.add(_zero_non_finite(index.rows(rows[start:start + 262144])))
  log(f"added {len(rows)} rows to the trained {old.meta['factory']} in {time.perf_counter() - t0:.1f} s")
  keep = {k: old.meta[k] for k in ("factory", "nlist", "codes") if k in old.meta}
  return _measure_and_write(index, ivf, {**keep, "trained_count": trained_count},
                            DEFAULT_REFINE, float(old.meta.get("target_recall", DEFAULT_TARGET_RECALL)), seed, log)


def _measure_and_write(index, ivf, described: dict[str, Any], refine: int, target_recall: float, seed: int,
                       log) -> dict[str, Any]:
  """Recall@10 per (nprobe, refine) against exact search, the smallest nprobe reaching the target; then
  DIR/approximate written atomically. Returns approximate.json's content."""
  import faiss

  from clipvip_jax.retrieval import exact
  from clipvip_jax.files import remove, replace_dir, write_json_atomic
  factory, nlist, codes, d = described["factory"], described["nlist"], described["codes"], index.dims
  queries = recall_queries(index, seed=seed)
  _, truth = exact.top_k(index, queries, 10)
  approx = ApproximateIndex(ivf, {"refine": refine, "factory": factory})
  recalls: dict[tuple[int, int], float] = {}
  chosen = None
  # The smallest nprobe reaching the target; when PQ's ranking loses true neighbours before the re-scoring even
  # with every cluster probed, 2x then 4x more candidates are re-scored (10M clustered rows: recall stops at
  # 0.75 with 200 candidates, docs/performance.md).
  for tried_refine in (refine, 2 * refine, 4 * refine):
    approx.meta["refine"] = tried_refine
    for nprobe in sorted({min(n, nlist) for n in NPROBES}):  # a small index has fewer lists than NPROBES[0]
      _, rows = search(approx, index, queries, 10, nprobe=nprobe)
      recalls[(nprobe, tried_refine)] = recall_at(rows, truth)
      log(f"nprobe {nprobe}, refine {tried_refine}: recall@10 {recalls[(nprobe, tried_refine)]:.3f}")
      if recalls[(nprobe, tried_refine)] >= target_recall:
        chosen = (nprobe, tried_refine)
        break
    if chosen is not None:
      break
  if chosen is None:
    chosen = max(recalls, key=lambda key: (recalls[key], -key[1], -key[0]))
  meta = {"backend": "faiss", "faiss_version": faiss.__version__, "factory": factory, "metric": "inner_product",
          "count": index.count, "dims": d, "nlist": nlist, "codes": codes, "nprobe": chosen[0], "refine": chosen[1],
          "recall_at_10": round(recalls[chosen], 4),
          "recall_by_nprobe_refine": {f"{n},{r}": round(v, 4) for (n, r), v in recalls.items()},
          "recall_queries": "index rows + Gaussian noise (0.5 x norm), renormalised", "target_recall": target_recall,
          "trained_count": described["trained_count"]}
  folder = approximate_dir(index.path)
  tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
  remove(tmp)
  tmp.mkdir()
  try:
    faiss.write_index(ivf, str(tmp / FAISS_FILE))
    write_json_atomic(tmp / META_FILE, meta)
    replace_dir(tmp, folder)
  except BaseException:
    remove(tmp)
    raise
  return meta
