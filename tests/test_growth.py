"""A growing index (issue 24): encode --append and index delete give what a rebuild gives, atomically for readers
(a concurrent reader sees the old or the new index, never a mixture or an error), an interrupted append leaves the
old index served and a relaunch finishes it, another model is refused, the approximate index follows its rule, and
the running service picks a changed index up under load with no failed request."""

from __future__ import annotations

import pathlib
import shutil
import threading

import numpy as np
import pytest

import retrieval_helpers as rh
from retrieval_helpers import checkpoint, model  # noqa: F401 (pytest fixtures)
from clipvip_jax import encode
from clipvip_jax import index as index_command
from clipvip_jax.retrieval import approximate, exact, indexer, search, verify
from clipvip_jax.retrieval.index import read_index

FRAMES = (20, 24, 28, 18, 22)  # at 4 fps: 5-7 s videos, cut into 2 s windows every 1 s


def _videos(folder: pathlib.Path, numbers) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  for i in numbers:
    rh.write_video(folder / f"v{i}.mp4", frames=FRAMES[i], seed=10 + i)
  return folder


def _argv(checkpoint, videos, out, *extra):
  return ["--checkpoint", str(checkpoint), "--videos", str(videos), "--out", str(out), "--window", "2", "--quiet",
          *extra]


def _rows(out) -> dict[tuple[str, float, float], np.ndarray]:
  """Every row by (video, start, end): what a search can return, whatever the row order."""
  index = read_index(out)
  return {(index.id(r), *index.span(r)): e for r, e in enumerate(index.embeddings())}


def _same_rows(a, b):
  a, b = _rows(a), _rows(b)
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], atol=1e-5)


def _moments(searcher):
  return [(m.video, m.start, m.end, round(m.score, 5)) for m in searcher.moments(["a red circle"], top_k=20)[0]]


class _Reader(threading.Thread):
  """Opens the index again and again and ranks every row for one query, recording what it saw."""

  def __init__(self, out: pathlib.Path, query: np.ndarray):
    super().__init__(daemon=True)
    self.out, self.query, self.seen, self.errors = out, query, set(), []
    self.stop = threading.Event()

  def run(self):
    while not self.stop.is_set():
      try:
        index = read_index(self.out)
        scores, rows = exact.top_k(index, self.query[None], index.count)
        self.seen.add(tuple((index.id(r), index.span(r), round(float(s), 5)) for s, r in zip(scores[0], rows[0])))
      except Exception as e:  # noqa: BLE001 - any failure of a reader is what the test looks for
        self.errors.append(repr(e))


def _snapshot(out, query):
  index = read_index(out)
  scores, rows = exact.top_k(index, query[None], index.count)
  return tuple((index.id(r), index.span(r), round(float(s), 5)) for s, r in zip(scores[0], rows[0]))


@pytest.fixture(scope="module")
def grown(checkpoint, tmp_path_factory):
  """v0-v2 encoded, then v3-v4 appended (a reader running throughout the append); and the full rebuild of v0-v4."""
  root = tmp_path_factory.mktemp("grow")
  videos = _videos(root / "videos", range(3))
  out = root / "idx"
  assert encode.main(_argv(checkpoint, videos, out)) == 0
  query = np.asarray(read_index(out).embeddings()[0])
  before = _snapshot(out, query)
  _videos(videos, range(3, 5))
  reader = _Reader(out, query)
  reader.start()
  assert encode.main(_argv(checkpoint, videos, out, "--append")) == 0
  reader.stop.set()
  reader.join()
  full = root / "full"
  assert encode.main(_argv(checkpoint, videos, full)) == 0
  return {"root": root, "videos": videos, "out": out, "full": full, "reader": reader, "before": before,
          "query": query}


