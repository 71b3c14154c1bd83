"""Moments (issue 24): encode --window cuts videos into windows (rows carrying video, start, end), decoded once; the
merging rule; moment search in the library, the search command and the service; a finished encode re-run is a
no-op (issue 26 item 8)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

import retrieval_helpers as rh
from retrieval_helpers import checkpoint, model, shards  # noqa: F401 (pytest fixtures)
from clipvip_jax import encode
from clipvip_jax import search as search_command
from clipvip_jax.retrieval import moments, search, verify, windows
from clipvip_jax.retrieval.index import read_index
from clipvip_jax.retrieval.video_files import load_video

LONG_FRAMES, SHORT_FRAMES = 41, 6  # at 4 fps: 10.25 s (not a multiple of the stride) and 1.5 s (under a window)


def _tree(folder: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _exit_line(capsys, call) -> str:
  with pytest.raises(SystemExit) as exc:
    call()
  assert exc.value.code == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1, lines
  return lines[0]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> pathlib.Path:
  folder = tmp_path_factory.mktemp("videos")
  rh.write_video(folder / "long.mp4", frames=LONG_FRAMES, seed=1)
  rh.write_video(folder / "short.mp4", frames=SHORT_FRAMES, seed=2)
  return folder


@pytest.fixture(scope="module")
def moment_index(checkpoint, videos, tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("indexes") / "moments"
  assert encode.main(["--checkpoint", str(checkpoint), "--videos", str(videos), "--out", str(out), "--window", "4",
                      "--stride", "2", "--batch-size", "4", "--quiet"]) == 0
  return out


# ------------------------------------------------------------------------------------------------ the windows


@pytest.mark.parametrize("duration, window, stride, expected", [
    (8.0, 4.0, 2.0, [(0, 4), (2, 6), (4, 8)]),                           # a multiple of the stride
    (10.25, 4.0, 2.0, [(0, 4), (2, 6), (4, 8), (6, 10), (6.25, 10.25)]),  # not: one more window, flush with the end
    (9.0, 4.0, 4.0, [(0, 4), (4, 8), (5, 9)]),                           # stride = window: no overlap but the tail
    (1.5, 4.0, 2.0, [(0, 1.5)]),                                         # shorter than a window: the whole video
    (4.0, 4.0, 2.0, [(0, 4)]),
])
def test_windows_cover_each_video_as_stated(duration, window, stride, expected):
  spans = windows.window_spans(duration, window, stride)
  assert spans == [(float(s), float(e)) for s, e in expected]
  assert spans[0][0] == 0 and spans[-1][1] == pytest.approx(duration)
  assert all(e <= duration + 1e-9 for _, e in spans)
  assert all(b[0] <= a[1] for a, b in zip(spans, spans[1:]))  # no gap between consecutive windows
  if duration > window:
    assert all(e - s == pytest.approx(window) for s, e in spans)


@pytest.mark.parametrize("window, stride, words", [(4, 0, "--stride must be"), (0, 1, "--window must be"),
                                                   (2, 3, "would leave gaps"), (float("nan"), 1, "--window")])
def test_bad_windows_are_refused(window, stride, words):
  with pytest.raises(ValueError, match=words):
    windows.check_window(window, stride)


def test_each_video_is_decoded_once_in_order(model, videos, monkeypatch):
  from data_pipelines import video_io
  passes = []
  original = video_io.FrameStream.__iter__

  def counted(self):
    passes.append(self.path)
    yield from original(self)

  monkeypatch.setattr(video_io.FrameStream, "__iter__", counted)
  cut = list(windows.video_windows(videos / "long.mp4", model.recipe, 5.0, 4.0, 2.0))
  assert passes == [str(videos / "long.mp4")]
  assert [(s, e) for s, e, _, _ in cut] == windows.window_spans(LONG_FRAMES / 4, 4.0, 2.0)
  for _, _, video, mask in cut:  # 16 frames in a 4 s window: every slot of the 4-frame model filled
    assert video.shape == (4, 32, 32, 3) and mask.tolist() == [1, 1, 1, 1]
  # A video shorter than the window is one window: exactly the model input a whole-clip encode gives it.
  (start, end, video, mask), = windows.video_windows(videos / "short.mp4", model.recipe, 5.0, 4.0, 2.0)
  whole, whole_mask = load_video(videos / "short.mp4", model.recipe, 5.0)
  assert (start, end) == (0.0, SHORT_FRAMES / 4)
  np.testing.assert_array_equal(video, whole)
  np.testing.assert_array_equal(mask, whole_mask)


# ------------------------------------------------------------------------------------------------ encode


def test_encode_window_writes_moment_rows(moment_index, model, videos):
  index = read_index(moment_index)
  spans = windows.window_spans(LONG_FRAMES / 4, 4.0, 2.0)
  assert index.moments and index.meta["windows"] == {"window": 4.0, "stride": 2.0}
  assert index.ids == ["long"] * len(spans) + ["short"]
  assert [index.span(r) for r in range(index.count)] == spans + [(0.0, SHORT_FRAMES / 4)]
  # The short video's row is its whole-clip embedding.
  video, mask = load_video(videos / "short.mp4", model.recipe, 5.0)
  np.testing.assert_allclose(index.embeddings()[-1], np.asarray(model.encode_video(video[None], mask[None]))[0],
                             atol=1e-5)
  report = verify.verify_index(moment_index)
  assert report.ok and not report.notes[:0], report.problems
  from clipvip_jax.retrieval.thumbnails import Thumbnails
  strips = Thumbnails(moment_index, index.count)
  assert all(strips.strip(r) for r in range(index.count))  # each moment has its own strip


def test_a_finished_encode_re_run_exits_0_with_the_index_unchanged(moment_index, checkpoint, videos, capsys):
  before = _tree(moment_index)
  argv = ["--checkpoint", str(checkpoint), "--videos", str(videos), "--out", str(moment_index), "--window", "4",
          "--stride", "2", "--batch-size", "4", "--quiet"]
  capsys.readouterr()
  assert encode.main(argv) == 0
  assert "is complete" in capsys.readouterr().out
  assert _tree(moment_index) == before
  # Other options into the same --out: refused, naming what differs, the index untouched.
  line = _exit_line(capsys, lambda: encode.main(argv[:-5] + ["--stride", "1", "--quiet"]))
  assert "already exists" in line and "window" in line and "stride" in line
  assert _tree(moment_index) == before


def test_a_finished_text_encode_re_run_exits_0(checkpoint, tmp_path, capsys):
  texts = tmp_path / "q.txt"
  texts.write_text("a red circle\na blue square\n")
  argv = ["--checkpoint", str(checkpoint), "--texts", str(texts), "--out", str(tmp_path / "q"), "--quiet"]
  assert encode.main(argv) == 0
  before = _tree(tmp_path / "q")
  assert encode.main(argv) == 0 and "is complete" in capsys.readouterr().out
  assert _tree(tmp_path / "q") == before


@pytest.mark.parametrize("extra, words", [
    (["--window", "30"], "longer than every video"),
    (["--window", "4", "--stride", "0"], "--stride must be"),
    (["--window", "4", "--stride", "8"], "would leave gaps"),
    (["--window", "soon"], "not a number of seconds"),
    (["--stride", "2"], "--stride goes with --window"),
])
def test_bad_windows_get_one_sentence_and_nothing_written(checkpoint, videos, tmp_path, capsys, extra, words):
  out = tmp_path / "idx"
  line = _exit_line(capsys, lambda: encode.main(["--checkpoint", str(checkpoint), "--videos", str(videos), "--out",
                                                 str(out), "--quiet", *extra]))
  assert words in line
  assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ merging


class _Spans:
  """A stand-in index for the merging rule: ids and spans by row."""

  def __init__(self, rows):
    self.rows_ = rows
    self.count = len(rows)

  def id(self, row):
    return self.rows_[row][0]

  def span(self, row):
    return self.rows_[row][1:]

  def spans(self, rows):
    return np.asarray([self.rows_[r][1:] for r in rows], np.float64).reshape(-1, 2)


def test_merging_keeps_distinct_moments_and_limits_each_video():
  index = _Spans([("a", 0, 4), ("a", 2, 6), ("a", 4, 8), ("a", 6, 10), ("a", 8, 12), ("a", 10, 14), ("b", 0, 4),
                  ("a", 12, 16)])
  ranked = np.array([1, 2, 0, 3, 6, 5, 4, 7, -1])  # the windows around a's 2-6 s score best
  scores = -np.arange(len(ranked), dtype=np.float64)
  hits = moments.merge(index, scores, ranked, top_k=10, per_video=2)
  # 2-6 kept; 4-8 and 0-4 overlap it by IoU 1/3 (> 0.3): dropped; 6-10 does not overlap it: kept; then a is full.
  assert [r for r, _ in hits] == [1, 3, 6]
  assert moments.merge(index, scores, ranked, top_k=1)[0][0] == 1
  # More like row 1 (a, 2-6): itself and every window of a overlapping it are left out.
  like = moments.merge(index, scores, ranked, top_k=10, per_video=3, exclude=1)
  assert [r for r, _ in like] == [3, 6, 5]


def test_recall_at_iou_is_the_moment_retrieval_convention():
  found = [[("a", 0, 4), ("a", 4, 8)], [("b", 1, 5)], [("a", 0, 4)]]
  truths = [("a", 4, 8), ("b", 0, 4), ("c", 0, 4)]
  scores = moments.recall_at_iou(found, truths)
  assert scores["R@1 IoU>=0.5"] == pytest.approx(1 / 3)  # query 2: IoU 3/5 = 0.6
  assert scores["R@1 IoU>=0.7"] == 0
  assert scores["R@5 IoU>=0.5"] == pytest.approx(2 / 3) and scores["R@5 IoU>=0.7"] == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------------------ search


def test_moment_search_in_the_library_and_the_command(moment_index, model, capsys):
  searcher = search.Searcher(moment_index, model=model)
  found, = searcher.moments(["a red circle moves left"], top_k=10, per_video=2)
  assert [m.video for m in found].count("long") == 2 and [m.video for m in found].count("short") == 1
  index = searcher.index
  for m in found:
    assert (m.start, m.end) == index.span(m.row) and m.video == index.id(m.row)
  # The scores are the model's, best first.
  ids, mask = model.tokenize(["a red circle moves left"])
  direct = np.asarray(model.similarity(model.encode_text(ids, mask), index.embeddings()))[0]
  assert [m.score for m in found] == pytest.approx([float(direct[m.row]) for m in found], abs=1e-5)
  assert found[0].score == pytest.approx(float(direct.max()), abs=1e-5)
  like = searcher.more_like(0, top_k=10)
  assert all(not (m.video == "long" and m.start < 4.0) for m in like)  # overlapping the query moment: left out
  capsys.readouterr()
  assert search_command.main(["--index", str(moment_index), "a red circle moves left", "--json",
                              "--per-video", "2"]) == 0
  results = json.loads(capsys.readouterr().out)[0]["results"]
  assert [(r["id"], r["start"], r["end"]) for r in results] == [(m.video, m.start, m.end) for m in found]


def test_ground_truth_moments_are_found_on_long_synthetic_videos(checkpoint, model, shards, tmp_path):
  """The benchmark's rule, smaller: 8 synthetic clips (one of each time-reversed pair: a random model hardly tells
  twins apart) concatenated 3-5 a video (2 s each at 4 fps); each clip, encoded alone, is the query (a random model
  reads no captions); its true span must be the top moment."""
  from benchmarks.moment_retrieval import write_frames_video, write_long_videos
  from data_pipelines import manifest, shard_writer, video_io
  truths = write_long_videos(shards, "train", tmp_path / "long", clips=(3, 5), seed=1, every=2)
  out = tmp_path / "idx"
  # The model's default window (0.5 s a frame: 2 s for 4 frames) and stride.
  assert encode.main(["--checkpoint", str(checkpoint), "--videos", str(tmp_path / "long"), "--out", str(out),
                      "--window", "--quiet"]) == 0
  searcher = search.Searcher(out, model=model)
  records = {r.clip_id: r for p in manifest.shard_paths(str(shards), "train") for r in shard_writer.read_records(p)}
  queries = []
  for truth in truths:
    write_frames_video(tmp_path / "q.mp4", [video_io.decode_jpeg(f) for f in records[truth["clip"]].frames], 4.0)
    video, mask = load_video(tmp_path / "q.mp4", model.recipe, 5.0)
    queries.append(np.asarray(model.encode_video(video[None], mask[None]))[0])
  hits = search.ranked_hits(searcher.index, np.stack(queries), [5] * len(truths))
  found = [[(m.video, m.start, m.end) for m in search.as_moments(searcher.index, h)] for h in hits]
  scores = moments.recall_at_iou(found, [(t["video"], t["start"], t["end"]) for t in truths])
  assert scores["R@1 IoU>=0.5"] >= 0.9, scores


# ------------------------------------------------------------------------------------------------ the service


def _client(searcher, **options):
  from fastapi.testclient import TestClient
  from clipvip_jax.retrieval import service
  return TestClient(service.create_app(searcher, **options), raise_server_exceptions=False)


def test_the_service_gives_moments_and_opens_videos_only_inside_its_roots(moment_index, model, videos, tmp_path):
  searcher = search.Searcher(moment_index, model=model)
  with _client(searcher) as client:
    body = client.get("/api/search", params={"q": "a red circle", "top_k": 5}).json()
    assert client.get("/api/index").json()["moments"] is True
    for hit in body["results"]:
      assert (hit["start"], hit["end"]) == searcher.index.span(hit["row"])
      assert hit["duration"] == {"long": LONG_FRAMES / 4, "short": SHORT_FRAMES / 4}[hit["id"]]
      assert hit["video"] is None  # no video root declared: the page shows frames only
    similar = client.get("/api/similar", params={"row": 1, "top_k": 5}).json()
    assert similar["clip"]["row"] == 1 and similar["clip"]["start"] == 2.0
    assert all(not (h["id"] == "long" and h["start"] < 6.0) for h in similar["results"])  # overlaps 2-6: out
    refused = client.get("/video/0")
    assert refused.status_code == 403 and "--video-root" in refused.json()["error"]
  with _client(searcher, video_roots=[videos]) as client:
    hit = client.get("/api/clip", params={"row": 2}).json()
    assert hit["video"] == "/video/2#t=4,8"
    served = client.get("/video/2")
    assert served.status_code == 200 and served.content == (videos / "long.mp4").read_bytes()
    assert client.get("/video/2", headers={"Range": "bytes=0-9"}).status_code == 206  # a player can seek
    assert client.get("/video/99").status_code == 404
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  with _client(searcher, video_roots=[elsewhere]) as client:
    refused = client.get("/video/2")
    assert refused.status_code == 403 and "outside the folders" in refused.json()["error"]
    assert client.get("/api/clip", params={"row": 2}).json()["video"] is None


def test_a_hostile_id_cannot_reach_a_file_outside_the_roots(checkpoint, videos, tmp_path, model):
  from clipvip_jax.retrieval.index import write_index
  secret = tmp_path / "secret.mp4"
  secret.write_bytes(b"not for you")
  root = tmp_path / "root"
  root.mkdir()
  out = write_index(tmp_path / "idx", np.ones((2, 32), np.float32) / np.sqrt(32), ["../secret", "../secret.mp4"],
                    {"created_by": "tests", "kind": "clipvip", "checkpoint": str(checkpoint), "modality": "video",
                     "source": str(root)})
  with _client(search.Searcher(out, model=model), video_roots=[root]) as client:
    for row in (0, 1):
      response = client.get(f"/video/{row}")
      assert response.status_code == 403 and b"not for you" not in response.content


# ------------------------------------------------------------------------------------------------ untrusted fields


def _small_moment_index(path: pathlib.Path) -> pathlib.Path:
  from clipvip_jax.retrieval.index import write_index
  return write_index(path, np.eye(3, 4, dtype=np.float32), ["a", "a", "b"],
                     {"created_by": "tests", "kind": "clipvip", "checkpoint": "x", "modality": "video",
                      "windows": {"window": 4.0, "stride": 2.0}},
                     spans=np.array([[0, 4], [2, 6], [0, 1.5]]))


@pytest.mark.parametrize("field, value, words", [
    ("windows", {"window": 4, "stride": 8}, "field 'windows'"), ("windows", "8s", "field 'windows'"),
    ("generation", -1, "field 'generation'"), ("deleted", "a", "field 'deleted'"), ("deleted", [1], "field 'deleted'"),
])
def test_new_index_fields_are_checked_as_untrusted_input(tmp_path, field, value, words):
  from clipvip_jax.retrieval.index_checks import IndexDamaged
  out = _small_moment_index(tmp_path / "idx")
  meta = json.loads((out / "index.json").read_text())
  meta[field] = value
  (out / "index.json").write_text(json.dumps(meta))
  with pytest.raises(IndexDamaged, match=words):
    read_index(out)
  assert any(words in p for p in verify.verify_index(out).problems)


@pytest.mark.parametrize("spans, words", [
    (np.array([[0, 4], [6, 2], [0, 1.5]]), "row 1 has the span"), (np.array([[0, 4], [2, np.nan], [0, 1]]), "row 1"),
    (np.array([[-1.0, 4], [2, 6], [0, 1]]), "row 0"), (np.zeros((2, 2)), "3 rows"),
    (np.zeros((3, 2), np.float32), "float64"),
])
def test_damaged_spans_are_refused_naming_the_file(tmp_path, spans, words):
  from clipvip_jax.retrieval.index_checks import IndexDamaged
  out = _small_moment_index(tmp_path / "idx")
  np.save(out / "parts/part-00000/spans.npy", spans)
  with pytest.raises(IndexDamaged, match=words) as exc:
    read_index(out)
  assert "spans.npy" in str(exc.value)
  assert not verify.verify_index(out).ok
  (out / "parts/part-00000/spans.npy").unlink()
  with pytest.raises(IndexDamaged, match="spans.npy is missing"):
    read_index(out)


@pytest.mark.slow
def test_the_page_shows_moments_with_their_time_and_opens_the_video_there(moment_index, videos, tmp_path):
  """The page on a moment index in headless Chromium: each result's time range, its place on the video's time line,
  the link that opens the video at the moment (served: --video-root), and a moment opened from its row."""
  import urllib.request

  from selenium.webdriver.common.by import By
  from selenium.webdriver.common.keys import Keys
  from selenium.webdriver.support.ui import WebDriverWait
  from test_serve import _chromium, _server
  index = read_index(moment_index)
  with _server(moment_index, "--video-root", str(videos)) as url:
    browser = _chromium(tmp_path)
    try:
      wait = WebDriverWait(browser, 60)
      browser.get(url + "/")
      browser.find_element(By.ID, "query").send_keys("a red circle", Keys.ENTER)
      wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results .card")) > 0)
      card = browser.find_elements(By.CSS_SELECTOR, "#results .card")[0]
      row = int(card.get_attribute("data-row"))
      start, end = index.span(row)
      duration = max(index.span(r)[1] for r in range(index.count) if index.id(r) == index.id(row))
      assert card.find_element(By.CLASS_NAME, "time-range").text == f"0:{start:04.1f}-0:{end:04.1f}"
      mark = card.find_element(By.CLASS_NAME, "timeline-mark")
      assert float(mark.value_of_css_property("left")[:-2]) > 0 or start == 0
      assert browser.execute_script("return arguments[0].style.left", mark) == f"{100 * start / duration:.2f}%"
      link = card.find_element(By.CLASS_NAME, "open-video").get_attribute("href")
      assert link.endswith(f"/video/{row}#t={start:g},{end:g}")
      with urllib.request.urlopen(link.split("#")[0], timeout=10) as response:
        assert response.read() == (videos / f"{index.id(row)}.mp4").read_bytes()
      card.find_element(By.CLASS_NAME, "clip-id").click()
      wait.until(lambda b: b.find_element(By.ID, "detail").is_displayed() and
                 len(b.find_elements(By.CSS_SELECTOR, "#detail-moment .time-range")) > 0)
      assert f"row={row}" in browser.current_url
      assert browser.find_element(By.CSS_SELECTOR, "#detail-moment .time-range").text == \
          f"0:{start:04.1f}-0:{end:04.1f}"
    finally:
      browser.quit()
