"""Load on python -m clipvip_jax.serve: concurrent clients against a large index, loopback only (issue 15).

    nice python -m benchmarks.serve_load --rows 100000 --clients 32 --seconds 30 --work /tmp/serve_bench

Builds (once, in --work) a CLIP-ViP checkpoint of the "tiny" CLIP with random weights and 512-dim embeddings
(CLIP-ViP B/32's width) and an index of --rows random unit rows of 512 dims with ids and captions; starts the real
server command on a free port of 127.0.0.1 in its own process; then --clients threads, each with one keep-alive
connection, send text queries (synthetic captions, drawn at random) to /api/search?top_k=10 as fast as answers
come, for --seconds, and at most --max-requests requests in all (bounded in count and time). Reported: requests/s,
latency p50/p99/max as a client sees it, errors (any non-200 answer or failed request), the server's resident
memory sampled every 0.5 s: VmRSS (start of load, end, peak; it includes the memory-mapped index pages
the search reads) and RssAnon (what the server allocated itself) every 10 s and at the end: flat means no growth per
request, the mean
number of queries per model call (the batching), the CPU model and the load average before and after.

The model is tiny, so the figures measure the service (HTTP, validation, batching, exact top-k over 100k x 512
rows), not a B/32 text tower; the clients share the machine with the server, as a local test must.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
DIMS = 512


def _random_params(kind: str, cfg, seed: int = 0) -> dict[str, np.ndarray]:
  """Every parameter drawn from numpy (LayerNorm gains 1, biases 0, weights N(0, 0.05)): no tracing of the
  model's own initialisers, which takes longer than the benchmark."""
  from clipvip_jax import kinds
  rng = np.random.default_rng(seed)

  def value(key, shape):
    if key == "logit_scale":
      return np.full(shape, 4.6, np.float32)
    if key.endswith("/scale"):
      return np.ones(shape, np.float32)
    if key.endswith("/bias"):
      return np.zeros(shape, np.float32)
    return rng.normal(0.0, 0.05, shape).astype(np.float32)

  return {k: value(k, s) for k, s in kinds.param_shapes(kind, cfg).items()}


def make_checkpoint(path: pathlib.Path) -> pathlib.Path:
  import dataclasses

  from clipvip_jax import converted_checkpoint
  from clipvip_jax.convert.common import Converted
  from clipvip_jax.models import clip, clipvip
  if (path / "config.json").is_file():
    return path
  base = clip.clip_config("tiny")
  cfg = clipvip.CLIPViPConfig(clip=dataclasses.replace(base, projection_dim=DIMS), num_proxies=2, temporal_size=4)
  return converted_checkpoint.save_converted(Converted("clipvip", cfg, _random_params("clipvip", cfg), source="random"),
                                      path)