def test_append_gives_what_a_rebuild_on_the_union_gives(grown, model):
  _same_rows(grown["out"], grown["full"])
  assert _moments(search.Searcher(grown["out"], model=model)) == _moments(search.Searcher(grown["full"], model=model))
  index = read_index(grown["out"])
  assert [p.name for p in index.parts] == ["part-00000", "part-00001"] and index.meta["generation"] == 1
  assert verify.verify_index(grown["out"]).ok
  # The old part is the very same file (linked, not re-encoded or copied).
  assert (grown["out"] / "parts/part-00000/embeddings.npy").stat().st_nlink >= 1
  # The reader saw the old index or the new one, nothing else, and never failed.
  assert grown["reader"].errors == []
  assert grown["reader"].seen <= {grown["before"], _snapshot(grown["out"], grown["query"])}


def test_a_finished_append_re_run_is_a_no_op(grown, checkpoint, capsys):
  before = {p: p.read_bytes() for p in sorted(grown["out"].rglob("*")) if p.is_file()}
  capsys.readouterr()
  assert encode.main(_argv(checkpoint, grown["videos"], grown["out"], "--append")) == 0
  assert "is complete" in capsys.readouterr().out
  assert {p: p.read_bytes() for p in sorted(grown["out"].rglob("*")) if p.is_file()} == before


def test_an_append_with_another_model_or_options_is_refused(grown, tmp_path, capsys):
  other = rh.write_tiny_clipvip(tmp_path / "other", seed=3)
  before = {p: p.read_bytes() for p in sorted(grown["out"].rglob("*")) if p.is_file()}
  for argv in (_argv(other, grown["videos"], grown["out"], "--append"),
               _argv(rh.write_tiny_clipvip(tmp_path / "again"), grown["videos"], grown["out"], "--append")[:-3]
               + ["--window", "3", "--quiet", "--append"]):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
      encode.main(argv)
    assert exc.value.code == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert "--append" in line and "refused" in line
  assert {p: p.read_bytes() for p in sorted(grown["out"].rglob("*")) if p.is_file()} == before


def test_delete_gives_what_a_rebuild_without_gives(grown, checkpoint, model, tmp_path):
  out = tmp_path / "idx"
  shutil.copytree(grown["out"], out)
  reader = _Reader(out, grown["query"])
  before = _snapshot(out, grown["query"])
  reader.start()
  assert index_command.main(["delete", str(out), "--id", "v1"]) == 0
  reader.stop.set()
  reader.join()
  without = _videos(tmp_path / "without", (0, 2, 3, 4))
  rebuilt = tmp_path / "rebuilt"
  assert encode.main(_argv(checkpoint, without, rebuilt)) == 0
  _same_rows(out, rebuilt)
  assert _moments(search.Searcher(out, model=model)) == _moments(search.Searcher(rebuilt, model=model))
  assert reader.errors == [] and reader.seen <= {before, _snapshot(out, grown["query"])}
  index = read_index(out)
  assert index.meta["deleted"] == ["v1"] and verify.verify_index(out).ok
  # A vanished file: its rows go; the deleted id does not come back with the next append.
  videos = tmp_path / "videos"
  shutil.copytree(grown["videos"], videos)
  index.meta["source"] = str(videos)
  (videos / "v3.mp4").unlink()
  meta_path = out / "index.json"
  import json
  meta = json.loads(meta_path.read_text())
  meta["source"] = str(videos.absolute())
  meta_path.write_text(json.dumps(meta))
  assert index_command.main(["delete", str(out), "--vanished"]) == 0
  assert sorted(set(read_index(out).ids)) == ["v0", "v2", "v4"]


