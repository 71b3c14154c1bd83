"""The search service against clients of any kind (issue 27): its OpenAPI description checked by Schemathesis
in-process (every check on, a bounded number of examples), HEAD/405/Allow, the Host allow-list, no absolute paths,
the page's security headers, ids of any characters, undecodable and oversize requests, and, on a real uvicorn on
127.0.0.1 with a short request timeout, connections that send nothing, half their headers or raw invalid bytes.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import socket
import threading
import time

import hypothesis
import numpy as np
import pytest
import schemathesis

import retrieval_helpers as rh
from retrieval_helpers import checkpoint, client, index_dir, model, searcher, shards  # noqa: F401 (pytest fixtures)
from clipvip_jax.retrieval import search, service

EXAMPLES = 100  # per operation: the contract test adds about ten seconds on 2 cores


# ------------------------------------------------------------------------------------------------ the contract


def _published_description_app():
  """The app around a stand-in for the searcher (no model, no index): what it publishes at /openapi.json depends
  on its routes alone, so the schema can be read when this module is collected (Schemathesis's fixture-based
  loader does not run under pytest 9.2). The test calls the real app; test_the_real_app_publishes_it checks that
  the real app publishes the same description."""
  import types
  stand_in = types.SimpleNamespace(index=types.SimpleNamespace(path=pathlib.Path("no-index"), count=0),
                                   backend="exact")
  return service.create_app(stand_in)


contract = schemathesis.openapi.from_asgi("/openapi.json", _published_description_app())


@pytest.fixture(scope="module")
def app(searcher):
  return service.create_app(searcher)


def test_the_real_app_publishes_it(client):
  assert client.get("/openapi.json").json() == contract.raw_schema


@contract.parametrize()
@hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_the_service_does_what_its_openapi_description_says(case, app):
  """Every Schemathesis check (status codes, content types, response schemas and headers, positive data accepted,
  negative data refused, unsupported methods answered 405 with Allow, no 5xx) on every operation."""
  case.call_and_validate(app=app)


# ------------------------------------------------------------------------------------------------ HTTP basics


GET_ADDRESSES = ["/", "/index.html", "/static/app.js", "/api/health", "/api/index", "/api/search?q=a+red+circle",
                 "/api/clip?id={id}", "/api/similar?id={id}&top_k=3", "/thumbnails/0.jpg", "/openapi.json",
                 "/api/nothing"]


@pytest.mark.parametrize("address", GET_ADDRESSES)
def test_head_is_answered_wherever_get_is_without_a_body(client, searcher, address):
  address = address.format(id=searcher.index.id(2))
  get = client.get(address, follow_redirects=False)
  head = client.head(address, follow_redirects=False)
  assert head.status_code == get.status_code and head.content == b""
  assert head.headers.get("content-type") == get.headers.get("content-type")
  assert head.headers.get("content-length") == get.headers.get("content-length")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
@pytest.mark.parametrize("address", ["/api/search", "/api/clip", "/thumbnails/0.jpg", "/", "/static/app.js"])
def test_other_methods_get_405_with_allow(client, method, address):
  response = client.request(method, address)
  assert response.status_code == 405
  assert response.headers["allow"] == "GET, HEAD"
  assert response.json() == {"error": "this address does not take that method"}


def test_security_headers_on_the_page_the_api_and_the_errors(client):
  for address in ("/", "/static/app.js", "/api/health", "/thumbnails/0.jpg", "/api/nothing", "/api/search",
                  "/thumbnails/..%2f"):
    headers = client.get(address).headers
    assert headers["x-content-type-options"] == "nosniff", address
    assert "frame-ancestors 'none'" in headers["content-security-policy"], address
    assert headers["x-frame-options"] == "DENY" and headers["referrer-policy"] == "no-referrer", address


def test_a_failure_inside_gets_the_headers_too(searcher, monkeypatch):
  from fastapi.testclient import TestClient
  from clipvip_jax.retrieval import query_batcher

  def broken(model, queries):
    raise RuntimeError("a bug")

  monkeypatch.setattr(query_batcher.search, "encode_queries", broken)
  with TestClient(service.create_app(searcher), raise_server_exceptions=False) as c:
    response = c.get("/api/search", params={"q": "a dog"})
  assert response.status_code == 500 and response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "[::2]:80",
                                  "localhost.", "attacker"])
def test_other_hosts_are_refused_before_anything_runs(client, host):
  before = client.get("/api/index").json()["served"]["queries"]
  for address in ("/api/index", "/api/search?q=a+dog", "/api/search/", "/", "/thumbnails/0.jpg"):
    response = client.get(address, headers={"host": host}, follow_redirects=False)
    assert response.status_code == 400, (host, address)
    assert "does not answer to the host" in response.json()["error"] and "location" not in response.headers
  assert client.get("/api/index").json()["served"]["queries"] == before  # nothing reached the model


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "testserver",
                                  "LOCALHOST"])
def test_this_machines_names_are_answered(client, host):
  assert client.get("/api/health", headers={"host": host}).status_code == 200


def test_the_allow_list_is_configurable(searcher):
  from fastapi.testclient import TestClient
  with TestClient(service.create_app(searcher, allowed_hosts=["search.lan"])) as c:
    assert c.get("/api/health", headers={"host": "search.lan:8000"}).status_code == 200
    assert c.get("/api/health", headers={"host": "localhost"}).status_code == 400  # only what is listed
  with TestClient(service.create_app(searcher, allowed_hosts=["*"])) as c:
    assert c.get("/api/health", headers={"host": "anything.example"}).status_code == 200
  assert "myhost" not in service.default_allowed_hosts("127.0.0.1")
  assert {"localhost", "127.0.0.1", "::1", "10.1.2.3"} <= set(service.default_allowed_hosts("10.1.2.3"))


def test_no_absolute_paths_in_answers_unless_asked(client, searcher, index_dir):
  info = client.get("/api/index").json()
  text = json.dumps(info)
  assert str(index_dir) not in text and "/" not in info["path"] + info["checkpoint"] + (info["source"] or "")
  assert info["path"] == index_dir.name and info["checkpoint"] == pathlib.Path(searcher.model.checkpoint).name
  from fastapi.testclient import TestClient
  with TestClient(service.create_app(searcher, show_paths=True)) as c:
    assert c.get("/api/index").json()["path"] == str(index_dir)


@pytest.mark.parametrize("address,words", [
    ("/api/search?q=%FF", "not valid UTF-8"), ("/api/search?q=a%C3", "not valid UTF-8"),
    ("/api/clip?id=%ED%A0%80", "not valid UTF-8"), ("/thumbnails/%FF.jpg", "not valid UTF-8"),
    ("/api/search?q=%00", "control characters")])
def test_undecodable_requests_get_400_never_u_fffd(client, address, words):
  before = client.get("/api/index").json()["served"]["queries"]
  response = client.get(address)
  assert response.status_code == 400 and words in response.json()["error"], response.json()
  assert client.get("/api/index").json()["served"]["queries"] == before


def test_request_bodies_over_the_limit_get_413(client):
  for headers, content in (({}, b"x" * (service.MAX_BODY_BYTES + 1)), ({"transfer-encoding": "chunked"}, b"")):
    response = client.request("GET", "/api/health", content=content, headers=headers)
    assert response.status_code == 413 and "reads no request body" in response.json()["error"]
  assert client.request("GET", "/api/health", content=b"{}").status_code == 200  # a small one is ignored


# ------------------------------------------------------------------------------------------------ ids of any kind


ODD_IDS = ["100%_real.mp4", "a/../b.mp4", "..", "C:\\x.mp4", "%2e%2e%2fx", "sub/clip.mp4", " spaced  ", "日本語.mp4",
           "#frag?q=1&x", "tab\tid", "+plus+", ""]


@pytest.fixture(scope="module")
def odd_client(model, checkpoint, tmp_path_factory):
  from fastapi.testclient import TestClient
  from clipvip_jax.retrieval.index import write_index
  rows = np.random.default_rng(3).standard_normal((len(ODD_IDS), model.embedding_dim())).astype(np.float32)
  rows /= np.linalg.norm(rows, axis=1, keepdims=True)
  out = tmp_path_factory.mktemp("odd") / "index"
  write_index(out, rows, ODD_IDS, {"kind": "clipvip", "checkpoint": str(checkpoint), "modality": "video"},
              part_rows=5)
  with TestClient(service.create_app(search.Searcher(out, model=model))) as c:
    yield c


def test_any_id_the_index_holds_is_served_by_every_route(odd_client):
  listed = {hit["id"] for hit in odd_client.get("/api/search", params={"q": "a clip", "top_k": 100}).json()["results"]}
  assert listed == set(ODD_IDS)
  for row, clip_id in enumerate(ODD_IDS):
    clip = odd_client.get("/api/clip", params={"id": clip_id})
    assert clip.status_code == 200 and clip.json()["id"] == clip_id and clip.json()["row"] == row, clip_id
    similar = odd_client.get("/api/similar", params={"id": clip_id, "top_k": 3})
    assert similar.status_code == 200 and similar.json()["clip"]["id"] == clip_id, clip_id
  assert odd_client.get("/api/clip", params={"id": "not there"}).status_code == 404


# ------------------------------------------------------------------------------------------------ damaged index


def _damaged_client(searcher, index_dir, tmp_path, damage):
  import shutil
  copy = tmp_path / "copy"
  shutil.copytree(index_dir, copy)
  damage(copy)
  from fastapi.testclient import TestClient
  return TestClient(service.create_app(search.Searcher(copy, model=searcher.model)), raise_server_exceptions=False)


def _set_row(idx: pathlib.Path, part: str, row: int, value: float) -> None:
  emb = np.load(idx / "parts" / part / "embeddings.npy", mmap_mode="r+")
  emb[row] = value
  emb.flush()


def test_nan_and_inf_rows_are_never_ranked_and_never_a_500(searcher, index_dir, tmp_path):
  def damage(copy):
    _set_row(copy, "part-00000", 1, np.nan)
    _set_row(copy, "part-00001", 2, np.inf)

  with _damaged_client(searcher, index_dir, tmp_path, damage) as c:
    ids = [searcher.index.id(r) for r in range(searcher.index.count)]
    body = c.get("/api/search", params={"q": searcher.index.captions(0)[0], "top_k": 100})
    assert body.status_code == 200
    found = [hit["id"] for hit in body.json()["results"]]
    assert len(found) == len(ids) - 2 and ids[1] not in found and ids[7] not in found
    for clip_id in (ids[1], ids[7]):  # a clip without a usable embedding has no similar clips
      similar = c.get("/api/similar", params={"id": clip_id})
      assert similar.status_code == 200 and similar.json()["results"] == []
    similar = c.get("/api/similar", params={"id": ids[0], "top_k": 100}).json()["results"]
    assert len(similar) == len(ids) - 3


def test_an_index_of_nan_rows_answers_empty_results(searcher, index_dir, tmp_path):
  def damage(copy):
    for part, rows in (("part-00000", 5), ("part-00001", 5), ("part-00002", 5), ("part-00003", 1)):
      for row in range(rows):
        _set_row(copy, part, row, np.nan)

  with _damaged_client(searcher, index_dir, tmp_path, damage) as c:
    response = c.get("/api/search", params={"q": "a red circle"})
    assert response.status_code == 200 and response.json()["results"] == []


def test_serve_refuses_an_index_that_fails_verification(index_dir, tmp_path, capsys):
  import shutil
  from clipvip_jax.retrieval import serve_command
  copy = tmp_path / "copy"
  shutil.copytree(index_dir, copy)
  (copy / "thumbnails" / "strips.bin").unlink()
  (copy / "thumbnails" / "strips.bin").symlink_to("/etc/passwd")
  with pytest.raises(SystemExit) as exc:
    serve_command.main(["--index", str(copy), "--port", "0"])
  err = capsys.readouterr().err.strip().splitlines()
  assert exc.value.code == 2 and len(err) == 1
  assert "is not served" in err[0] and "leads outside the index folder" in err[0] and "index verify" in err[0]


# ------------------------------------------------------------------------------------------------ a real server


TIMEOUT_S = 0.5  # the request timeout the real server below runs with


@contextlib.contextmanager
def _uvicorn(app, request_timeout: float = TIMEOUT_S):
  """The app under uvicorn as python -m clipvip_jax.serve runs it (service.server_config), on a free loopback port
  in a thread; yields the port."""
  import uvicorn
  server = uvicorn.Server(service.server_config(app, "127.0.0.1", 0, request_timeout=request_timeout,
                                                log_level="error"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.time() + 60
  while not (server.started and server.servers):
    assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
    time.sleep(0.02)
  try:
    yield server.servers[0].sockets[0].getsockname()[1]
  finally:
    server.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def port(searcher):
  with _uvicorn(service.create_app(searcher)) as p:
    yield p


def _exchange(port: int, data: bytes = b"", wait: float = 5.0) -> tuple[bytes, float]:
  """Sends `data` on a new connection and reads until the server closes it; (what came back, seconds it took)."""
  start = time.monotonic()
  with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
    if data:
      sock.sendall(data)
    received = b""
    while True:
      try:
        chunk = sock.recv(65536)
      except (ConnectionResetError, socket.timeout):
        break
      if not chunk:
        break
      received += chunk
  return received, time.monotonic() - start


def _status_and_json(answer: bytes) -> tuple[int, dict]:
  head, _, body = answer.partition(b"\r\n\r\n")
  assert b"content-type: application/json" in head.lower(), answer[:300]
  return int(head.split(b" ", 2)[1]), json.loads(body)


def test_a_connection_that_sends_nothing_is_closed(port):
  answer, took = _exchange(port)
  assert answer == b"" and took < TIMEOUT_S + 2


def test_half_the_headers_get_408_and_the_connection_closes(port):
  answer, took = _exchange(port, b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
  status, body = _status_and_json(answer)
  assert status == 408 and "did not arrive whole within 0.5 s" in body["error"] and took < TIMEOUT_S + 2


def test_a_byte_now_and_then_does_not_keep_a_connection(port):
  start = time.monotonic()
  with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
    closed = False
    for byte in b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n":
      try:
        sock.sendall(bytes([byte]))
      except (BrokenPipeError, ConnectionResetError):
        closed = True
        break
      time.sleep(0.1)
      if time.monotonic() - start > TIMEOUT_S + 2:
        break
    if not closed:
      sock.settimeout(2)
      rest = sock.recv(65536)
      closed = rest == b"" or b" 408 " in rest
  assert closed and time.monotonic() - start < TIMEOUT_S + 3


def test_a_whole_request_is_answered_and_keep_alive_still_works(port):
  with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
    for _ in range(2):
      sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
      answer = b""
      while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
        answer += sock.recv(65536)
      status, body = _status_and_json(answer)
      assert status == 200 and body == {"status": "ok"}
      assert b"x-content-type-options: nosniff" in answer.lower() and b"server: uvicorn" not in answer.lower()
      time.sleep(TIMEOUT_S * 0.6)  # under the timeout between requests: the connection stays


def test_oversize_and_raw_invalid_requests_get_the_services_json(port):
  cases = [(b"GET /api/search?q=" + b"a" * 1_000_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 431, "longer than"),
           (b"GET /api/search?q=\xff\xfe HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400, "not valid HTTP/1.1"),
           (b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n", 400, "not valid HTTP/1.1"),
           (b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Big: " + b"b" * 40000 + b"\r\n\r\n", 431,
            "longer than"),
           (b"GET /api/search?q=%FF HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400, "not valid UTF-8"),
           (b"GET /api/health HTTP/1.1\r\nHost: evil.example\r\n\r\n", 400, "does not answer to the host"),
           (b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10000000\r\n\r\n", 413,
            "reads no request body"),
           (b"HEAD /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", 200, None)]
  for request, want, words in cases:
    try:
      answer, _ = _exchange(port, request)
    except (BrokenPipeError, ConnectionResetError):
      pytest.fail(f"the server dropped {request[:60]!r} without an answer")
    head = answer.partition(b"\r\n\r\n")[0]
    if words is None:
      assert head.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\n"), answer  # HEAD: no body
      continue
    status, body = _status_and_json(answer)
    assert status == want and words in body["error"] and set(body) == {"error"}, (request[:60], answer[:300])