def make_index(path: pathlib.Path, rows: int, checkpoint: pathlib.Path) -> pathlib.Path:
  from clipvip_jax.retrieval.index import INDEX_FILE, write_index
  if (path / INDEX_FILE).is_file() and json.loads((path / INDEX_FILE).read_text())["count"] == rows:
    return path
  rng = np.random.default_rng(0)
  emb = rng.standard_normal((rows, DIMS), dtype=np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  ids = [f"clip{i:07d}" for i in range(rows)]
  write_index(path, emb, ids, {"created_by": "benchmarks.serve_load", "kind": "clipvip",
                               "checkpoint": str(checkpoint.absolute()), "modality": "video",
                               "source": "random rows"},
              captions=[[f"synthetic clip {i}"] for i in range(rows)], force=True)
  return path


def queries(n: int, seed: int = 0) -> list[str]:
  from data_pipelines import synthetic
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    shape, colour = rng.choice(synthetic.SHAPES), rng.choice(list(synthetic.COLOURS))
    size, speed = rng.choice(list(synthetic.SIZES)), rng.choice(list(synthetic.SPEEDS))
    axis = synthetic.AXES[rng.integers(len(synthetic.AXES))][rng.integers(2)][0]
    out.append(f"a {size} {colour} {shape} moves {axis} {speed} on a {rng.choice(synthetic.BACKGROUNDS)} "
               "background")
  return out


def _memory_kb(pid: int) -> tuple[int, int]:
  """(VmRSS, RssAnon) of a process: resident in all, and what it allocated itself (without the mapped index)."""
  values = {}
  with open(f"/proc/{pid}/status", encoding="utf-8") as f:
    for line in f:
      if line.startswith(("VmRSS:", "RssAnon:")):
        values[line.split(":")[0]] = int(line.split()[1])
  return values["VmRSS"], values["RssAnon"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _get(conn: http.client.HTTPConnection, path: str) -> tuple[int, bytes]:
  conn.request("GET", path)
  response = conn.getresponse()
  return response.status, response.read()


def run_load(port: int, clients: int, seconds: float, max_requests: int, pid: int) -> dict:
  texts = queries(1000)
  latencies: list[list[float]] = [[] for _ in range(clients)]
  errors = [0] * clients
  sent = [0]
  lock = threading.Lock()
  stop_at = time.perf_counter() + seconds

  def client(i: int) -> None:
    rng = np.random.default_rng(100 + i)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    while time.perf_counter() < stop_at:
      with lock:
        if sent[0] >= max_requests:
          break
        sent[0] += 1
      path = "/api/search?" + urllib.parse.urlencode({"q": texts[rng.integers(len(texts))], "top_k": 10})
      t0 = time.perf_counter()
      try:
        status, body = _get(conn, path)
        ok = status == 200 and len(json.loads(body)["results"]) == 10
      except (OSError, http.client.HTTPException, ValueError, KeyError):
        ok = False
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
      latencies[i].append(time.perf_counter() - t0)
      errors[i] += not ok
    conn.close()

  memory: list[tuple[int, int]] = []
  done = threading.Event()

  def sample() -> None:
    while not done.is_set():
      memory.append(_memory_kb(pid))
      done.wait(0.5)

  sampler = threading.Thread(target=sample, daemon=True)
  threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
  t0 = time.perf_counter()
  sampler.start()
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  elapsed = time.perf_counter() - t0
  done.set()
  sampler.join()
  ms = np.array([x for per in latencies for x in per]) * 1e3
  rss = np.array([kb for kb, _ in memory]) / 1024
  anon = np.array([kb for _, kb in memory]) / 1024
  every_10s = [round(float(x), 1) for x in anon[::20]] + [round(float(anon[-1]), 1)]  # samples are 0.5 s apart
  return {"requests": int(ms.size), "seconds": round(elapsed, 1), "requests_per_s": round(ms.size / elapsed, 1),
          "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
          "max_ms": round(float(ms.max()), 1), "errors": int(sum(errors)),
          "rss_mib_start": round(float(rss[0]), 1), "rss_mib_end": round(float(rss[-1]), 1),
          "rss_mib_peak": round(float(rss.max()), 1), "anon_mib_every_10s": every_10s,
          "anon_mib_peak": round(float(anon.max()), 1)}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--rows", type=int, default=100_000)
  p.add_argument("--clients", type=int, default=32)
  p.add_argument("--seconds", type=float, default=30.0)
  p.add_argument("--max-requests", type=int, default=200_000, help="stop after this many requests in all")
  p.add_argument("--work", default="/tmp/serve_bench", help="where the checkpoint and index are made (reused)")
  p.add_argument("--max-batch", type=int, default=64, help="the server's --max-batch (1 = no batching)")
  p.add_argument("--out", help="write the result as JSON here")
  args = p.parse_args(argv)
  from benchmarks.common import cpu_model
  work = pathlib.Path(args.work)
  work.mkdir(parents=True, exist_ok=True)
  checkpoint = make_checkpoint(work / "clipvip-tiny-512")
  index = make_index(work / f"index-{args.rows}", args.rows, checkpoint)
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  server = subprocess.Popen([sys.executable, "-m", "clipvip_jax.serve", "--index", str(index), "--port", str(port),
                             "--backend", "exact", "--max-batch", str(args.max_batch)], cwd=REPO, env=env)
  try:
    deadline = time.time() + 300
    while True:
      if server.poll() is not None:
        raise SystemExit(f"the server exited with status {server.returncode}")
      try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        if _get(conn, "/api/health")[0] == 200:
          conn.close()
          break
      except OSError:
        pass
      if time.time() > deadline:
        raise SystemExit("the server did not answer within 300 s")
      time.sleep(0.5)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for text in queries(8, seed=1):  # warm: the first batch shapes compile here, not under load
      _get(conn, "/api/search?" + urllib.parse.urlencode({"q": text, "top_k": 10}))
    before = json.loads(_get(conn, "/api/index")[1])["served"]
    conn.close()  # idle for the whole run: the server would close it (keep-alive timeout)
    load_before = os.getloadavg()
    result = run_load(port, args.clients, args.seconds, args.max_requests, server.pid)
    load_after = os.getloadavg()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    after = json.loads(_get(conn, "/api/index")[1])["served"]
    conn.close()
  finally:
    server.terminate()
    try:
      server.wait(30)
    except subprocess.TimeoutExpired:
      server.kill()
  calls = after["model_calls"] - before["model_calls"]
  result.update({"rows": args.rows, "dims": DIMS, "clients": args.clients, "max_batch": args.max_batch,
                 "queries_per_model_call":
                 round((after["queries"] - before["queries"]) / max(calls, 1), 2), "cpu": cpu_model(),
                 "cores": os.cpu_count(), "load_before": [round(x, 2) for x in load_before],
                 "load_after": [round(x, 2) for x in load_after]})
  print(json.dumps(result, indent=1))
  if args.out:
    tmp = pathlib.Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, args.out)
  return result


if __name__ == "__main__":
  main()