def test_an_interrupted_append_keeps_the_old_index_and_a_relaunch_finishes_it(checkpoint, model, tmp_path,
                                                                              monkeypatch):
  videos = _videos(tmp_path / "videos", range(2))
  out = tmp_path / "idx"
  assert encode.main(_argv(checkpoint, videos, out, "--part-size", "1")) == 0
  old = _rows(out)
  _videos(videos, range(2, 5))
  encoded = []
  finite_only = indexer._finite_only  # pylint: disable=protected-access

  def killed_after_one_part(rows):
    encoded.append(rows.ids[0])
    if len(encoded) == 2:
      raise KeyboardInterrupt  # the kill: after one new part was written
    return finite_only(rows)

  monkeypatch.setattr(indexer, "_finite_only", killed_after_one_part)
  with pytest.raises(SystemExit):
    encode.main(_argv(checkpoint, videos, out, "--append", "--part-size", "1"))
  assert _rows(out).keys() == old.keys()  # the old index, whole, still what readers open
  assert search.Searcher(out, model=model).moments(["a dog"], top_k=3)[0]
  encoded.clear()
  monkeypatch.setattr(indexer, "_finite_only", lambda rows: encoded.append(rows.ids[0]) or finite_only(rows))
  assert encode.main(_argv(checkpoint, videos, out, "--append", "--part-size", "1")) == 0
  assert encoded == ["v3", "v4"]  # v2's part was kept from the interrupted run
  full = tmp_path / "full"
  assert encode.main(_argv(checkpoint, videos, full)) == 0
  _same_rows(out, full)


def test_the_approximate_index_is_updated_then_rebuilt_by_its_rule(checkpoint, tmp_path):
  videos = _videos(tmp_path / "videos", range(3))
  out = tmp_path / "idx"
  assert encode.main(_argv(checkpoint, videos, out)) == 0
  approximate.build(read_index(out), log=lambda line: None)
  trained = read_index(out).count
  _videos(videos, (3,))
  assert encode.main(_argv(checkpoint, videos, out, "--append")) == 0
  meta = approximate.load(read_index(out)).meta
  assert meta["count"] == read_index(out).count and meta["trained_count"] == trained  # rows added, not retrained
  assert 0 <= meta["recall_at_10"] <= 1
  _videos(videos, (4,))  # past REBUILD_GROWTH x the rows it was trained on? not yet: still an update
  assert index_command.main(["delete", str(out), "--id", "v0"]) == 0  # rows shift: rebuilt
  meta = approximate.load(read_index(out)).meta
  assert meta["count"] == read_index(out).count == meta["trained_count"]


@pytest.mark.slow
def test_the_service_serves_a_changed_index_under_load_without_a_failed_request(checkpoint, model, tmp_path):
  from fastapi.testclient import TestClient
  from clipvip_jax.retrieval import service
  videos = _videos(tmp_path / "videos", range(3))
  out = tmp_path / "idx"
  assert encode.main(_argv(checkpoint, videos, out)) == 0
  first = read_index(out).count
  searcher = search.Searcher(out, model=model)
  statuses, stop = [], threading.Event()
  with TestClient(service.create_app(searcher), raise_server_exceptions=False) as client:
    def load():
      while not stop.is_set():
        for address in ("/api/search?q=a+red+circle&top_k=5", "/api/similar?row=1&top_k=5", "/api/clip?row=0",
                        "/thumbnails/0.jpg"):
          statuses.append(client.get(address).status_code)

    workers = [threading.Thread(target=load) for _ in range(3)]
    for w in workers:
      w.start()
    _videos(videos, range(3, 5))
    assert encode.main(_argv(checkpoint, videos, out, "--append")) == 0
    assert index_command.main(["delete", str(out), "--id", "v0"]) == 0
    stop.set()
    for w in workers:
      w.join()
    info = client.get("/api/index").json()
  assert statuses and set(statuses) == {200}
  assert info["rows"] == read_index(out).count != first and info["generation"] == 2


def test_the_growth_benchmark_runs_small(tmp_path):
  from benchmarks import index_growth
  result = index_growth.run_size(2000, tmp_path, repeats=1, windows_per_s=100.0, faiss=False)
  assert result["appended"] == 20 and read_index(tmp_path / "grown-2000").count == 2020
  assert result["rebuild_with_encode_s"] > 20 and all(t[0] > 0 for k, t in result.items() if k.endswith("_s")
                                                        and isinstance(t, tuple))
