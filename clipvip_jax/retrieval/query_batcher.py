"""Queries from concurrent requests, answered by one model call per batch.

    batcher = QueryBatcher(searcher)          # in a running event loop (the server's lifespan)
    hits = await batcher.rank("a dog runs", top_k=10)      # -> [(row, score), ...] best first

Encoding a batch of B queries costs little more than one on CPU or an accelerator (the text tower is tiny beside
the fixed cost of a call), and an exact search scores B queries in the same pass over the rows. So requests are
queued; one worker thread takes everything waiting (up to search.QUERY_BATCH) as one batch, runs the model and
the top-k once, and hands each request its rows; while it runs, the next batch gathers. No timer: a lone request
is answered at once, batches form only under load, which is when they pay. The model and the index are used by
that one thread alone (JAX dispatch and FAISS need no locking then).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import numpy as np

from clipvip_jax.retrieval import search

Hits = list[tuple[int, float]]


@dataclasses.dataclass
class _Request:
  query: str | None  # text query, or None for a clip-to-clip query
  row: int | None
  top_k: int
  future: asyncio.Future
  snapshot: search.Snapshot | None = None  # the index state the request is answered from (None: the current one)


class QueryBatcher:
  """Batches text queries (and clip-to-clip queries) from concurrent requests; counts calls for /api/index."""

  def __init__(self, searcher: search.Searcher, max_batch: int = search.QUERY_BATCH, per_video: int = 3):
    self.searcher, self.max_batch, self.per_video = searcher, max_batch, per_video
    self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="clipvip-search")
    self.queue: asyncio.Queue[_Request] | None = None
    self.worker: asyncio.Task | None = None
    self.model_calls = 0
    self.queries = 0

  def start(self) -> None:
    if self.executor._shutdown:  # pylint: disable=protected-access  (started again after a stop: a new worker)
      self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="clipvip-search")
    self.queue = asyncio.Queue()
    self.worker = asyncio.get_running_loop().create_task(self._serve())

  async def stop(self) -> None:
    if self.worker is not None:
      self.worker.cancel()
      try:
        await self.worker
      except asyncio.CancelledError:
        pass
    self.executor.shutdown(wait=False, cancel_futures=True)

  async def rank(self, query: str, top_k: int, snapshot: search.Snapshot | None = None) -> Hits:
    """The top_k rows for one checked, non-empty query (callers validate: the model sees only valid queries), from
    `snapshot` (the state of the index the caller describes the rows with; default: the searcher's current one)."""
    return await self._submit(_Request(query, None, top_k, asyncio.get_running_loop().create_future(), snapshot))

  async def similar(self, row: int, top_k: int, snapshot: search.Snapshot | None = None) -> Hits:
    """The top_k rows most similar to row `row` (itself left out)."""
    return await self._submit(_Request(None, row, top_k, asyncio.get_running_loop().create_future(), snapshot))

  async def _submit(self, request: _Request) -> Hits:
    if self.queue is None:
      raise RuntimeError("QueryBatcher.start() was not called")
    await self.queue.put(request)
    return await request.future

  async def _serve(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      batch = [await self.queue.get()]
      while len(batch) < self.max_batch and not self.queue.empty():
        batch.append(self.queue.get_nowait())
      batch = [r for r in batch if not r.future.done()]  # a client that went away cancelled its future
      if not batch:
        continue
      try:
        results = await loop.run_in_executor(self.executor, self._run, batch)
      except Exception as e:  # noqa: BLE001 - handed to each waiting request, which answers 500
        for r in batch:
          if not r.future.done():
            r.future.set_exception(e)
        continue
      for r, hits in zip(batch, results):
        if not r.future.done():
          r.future.set_result(hits)

  def _run(self, batch: list[_Request]) -> list[Hits]:
    """In the worker thread: one text-tower call for every text query, one top-k pass for all of them (a pass per
    state of the index, when an index change came between the requests of a batch)."""
    current = self.searcher.snapshot
    groups: dict[int, list[_Request]] = {}
    snapshots: dict[int, search.Snapshot] = {}
    for r in batch:
      snap = r.snapshot or current
      groups.setdefault(id(snap), []).append(r)
      snapshots[id(snap)] = snap
    answers: dict[int, Hits] = {}
    for key, requests in groups.items():
      answers.update(zip(map(id, requests), self._run_on(snapshots[key], requests)))
    return [answers[id(r)] for r in batch]

  def _run_on(self, snap: search.Snapshot, batch: list[_Request]) -> list[Hits]:
    index = snap.index
    texts = [r for r in batch if r.query is not None]
    clips = [r for r in batch if r.query is None]
    vectors = []
    if texts:
      vectors.append(search.encode_queries(self.searcher.model, [r.query for r in texts]))
      self.model_calls += 1
      self.queries += len(texts)
    if clips:
      vectors.append(index.rows([r.row for r in clips]))
    ordered = texts + clips
    # A clip query leaves itself out (and, for a moment, the windows of its video that overlap it); a moment index
    # merges its windows into moments (search.ranked_hits).
    hits = search.ranked_hits(index, np.concatenate(vectors), [r.top_k for r in ordered], self.searcher.backend,
                              snap.approx, per_video=self.per_video, excludes=[r.row for r in ordered])
    answers = {id(r): h for r, h in zip(ordered, hits)}
    return [answers[id(r)] for r in batch]

