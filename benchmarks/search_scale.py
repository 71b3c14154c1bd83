"""Search latency, memory and recall at 100k / 1M / 10M rows, exact and approximate (issue 14).

    nice python -m benchmarks.search_scale --sizes 100000,1000000,10000000 --work /tmp/search_bench

Data: clustered synthetic embeddings, D = 512 (CLIP-ViP B/32's width): 10,000 cluster centres (random unit
vectors), each row a centre plus Gaussian noise of norm ~0.8, L2-normalised (cos(row, its centre) ~0.78); queries
are fresh draws from the same mixture. Uniformly random rows would make every top-10 a near-tie and no
approximate method meaningful. Each size is written once to --work as a real index (format 2, parts of 1M rows;
float32 up to 1M, float16 at 10M to stay within 10 GB of disk and page cache), generated in chunks.

Per size and backend one fresh subprocess measures (so the peak memory is that configuration's alone):
latency of 1 query and of a batch of 64 (search only: query embeddings given, no text model), p50 and p99 over
--repeats calls after one warm-up; peak memory: VmHWM (resident set including the mapped index pages the search
touched, which are page cache, shared and reclaimable) and the peak anonymous memory (RssAnon sampled every 2 ms:
what the search allocates itself, bounded by a chunk). Approximate: build time (FAISS IVF-SQ8, nprobe chosen for
recall@10 >= 0.95 on index-derived queries), then recall@10 on fresh queries against exact search.
The machine is shared (2 cores): each row gives the spread (min-max) beside p50/p99, and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np

D = 512
CENTRES = 10_000
NOISE = 0.8
PART_ROWS = 1 << 20


def _mixture(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
  x = centres[rng.integers(0, len(centres), n)]
  x += NOISE * rng.standard_normal(x.shape, dtype=np.float32) / np.sqrt(D)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  return x


def _centres(seed: int = 0) -> np.ndarray:
  c = np.random.default_rng(seed).standard_normal((CENTRES, D), dtype=np.float32)
  return c / np.linalg.norm(c, axis=1, keepdims=True)


def make_index(path: pathlib.Path, n: int, dtype: str) -> None:
  """A format-2 index of n synthetic rows, generated part by part (never all in memory)."""
  from clipvip_jax.retrieval import index as index_lib
  if (path / index_lib.INDEX_FILE).is_file():
    return
  staging = path.with_name(f".{path.name}.tmp")
  index_lib.remove(staging)
  staging.mkdir(parents=True)
  centres = _centres()
  names = []
  t0 = time.perf_counter()
  for number, start in enumerate(range(0, n, PART_ROWS)):
    stop = min(start + PART_ROWS, n)
    rng = np.random.default_rng(1000 + number)
    names.append(index_lib.part_name(number))
    index_lib.write_part(staging, names[-1], _mixture(rng, centres, stop - start),
                         [f"clip-{i:08d}" for i in range(start, stop)], None,
                         {"first_input": start, "inputs": stop - start, "skipped": []}, dtype)
    print(f"  {path.name}: {stop}/{n} rows ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
  index_lib.finish_index(staging, {"created_by": "benchmarks.search_scale", "kind": "clipvip",
                                   "checkpoint": "synthetic", "step": None, "modality": "video",
                                   "source": "synthetic clustered", "dims": D, "dtype": dtype, "inputs": n,
                                   "part_size": PART_ROWS}, names)
  index_lib.publish(staging, path)


def _anon_kb() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("RssAnon:"):
        return int(line.split()[1])
  return 0


def _hwm_kb() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1])
  return 0


class AnonPeak:
  """Peak RssAnon while running, sampled in a thread."""

  def __enter__(self):
    self.base, self.peak, self._stop = _anon_kb(), 0, False

    def sample():
      while not self._stop:
        self.peak = max(self.peak, _anon_kb())
        time.sleep(0.002)

    self._thread = threading.Thread(target=sample, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop = True
    self._thread.join()


def _latencies(fn, repeats: int) -> list[float]:
  fn()  # warm-up (page cache, FAISS/BLAS threads)
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    out.append(1e3 * (time.perf_counter() - t0))
  return out


def _summary(ms: list[float]) -> dict[str, float]:
  return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
          "min_ms": float(min(ms)), "max_ms": float(max(ms)), "calls": len(ms)}


def measure_one(path: pathlib.Path, backend: str, repeats: int, batch_repeats: int) -> dict:
  """Runs in its own process: latency for 1 and 64 queries, memory, (approximate) build time and recall."""
  from clipvip_jax.retrieval import approximate, exact
  from clipvip_jax.retrieval.index import read_index
  index = read_index(path)
  rng = np.random.default_rng(7)
  centres = _centres()
  queries = _mixture(rng, centres, 64 + repeats + 100)
  result = {"rows": index.count, "backend": backend, "dtype": index.dtype}
  if backend == "approximate":
    approx = approximate.load(index)
    if approx is None:
      t0 = time.perf_counter()
      approximate.build(index, log=lambda s: print("  " + s, file=sys.stderr, flush=True))
      result["build_s"] = time.perf_counter() - t0
      approx = approximate.load(index)
    result.update({k: approx.meta[k] for k in ("factory", "nprobe", "refine", "recall_at_10")})
    result["recall_at_10_build_queries"] = result.pop("recall_at_10")

    def run(q):
      return approximate.search(approx, index, q, 10)
  else:
    def run(q):
      return exact.top_k(index, q, 10)
  singles = iter(queries[64:64 + repeats + 1])
  with AnonPeak() as peak:
    one = _latencies(lambda: run(next(singles)[None]), repeats)
    batch = _latencies(lambda: run(queries[:64]), batch_repeats)
  result["one"] = _summary(one)
  result["batch64"] = _summary(batch)
  result["peak_anon_mib"] = (peak.peak - peak.base) / 1024
  result["vm_hwm_mib"] = _hwm_kb() / 1024
  if backend == "approximate":
    fresh = queries[-100:]
    _, truth = exact.top_k(index, fresh, 10)
    _, found = run(fresh)
    result["recall_at_10"] = approximate.recall_at(found, truth)
  return result


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sizes", default="100000,1000000,10000000")
  p.add_argument("--backends", default="exact,approximate")
  p.add_argument("--work", default="/tmp/clipvip_search_bench")
  p.add_argument("--repeats", type=int, default=50, help="single-query calls per configuration")
  p.add_argument("--batch-repeats", type=int, default=10, help="batch-of-64 calls per configuration")
  p.add_argument("--out", help="also write the rows as JSON here")
  p.add_argument("--one", nargs=2, metavar=("INDEX", "BACKEND"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.one:
    print(json.dumps(measure_one(pathlib.Path(args.one[0]), args.one[1], args.repeats, args.batch_repeats)))
    return []
  from benchmarks.common import machine_lines
  work = pathlib.Path(args.work)
  work.mkdir(parents=True, exist_ok=True)
  rows = []
  for line in machine_lines(("faiss",)):
    print(line)
  for n in (int(s) for s in args.sizes.split(",")):
    path = work / f"clustered-{n}"
    make_index(path, n, "float32" if n <= 1_000_000 else "float16")
    for backend in args.backends.split(","):
      # Exact search of 10M float16 rows takes seconds per call: fewer calls there.
      repeats, batch_repeats = ((5, 2) if backend == "exact" and n > 2_000_000 else (args.repeats, args.batch_repeats))
      load = os.getloadavg()
      repo = str(pathlib.Path(__file__).resolve().parents[1])
      env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
      done = subprocess.run([sys.executable, "-m", "benchmarks.search_scale", "--one", str(path), backend,
                             "--repeats", str(repeats), "--batch-repeats", str(batch_repeats)],
                            capture_output=True, text=True, env=env, cwd=repo)
      if done.returncode:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"measuring {path} {backend} failed")
      row = json.loads(done.stdout.strip().splitlines()[-1])
      row["load_avg_before"] = [round(x, 2) for x in load]
      row["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
      rows.append(row)
      print(json.dumps(row), flush=True)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
  _print_table(rows)
  return rows


def _print_table(rows: list[dict]) -> None:
  print("\n| rows | dtype | backend | 1 query p50 / p99 (min-max) ms | 64 queries p50 / p99 (min-max) ms | "
        "peak anon MiB | VmHWM MiB | recall@10 |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    def lat(s):
      return f"{s['p50_ms']:.1f} / {s['p99_ms']:.1f} ({s['min_ms']:.1f}-{s['max_ms']:.1f})"
    recall = f"{r['recall_at_10']:.3f}" if "recall_at_10" in r else "1 (exact)"
    backend = r["backend"] + (f" {r['factory']} nprobe {r['nprobe']}" if "factory" in r else "")
    print(f"| {r['rows']:,} | {r['dtype']} | {backend} | "
          f"{lat(r['one'])} | {lat(r['batch64'])} | {r['peak_anon_mib']:.0f} | {r['vm_hwm_mib']:.0f} | {recall} |")


if __name__ == "__main__":
  main()
