"""python -m clipvip_jax.serve: the JSON API against the library's search, its refusals, thumbnails, and the page in
a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium; CI installs both).

The index is built from the synthetic shards' train split with a tiny random CLIP-ViP; its rows are the model's
own text embeddings of each clip's first caption, so typing a caption finds its clip first whatever the random
weights (the page and the API are under test here, not the model; test_encode_search covers encoding).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

import retrieval_helpers as rh
from retrieval_helpers import checkpoint, client, index_dir, model, searcher, shards  # noqa: F401 (pytest fixtures)
from clipvip_jax.retrieval import search, service, thumbnails
from clipvip_jax.retrieval.index import read_index

REPO = pathlib.Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "images" / "serve.png"
WRITE_SCREENSHOT_ENV = "CLIPVIP_WRITE_SCREENSHOT"


def test_search_ranks_as_the_library(client, searcher):
  index = searcher.index
  for row in (0, 7, 15):
    query = index.captions(row)[0]
    body = client.get("/api/search", params={"q": query, "top_k": 5}).json()
    assert body["query"] == query and body["top_k"] == 5
    (expected,) = searcher.search(query, top_k=5)
    assert [(hit["id"], hit["score"]) for hit in body["results"]] == \
        [(clip_id, pytest.approx(score, abs=1e-5)) for clip_id, score in expected]
    first = body["results"][0]
    assert first["id"] == index.id(row) and first["rank"] == 1 and first["captions"] == index.captions(row)
    assert first["thumbnail"] == f"/thumbnails/{row}.jpg"


def test_concurrent_queries_share_model_calls_and_keep_their_rankings(client, searcher):
  import concurrent.futures
  queries = [searcher.index.captions(r)[0] for r in range(12)]
  calls_before = client.get("/api/index").json()["served"]
  with concurrent.futures.ThreadPoolExecutor(12) as pool:
    bodies = list(pool.map(lambda q: client.get("/api/search", params={"q": q, "top_k": 3}).json(), queries))
  for row, body in enumerate(bodies):
    assert body["results"][0]["id"] == searcher.index.id(row)
  served = client.get("/api/index").json()["served"]
  assert served["queries"] - calls_before["queries"] == 12
  assert served["model_calls"] - calls_before["model_calls"] <= 12


def test_similar_clips_leave_the_clip_out_and_rank_by_its_embedding(client, searcher):
  index = searcher.index
  clip_id = index.id(3)
  body = client.get("/api/similar", params={"id": clip_id, "top_k": 4}).json()
  assert body["clip"]["id"] == clip_id and len(body["results"]) == 4
  rows = index.embeddings()
  scores = rows @ rows[3]
  scores[3] = -np.inf
  assert [hit["id"] for hit in body["results"]] == [index.id(r) for r in np.argsort(-scores, kind="stable")[:4]]
  assert client.get("/api/clip", params={"id": clip_id}).json()["captions"] == index.captions(3)


def test_health_info_openapi_page_and_thumbnail(client, searcher):
  assert client.get("/api/health").json() == {"status": "ok"}
  info = client.get("/api/index").json()
  assert info["rows"] == searcher.index.count == 16 and info["thumbnails"] is True
  paths = client.get("/openapi.json").json()["paths"]
  assert {"/api/search", "/api/similar", "/api/clip", "/api/health", "/api/index"} <= set(paths)
  page = client.get("/")
  assert page.status_code == 200 and "search-form" in page.text
  image = client.get("/thumbnails/0.jpg")
  assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
  from PIL import Image
  import io
  strip = Image.open(io.BytesIO(image.content))
  assert strip.width == thumbnails.STRIP_FRAMES * strip.height  # six square synthetic frames side by side


@pytest.mark.parametrize("path", [
    "/thumbnails/../index.json", "/thumbnails/..%2Findex.json", "/thumbnails/%2e%2e%2fparts",
    "/thumbnails/%252e%252e%252findex.json", "/static/..%2F..%2Fserve.py", "/static/%2Fetc%2Fpasswd",
    "/thumbnails/..\\index.json", "//etc/passwd", "/static/../../../../etc/passwd", "/thumbnails/-1.jpg",
    "/thumbnails/99.jpg", "/thumbnails/index.json", "/static/__init__.py", "/parts/part-00000/ids.utf8",
    "/index.json"])
def test_path_names_outside_what_is_served_get_4xx(client, path):
  response = client.get(path)
  assert 400 <= response.status_code < 500, path
  body = response.json()
  assert set(body) == {"error"} and "\n" not in body["error"] and "Traceback" not in body["error"]


@pytest.mark.parametrize("clip_id", ["../../etc/passwd", "/etc/passwd", "..", "a/../b", "..\\x", "C:\\x",
                                     "%2e%2e%2fx", "no such clip"])
def test_clip_names_that_are_paths_or_unknown_get_4xx(client, clip_id):
  for route in ("/api/similar", "/api/clip"):
    response = client.get(route, params={"id": clip_id})
    assert response.status_code in (400, 404), (route, clip_id)
    assert set(response.json()) == {"error"}


def test_bad_queries_get_4xx_and_never_reach_the_model(client):
  before = client.get("/api/index").json()["served"]
  for params in ({"q": ""}, {"q": "   "}, {}, {"q": "x" * (service.MAX_QUERY_CHARS + 1)},
                 {"q": "a dog", "top_k": 0}, {"q": "a dog", "top_k": service.MAX_TOP_K + 1},
                 {"q": "a dog", "top_k": "ten"}, {"q": "a\x00dog"}):
    response = client.get("/api/search", params=params)
    assert response.status_code == 400, params
    error = response.json()["error"]
    assert error and "\n" not in error and "Traceback" not in error
  assert client.get("/api/search", params={"q": "a dog"}, headers={}).status_code == 200
  after = client.get("/api/index").json()["served"]
  assert after["queries"] - before["queries"] == 1  # only the valid one was encoded
  assert client.post("/api/search", json={"q": "x"}).status_code == 405
  assert client.get("/api/nothing").json() == {"error": "there is nothing at this address"}


def test_encode_writes_thumbnails_for_shards_and_videos(checkpoint, shards, tmp_path):
  from clipvip_jax import encode
  out = tmp_path / "shards_index"
  assert encode.main(["--checkpoint", str(checkpoint), "--shards", str(shards), "--split", "test",
                      "--out", str(out), "--quiet"]) == 0
  index = read_index(out)
  strips = thumbnails.Thumbnails(out, index.count)
  assert strips.available and all(strips.has(r) for r in range(index.count))
  videos = tmp_path / "videos"
  videos.mkdir()
  rh.write_video(videos / "clip_a.mp4", frames=8, size=48, seed=1)
  rh.write_video(videos / "clip_b.mp4", frames=8, size=48, seed=2)
  out = tmp_path / "videos_index"
  assert encode.main(["--checkpoint", str(checkpoint), "--videos", str(videos), "--out", str(out), "--quiet",
                      "--workers", "1"]) == 0
  strips = thumbnails.Thumbnails(out, 2)
  from PIL import Image
  import io
  image = Image.open(io.BytesIO(strips.strip(1)))
  assert image.height == 48 and image.width >= 2 * 48  # several frames of the video, side by side


# ------------------------------------------------------------------------------------------------ real server


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def _server(index_dir: pathlib.Path, *extra: str):
  """python -m clipvip_jax.serve on a free loopback port; yields its base URL once /api/health answers."""
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # one device is all a server needs
  proc = subprocess.Popen([sys.executable, "-m", "clipvip_jax.serve", "--index", str(index_dir), "--port",
                           str(port), *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  url = f"http://127.0.0.1:{port}"
  try:
    deadline = time.time() + 240
    while True:
      if proc.poll() is not None:
        raise AssertionError(f"serve exited ({proc.returncode}): {proc.stdout.read()}")
      try:
        with urllib.request.urlopen(url + "/api/health", timeout=2) as r:
          if json.load(r) == {"status": "ok"}:
            break
      except OSError:
        pass
      if time.time() > deadline:
        raise AssertionError("serve did not answer within 240 s")
      time.sleep(0.5)
    yield url
  finally:
    proc.terminate()
    try:
      proc.wait(20)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def _chromium(tmp_path: pathlib.Path):
  """Selenium on Debian's chromium + chromedriver (no browser download); None when they are not installed (CI
  installs them: there the test must run, not skip)."""
  browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
  if not (browser and driver):
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail("chromium and chromedriver are not installed; CI installs them (make install)")
    pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  options = webdriver.ChromeOptions()
  options.binary_location = browser
  for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={tmp_path / 'profile'}"):
    options.add_argument(flag)
  return webdriver.Chrome(options=options, service=Service(executable_path=driver))


@pytest.mark.slow
def test_page_in_headless_chromium(index_dir, tmp_path):
  """Also takes the README's screenshots: CLIPVIP_WRITE_SCREENSHOT=1 writes them, and CLIPVIP_SCREENSHOT_INDEX=DIR
  runs the same test on another index (the demo's: `demo_out/index`)."""
  from selenium.webdriver.common.by import By
  from selenium.webdriver.common.keys import Keys
  from selenium.webdriver.support.ui import WebDriverWait
  index_dir = pathlib.Path(os.environ.get("CLIPVIP_SCREENSHOT_INDEX") or index_dir)
  index = read_index(index_dir)
  row = 5
  caption, clip_id = index.captions(row)[0], index.id(row)
  with _server(index_dir) as url:
    browser = _chromium(tmp_path)
    try:
      wait = WebDriverWait(browser, 60)
      browser.get(url + "/")
      box = browser.find_element(By.ID, "query")
      box.send_keys(caption, Keys.ENTER)
      wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results .card")) > 0)
      cards = browser.find_elements(By.CSS_SELECTOR, "#results .card")
      first_ids = [c.get_attribute("data-id") for c in cards[:3]]
      assert clip_id in first_ids
      assert "q=" in browser.current_url  # the query is in the URL: the page can be shared
      target = next(c for c in cards if c.get_attribute("data-id") == clip_id)
      image = target.find_element(By.TAG_NAME, "img")
      wait.until(lambda b: b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
      assert browser.execute_script("return arguments[0].naturalWidth", image) > 0
      loaded = browser.execute_script(
          "return [...document.querySelectorAll('#results img')].filter(i => i.complete).length")
      if os.environ.get(WRITE_SCREENSHOT_ENV, "") not in ("", "0"):
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(tmp_path / "serve.png"))
        os.replace(tmp_path / "serve.png", SCREENSHOT)
      target.click()
      wait.until(lambda b: b.find_element(By.ID, "detail").is_displayed() and
                 len(b.find_elements(By.CSS_SELECTOR, "#similar .card")) > 0)
      assert "More like this" in browser.find_element(By.ID, "detail").text
      assert "clip=" in browser.current_url
      if os.environ.get(WRITE_SCREENSHOT_ENV, "") not in ("", "0"):
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(str(tmp_path / "serve_clip.png"))
        os.replace(tmp_path / "serve_clip.png", SCREENSHOT.with_name("serve_clip.png"))
      similar = [c.get_attribute("data-id") for c in browser.find_elements(By.CSS_SELECTOR, "#similar .card")]
      assert clip_id not in similar and len(similar) == min(12, index.count - 1)
      assert loaded >= 1
      # A shared link opens the same clip and query.
      browser.get(browser.current_url)
      wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#similar .card")) > 0)
      assert browser.find_element(By.ID, "query").get_attribute("value") == caption
    finally:
      browser.quit()


def test_a_failure_inside_gets_500_with_one_sentence(searcher, monkeypatch):
  from fastapi.testclient import TestClient
  from clipvip_jax.retrieval import query_batcher

  def broken(model, queries):
    raise RuntimeError("a bug\nwith a second line")

  monkeypatch.setattr(query_batcher.search, "encode_queries", broken)
  with TestClient(service.create_app(searcher), raise_server_exceptions=False) as c:
    response = c.get("/api/search", params={"q": "a dog"})
  assert response.status_code == 500
  assert response.json() == {"error": "the server failed to answer (RuntimeError); see its log"}


def test_serve_command_refuses_bad_input_in_one_sentence(index_dir, tmp_path, capsys):
  from clipvip_jax.retrieval import serve_command
  for argv, words in ((["--index", str(tmp_path / "none")], "does not exist"),
                      (["--index", str(index_dir), "--port", "70000"], "0..65535"),
                      (["--index", str(index_dir), "--step", "3"], "go with --checkpoint"),
                      (["--index", str(index_dir), "--max-batch", "0"], "--max-batch must be in 1..64")):
    with pytest.raises(SystemExit) as exit_info:
      serve_command.main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and words in err and len(err.splitlines()) == 1, err
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    with pytest.raises(SystemExit):
      serve_command.main(["--index", str(index_dir), "--port", str(taken.getsockname()[1])])
  assert "pick another --port" in capsys.readouterr().err


def test_an_index_without_thumbnails_gets_them_once_from_its_source(index_dir, tmp_path):
  copy = tmp_path / "old_index"
  shutil.copytree(index_dir, copy)
  shutil.rmtree(copy / thumbnails.FOLDER)
  index = read_index(copy)
  assert not thumbnails.Thumbnails(copy, index.count).available
  assert thumbnails.ensure_thumbnails(index) and not thumbnails.ensure_thumbnails(index)
  assert thumbnails.Thumbnails(copy, index.count).strip(3) == thumbnails.Thumbnails(index_dir, index.count).strip(3)
  moved = json.loads((copy / "index.json").read_text())
  shutil.rmtree(copy / thumbnails.FOLDER)
  (copy / "index.json").write_text(json.dumps({**moved, "source": str(tmp_path / "gone")}))
  assert not thumbnails.ensure_thumbnails(read_index(copy))  # nothing to read: the page shows captions only
