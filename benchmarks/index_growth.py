"""A growing moment index at 100k and 1M rows: append against a full rebuild, and moment search latency.

    nice python -m benchmarks.index_growth --sizes 100000,1000000 --work /tmp/growth_bench --windows-per-s 60

Data: synthetic moment indexes (D = 512, float32, parts of 65,536 rows), rows drawn as in search_scale (clustered
unit vectors), 100 windows a video with 8 s windows every 4 s. For each size N:
  append      growth.append_rows of N/100 new rows (one new part): link the old parts, write the new part and
              index.json, publish by one exchange; the approximate index is not built (its update is timed below)
  rebuild     index.write_index of the N + N/100 rows from memory: the write side of a rebuild alone; a real
              rebuild also re-encodes every row, estimated as (N + N/100) / --windows-per-s (the encode rate
              measured with benchmarks.moment_retrieval / encode --window, docs/performance.md section 10)
  search      moment search of one query (exact top candidates + merging: search.ranked_hits) against the
              whole-clip ranking of the same rows (exact top-k only), p50 over --repeats after a warm-up
  faiss       (--faiss) approximate.build over the N rows against approximate.update adding N/100 rows
Each figure is the median of --repeats runs with (min-max); the machine is shared, so the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import sys
import time

import numpy as np

D = 512
PART_ROWS = 65_536
WINDOWS_PER_VIDEO = 100


def _rows(rng, centres, n):
  x = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, D)).astype(np.float32) * (0.8 / D ** 0.5)
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _moment_rows(first_video: int, n: int):
  videos = first_video + np.arange(n) // WINDOWS_PER_VIDEO
  k = np.arange(n) % WINDOWS_PER_VIDEO
  spans = np.stack([k * 4.0, k * 4.0 + 8.0], axis=1)
  return [f"video{v:07d}" for v in videos], spans


def _meta():
  return {"created_by": "benchmarks.index_growth", "kind": "clipvip", "checkpoint": "synthetic",
          "modality": "video", "windows": {"window": 8.0, "stride": 4.0}}


def _timed(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), min(times), max(times)


def run_size(n: int, work: pathlib.Path, repeats: int, windows_per_s: float, faiss: bool) -> dict:
  from clipvip_jax.retrieval import approximate, exact, growth, search
  from clipvip_jax.retrieval.index import read_index, write_index
  rng = np.random.default_rng(0)
  centres = _rows(rng, rng.standard_normal((10_000, D)).astype(np.float32), 10_000)
  rows = _rows(rng, centres, n)
  ids, spans = _moment_rows(0, n)
  added = max(1, n // 100)
  new_rows = _rows(rng, centres, added)
  new_ids, new_spans = _moment_rows(n // WINDOWS_PER_VIDEO + 1, added)
  base = work / f"base-{n}"
  if not base.exists():
    write_index(base, rows, ids, _meta(), part_rows=PART_ROWS, spans=spans)
  out = work / f"grown-{n}"

  def append():
    if out.exists():
      shutil.rmtree(out)
    shutil.copytree(base, out, copy_function=__import__("os").link)  # a fresh base, sharing the files
    growth.append_rows(out, new_rows, new_ids, spans=new_spans, log=lambda line: None)

  def rebuild():
    write_index(work / f"rebuilt-{n}", np.concatenate([rows, new_rows]), ids + new_ids, _meta(),
                part_rows=PART_ROWS, spans=np.concatenate([spans, new_spans]), force=True)

  result = {"rows": n, "appended": added, "append_s": _timed(append, repeats),
            "rebuild_write_s": _timed(rebuild, repeats)}
  result["rebuild_with_encode_s"] = result["rebuild_write_s"][0] + (n + added) / windows_per_s
  index = read_index(out)
  query = _rows(rng, centres, 1)
  search.ranked_hits(index, query, [10])
  result["moment_search_s"] = _timed(lambda: search.ranked_hits(index, query, [10]), repeats)
  result["clip_search_s"] = _timed(lambda: exact.top_k(index, query, 10), repeats)
  if faiss:
    base_index = read_index(base)
    result["faiss_build_s"] = _timed(lambda: approximate.build(base_index, log=lambda line: None), 1)
    old = approximate.load(base_index)
    result["faiss_update_s"] = _timed(
        lambda: approximate.update(index, old, n, n, log=lambda line: None), 1)
    result["faiss_recall_after_update"] = approximate.load(index).meta["recall_at_10"]
  return result


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", default="100000,1000000")
  p.add_argument("--work", required=True)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--windows-per-s", type=float, required=True,
                 help="encode --window's measured rate, for the rebuild estimate")
  p.add_argument("--faiss", action="store_true")
  args = p.parse_args(argv)
  from benchmarks.common import machine_lines
  work = pathlib.Path(args.work)
  work.mkdir(parents=True, exist_ok=True)
  print("\n".join(machine_lines()))
  results = []
  for n in map(int, args.sizes.split(",")):
    results.append(run_size(n, work, args.repeats, args.windows_per_s, args.faiss))
    print(json.dumps(results[-1]), flush=True)

  def fmt(t):
    return f"{t[0]:.3f} ({t[1]:.3f}-{t[2]:.3f})"

  print("| rows | appended | append s | rebuild write s | rebuild with encode s (est.) | moment search 1 query s "
        "| whole-clip top-10 s |")
  print("|---|---|---|---|---|---|---|")
  for r in results:
    print(f"| {r['rows']} | {r['appended']} | {fmt(r['append_s'])} | {fmt(r['rebuild_write_s'])} | "
          f"{r['rebuild_with_encode_s']:.0f} | {fmt(r['moment_search_s'])} | {fmt(r['clip_search_s'])} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
