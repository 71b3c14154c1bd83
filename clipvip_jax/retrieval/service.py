"""The search service: a JSON API and a web page over one index, its model loaded once (FastAPI).

    app = create_app(Searcher("idx/"))        # python -m clipvip_jax.serve runs it under uvicorn (server_config)

  GET /                          the page (clipvip_jax/retrieval/static: plain HTML, CSS and JS, no build step)
  GET /api/search?q=TEXT&top_k=K text -> clips: {"query", "top_k", "results": [{"rank", "id", "row", "captions",
                                 "thumbnail", "score"}]}, best first, as search.Searcher.search ranks them
  GET /api/similar?id=ID&top_k=K the clips most like clip ID (video to video), the clip itself left out; row=R
                                 instead of id names a row (a moment: the windows of its video overlapping it are
                                 left out too)
  GET /api/clip?id=ID            one clip: id, row, captions, thumbnail (or row=R)
  GET /video/ROW                 the video file of a row, when it lies inside a root the operator declared
                                 (create_app(video_roots=...) / serve --video-root); the page opens it at the
                                 moment's start (ROW#t=START,END, a media fragment)
  GET /api/health                {"status": "ok"}
  GET /api/index                 what the index holds and how the service is doing (batches, queries); file names
                                 only, no absolute paths (create_app(show_paths=True) / serve --show-paths)
  GET /thumbnails/ROW.jpg        a clip's thumbnail strip (image/jpeg), from the index's thumbnails/ folder
  GET /openapi.json              the API's OpenAPI description: every status code, bound and content type it
                                 states is what the service does (tests/test_serve_contract.py checks it)
  HEAD on every GET address; any other method: 405 with Allow.

Safety (docs/security.md): nothing in a request is trusted. Before any route runs, one middleware (Guard) refuses
a Host header that is not on the allow-list (the address the connection reached, localhost, and what the
operator allowed: DNS rebinding), a raw path with `..`, `.`, empty or encoded separators, a path or query string
that is not UTF-8 once percent-decoded, and a request body over MAX_BODY_BYTES (the service reads none); it answers
HEAD as GET without the body and sets nosniff, a Content-Security-Policy (same origin only, no framing) and
no-referrer on every answer. Then every parameter is checked (query length and characters, top_k) before anything
runs; a bad request gets a 4xx and {"error": one sentence}, never a traceback, and never reaches the model. Names
(clip ids, thumbnail and static file names) are looked up in tables (the index's id table, row numbers, a fixed
list of page files), never joined into a path: any id the index holds is served, whatever characters it has, and
nothing outside the index folder and the page's own files can be, but for the videos of /video/ROW: a row's file
is found from the index's recorded source and its id, resolved (links followed), and served only when it lies
inside one of the declared video roots (none by default); anything else is a 403 sentence. Under uvicorn (server_config), a request must
arrive whole within REQUEST_TIMEOUT_S (else 408 and the connection closes), its line and headers within
MAX_REQUEST_HEAD_BYTES (else 431), and malformed HTTP gets the same JSON sentence (400), not uvicorn's text.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import re
import socket
import threading
import urllib.parse
from typing import Any, Iterable, Literal, Sequence

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from clipvip_jax.retrieval.query_batcher import Hits, QueryBatcher
from clipvip_jax.retrieval.search import Searcher
from clipvip_jax.retrieval.thumbnails import Thumbnails

# Longer than any caption, and than what the text tower's tokens hold (it truncates); stricter than the library's
# tokenizer.MAX_QUERY_CHARS, which guards against pasted files: a query over HTTP is a sentence.
MAX_QUERY_CHARS = 500
MAX_TOP_K = 100
DEFAULT_TOP_K = 12
MAX_ID_CHARS = 1000  # file and page-file names (thumbnails, static); clip ids are looked up whatever their length
# A query: no control characters but tab, and at least one character that is not a space, tab or control. Stated
# as this pattern in the OpenAPI description and checked with it here, so that both say the same thing.
QUERY_PATTERN = r"^[^\x00-\x08\x0a-\x1f\x7f]*[^\x00-\x20\x7f][^\x00-\x08\x0a-\x1f\x7f]*$"
THUMBNAIL_PATTERN = r"^(0|[1-9][0-9]{0,11})\.jpg$"
MAX_BODY_BYTES = 1024  # the service reads no request body; a small one (a client's habit) is ignored
REQUEST_TIMEOUT_S = 10.0  # a request's line, headers and body must all arrive within this (uvicorn, server_config)
MAX_REQUEST_HEAD_BYTES = 16 * 1024  # request line + headers (h11's default too); more: 431
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    # The page's own files only: no inline script or style, no other origin, never inside another site's frame.
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                               "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}
STATIC_DIR = pathlib.Path(__file__).parent / "static"
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
_THUMBNAIL_NAME = re.compile(THUMBNAIL_PATTERN[1:-1])
_QUERY = re.compile(QUERY_PATTERN)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class BadRequest(Exception):
  """A request that failed validation: answered with `status` and {"error": message}."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.message, self.status = message, status


def check_name(name: str, what: str) -> str:
  """`name` (a file name: thumbnails, page files) unless it looks like a path out of where it is looked up (the URL
  layer has decoded it already)."""
  if not name:
    raise BadRequest(f"{what} is empty")
  if len(name) > MAX_ID_CHARS:
    raise BadRequest(f"{what} is longer than {MAX_ID_CHARS} characters")
  parts = name.replace("\\", "/").split("/")
  if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in parts or "\\" in name \
      or _CONTROL.search(name) or "%" in name:
    raise BadRequest(f"{what} {name!r} is not a name this service serves (it looks like a path)")
  return name


def check_query(q: str | None) -> str:
  if q is None or not q.strip(" \t"):
    raise BadRequest("the query is empty; pass a sentence as q")
  if len(q) > MAX_QUERY_CHARS:
    raise BadRequest(f"the query is {len(q)} characters long; the limit is {MAX_QUERY_CHARS}")
  if not _QUERY.fullmatch(q):
    raise BadRequest("the query holds control characters" if _CONTROL.search(q.replace("\t", " ")) else
                     "the query holds no visible character")
  return q.strip(" \t")


def check_top_k(top_k: int) -> int:
  if not 1 <= top_k <= MAX_TOP_K:
    raise BadRequest(f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
  return top_k


# ------------------------------------------------------------------------------------------------ answers


class _Strict(BaseModel):
  model_config = ConfigDict(extra="forbid")


class ErrorAnswer(_Strict):
  error: str


class ClipAnswer(_Strict):
  id: str
  row: int
  captions: list[str]
  thumbnail: str | None
  start: float | None  # a moment's seconds in its video (moment indexes; null for a whole clip)
  end: float | None
  duration: float | None  # where the video's time line ends (the end of its last window)
  video: str | None  # the address of the video file at the moment (/video/ROW#t=START,END), when it is served


class HitAnswer(_Strict):
  rank: int
  id: str
  row: int
  captions: list[str]
  thumbnail: str | None
  start: float | None
  end: float | None
  duration: float | None
  video: str | None
  score: float


class SearchAnswer(_Strict):
  query: str
  top_k: int
  results: list[HitAnswer]


class SimilarAnswer(_Strict):
  clip: ClipAnswer
  top_k: int
  results: list[HitAnswer]


class HealthAnswer(_Strict):
  status: Literal["ok"]


class LimitsAnswer(_Strict):
  max_query_chars: int
  max_top_k: int


class ServedAnswer(_Strict):
  queries: int
  model_calls: int


class IndexAnswer(_Strict):
  path: str
  rows: int
  dims: int
  dtype: str
  kind: str
  checkpoint: str
  step: int | None
  source: str | None
  captions: bool
  thumbnails: bool
  moments: bool
  generation: int
  backend: str
  limits: LimitsAnswer
  served: ServedAnswer


class ClipTable:
  """Row <-> clip id and what the page shows of a row; the id -> row map is built on first use (it reads every
  id once: a second for a million rows)."""

  def __init__(self, index, thumbnails: Thumbnails, videos: "VideoFiles | None" = None):
    self.index, self.thumbnails, self.videos = index, thumbnails, videos
    self._rows: dict[str, int] | None = None
    self._durations: dict[str, float] = {}
    self._lock = threading.Lock()

  def _tables(self) -> None:
    """id -> first row, and (moment indexes) video -> end of its last window, read once."""
    with self._lock:
      if self._rows is None:
        rows: dict[str, int] = {}
        for r in range(self.index.count):
          clip_id = self.index.id(r)
          rows.setdefault(clip_id, r)
          if self.index.moments:
            self._durations[clip_id] = max(self._durations.get(clip_id, 0.0), self.index.span(r)[1])
        self._rows = rows

  def row(self, clip_id: str | None, row: int | None = None) -> int:
    """The row named by `row` (which wins when both are given) or by the clip id; 404 when there is none."""
    if row is not None:
      if not 0 <= row < self.index.count:
        raise BadRequest(f"the index has no row {row} (it has {self.index.count})", 404)
      return row
    if clip_id is None:
      raise BadRequest("the request names no clip: give id (a clip id of the index) or row", 404)
    self._tables()
    found = self._rows.get(clip_id)
    if found is None:
      raise BadRequest(f"the index has no clip {clip_id[:200]!r}", 404)
    return found

  def describe(self, row: int, score: float | None = None, rank: int | None = None) -> dict[str, Any]:
    clip_id, span = self.index.id(row), self.index.span(row)
    duration = None
    if span is not None:
      self._tables()
      duration = self._durations.get(clip_id)
    video = None
    if self.videos is not None and self.videos.path(row) is not None:
      video = f"/video/{row}" + (f"#t={span[0]:g},{span[1]:g}" if span is not None else "")
    out: dict[str, Any] = {"id": clip_id, "row": row, "captions": self.index.captions(row),
                           "thumbnail": f"/thumbnails/{row}.jpg" if self.thumbnails.has(row) else None,
                           "start": None if span is None else span[0], "end": None if span is None else span[1],
                           "duration": duration, "video": video}
    if score is not None:
      out = {"rank": rank, **out, "score": round(score, 6)}
    return out

  def results(self, hits: Hits) -> list[dict[str, Any]]:
    return [self.describe(row, score, rank) for rank, (row, score) in enumerate(hits, 1)]


class VideoFiles:
  """Row -> its source video file, served only inside the declared roots. The file is found from the index's
  recorded source folder and the row's id (the id is the path under it, without or with its extension: as
  video_files.find_videos names clips), resolved with links followed; it must be a regular file inside one of
  `roots` (themselves resolved). An index is untrusted: an id such as "../../etc/passwd" resolves outside and is
  refused like any other file outside the roots."""

  def __init__(self, index, roots: Sequence[str | pathlib.Path]):
    self.index = index
    self.roots = [pathlib.Path(r).resolve() for r in roots]
    source = index.meta.get("source")
    self.source = pathlib.Path(source) if isinstance(source, str) and source else None

  def resolve(self, row: int) -> pathlib.Path:
    """The file of `row`, or BadRequest: 404 when there is none, 403 when it lies outside every root."""
    from data_pipelines.video_io import VIDEO_EXTENSIONS
    if self.source is None or self.index.modality != "video":
      raise BadRequest("the index records no folder of video files", 404)
    clip_id = self.index.id(row)
    if "\x00" in clip_id:
      raise BadRequest("the row's video name holds a NUL character", 404)
    candidates = [self.source / clip_id] + [self.source / (clip_id + ext) for ext in VIDEO_EXTENSIONS]
    for candidate in candidates:
      if candidate.suffix.lower() not in VIDEO_EXTENSIONS:
        continue
      real = candidate.resolve()
      if not any(real == root or real.is_relative_to(root) for root in self.roots):
        raise BadRequest(f"the video of row {row} lies outside the folders this service serves videos from "
                         "(serve --video-root)", 403)
      if real.is_file():
        return real
    raise BadRequest(f"the video file of row {row} is not there", 404)

  def path(self, row: int) -> pathlib.Path | None:
    try:
      return self.resolve(row)
    except BadRequest:
      return None


class View:
  """What the service answers from: one state of the index (a search.Snapshot) with its thumbnails, clip table and
  video files, built together, so a request is ranked and described from the same state."""

  def __init__(self, snapshot, video_roots: Sequence[str | pathlib.Path]):
    index = snapshot.index
    self.snapshot = snapshot
    self.thumbnails = Thumbnails(index.path, index.count)
    self.videos = VideoFiles(index, video_roots) if video_roots else None
    self.clips = ClipTable(index, self.thumbnails, self.videos)


class Views:
  """The current View, replaced when the index on disk changes (an append, a deletion, an encode --force): checked
  with one stat of index.json at each request (the searcher's reload_if_changed). A request keeps the view it
  started with to its answer, so none fails or mixes states during a change; a new state that cannot be opened
  (damaged, another model) is logged and the old one kept serving."""

  def __init__(self, searcher: Searcher, video_roots: Sequence[str | pathlib.Path]):
    import logging
    self.searcher, self.video_roots = searcher, video_roots
    self.log = logging.getLogger("clipvip_jax.serve")
    snapshot = getattr(searcher, "snapshot", None)
    if snapshot is None:  # a stand-in searcher (the OpenAPI description is read without an index)
      import types
      snapshot = types.SimpleNamespace(index=searcher.index, approx=None)
    self.view = View(snapshot, video_roots)
    self.reloads = 0
    self._lock = threading.Lock()
    self._refused: Any = None

  def current(self) -> View:
    changed = getattr(self.searcher, "changed", None)
    if changed is None or not changed():
      return self.view
    with self._lock:
      if self.searcher.changed():
        from clipvip_jax.runtime.cli_errors import UsageError
        try:
          if self.searcher.reload_if_changed():
            self.view = View(self.searcher.snapshot, self.video_roots)
            self.reloads += 1
            self.log.warning("the index changed on disk: now serving %d rows", self.view.snapshot.index.count)
        except (UsageError, OSError, ValueError) as e:
          if str(e) != self._refused:
            self._refused = str(e)
            self.log.warning("the index changed on disk but cannot be served (%s); still serving the one before", e)
    return self.view


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
  return JSONResponse({"error": message}, status_code=status, headers={**SECURITY_HEADERS, **(headers or {})})


def _validation_sentence(exc: RequestValidationError) -> str:
  errors = exc.errors()
  if not errors:
    return "the request is malformed"
  first = errors[0]
  where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "the request"
  return f"{where}: {first.get('msg', 'invalid value')}".rstrip(".")


def _host_name(value: str) -> str:
  """The host part of a Host header, lowercased, without port or IPv6 brackets."""
  value = value.strip().lower()
  if value.startswith("["):
    return value[1:value.find("]")] if "]" in value else value
  return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def default_allowed_hosts(bound: str | None = None) -> list[str]:
  """What a server bound to `bound` answers to by default: localhost, the bound address, and for a wildcard bind
  (0.0.0.0, ::) the machine's own names (the address a connection reached is always accepted too)."""
  hosts = list(LOCAL_HOSTS)
  if bound:
    hosts.append(bound)
    if bound in ("0.0.0.0", "::", ""):
      hosts += [socket.gethostname(), socket.getfqdn()]
  return sorted({_host_name(h) for h in hosts if h})


class Guard:
  """ASGI middleware in front of every route (module doc): Host allow-list, path and query-string checks, body
  limit, HEAD as GET, and the security headers on every answer. Each refusal is a 4xx with one JSON sentence."""

  def __init__(self, app, allowed_hosts: Iterable[str] = LOCAL_HOSTS):
    self.app = app
    self.allowed = {_host_name(h) for h in allowed_hosts}

  def _refusal(self, scope) -> tuple[int, str] | None:
    headers = {}
    size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
    for name, value in scope.get("headers") or []:
      headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
      size += len(name) + len(value) + 4
    if size > MAX_REQUEST_HEAD_BYTES:  # h11 bounds only a head that arrives in pieces
      return 431, f"the request's line and headers are longer than {MAX_REQUEST_HEAD_BYTES} bytes"
    host = headers.get("host")
    if host is not None and "*" not in self.allowed:
      name = _host_name(host)
      server = scope.get("server")
      reached = _host_name(str(server[0])) if server else None
      if name not in self.allowed and name != reached:
        return 400, (f"this service does not answer to the host {host[:100]!r} (its allow-list: "
                     f"{', '.join(sorted(self.allowed))} and the address it was reached at; serve --allow-host adds "
                     "names)")
    raw = scope.get("raw_path") or scope["path"].encode("utf-8")
    raw = raw.decode("latin-1").split("?", 1)[0]
    if not raw.isascii():
      return 400, "the address holds raw bytes outside ASCII (percent-encode them)"
    lowered = raw.lower()
    if "/../" in f"{raw}/" or "/./" in f"{raw}/" or "//" in raw or "\\" in raw or \
        any(code in lowered for code in ("%2e", "%2f", "%5c", "%00")):
      return 400, "the address holds a path segment this service does not serve"
    try:
      urllib.parse.unquote_to_bytes(raw).decode("utf-8")
      query = scope.get("query_string") or b""
      urllib.parse.parse_qsl(query.decode("ascii"), keep_blank_values=True, errors="strict")
    except UnicodeError:
      return 400, "the address or its query string is not valid UTF-8 (after percent-decoding)"
    length = headers.get("content-length")
    if "transfer-encoding" in headers or (length is not None and (not length.strip().isdigit()
                                                                   or int(length) > MAX_BODY_BYTES)):
      return 413, f"this service reads no request body, and takes none over {MAX_BODY_BYTES} bytes"
    return None

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      await self.app(scope, receive, send)
      return
    head = scope["method"] == "HEAD"

    async def guarded_send(message):
      if message["type"] == "http.response.start":
        headers = MutableHeaders(scope=message)
        for name, value in SECURITY_HEADERS.items():
          if name not in headers:
            headers[name] = value
      elif head and message["type"] == "http.response.body":
        message = {**message, "body": b""}
      await send(message)

    refusal = self._refusal(scope)
    if refusal is not None:
      status, text = refusal
      response = _error(status, text, {"Connection": "close"} if status == 413 else None)
      await response(scope, receive, guarded_send)
      return
    if head:
      scope = {**scope, "method": "GET"}
    await self.app(scope, receive, guarded_send)


_ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorAnswer"}}}
_ERRORS = {"400": "a bad request: a parameter out of its bounds, or a refused address, host or encoding",
           "413": "a request body (the service reads none)",
           "431": f"a request line and headers over {MAX_REQUEST_HEAD_BYTES} bytes",
           "500": "the service failed (its log says why)"}
_NOT_FOUND = {"/api/similar": "the index has no such clip", "/api/clip": "the index has no such clip",
              "/thumbnails/{name}": "the index has no thumbnail of that name",
              "/video/{row}": "the row has no video file"}


def _openapi(app: FastAPI) -> dict[str, Any]:
  """FastAPI's description, made to match the service: no 422 (validation errors are 400s), the error statuses
  every route can give (with the error body), 404 where a name is looked up, the query's and top_k's bounds, and
  the thumbnails as image/jpeg."""
  if app.openapi_schema:
    return app.openapi_schema
  schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
  components = schema.setdefault("components", {}).setdefault("schemas", {})
  for name in ("HTTPValidationError", "ValidationError"):
    components.pop(name, None)
  components["ErrorAnswer"] = {"type": "object", "title": "ErrorAnswer", "required": ["error"],
                               "properties": {"error": {"type": "string", "title": "Error"}},
                               "additionalProperties": False}
  bounds = {"q": {"type": "string", "minLength": 1, "maxLength": MAX_QUERY_CHARS, "pattern": QUERY_PATTERN},
            "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K, "default": DEFAULT_TOP_K},
            "id": {"type": "string"},
            "row": {"type": "integer", "minimum": 0},
            "name": {"type": "string", "pattern": THUMBNAIL_PATTERN}}
  for path, operations in schema.get("paths", {}).items():
    for operation in operations.values():
      for parameter in operation.get("parameters", []):
        if parameter["name"] in bounds:
          parameter["schema"] = {**bounds[parameter["name"]], "title": parameter["schema"].get("title", "")}
      responses = operation.setdefault("responses", {})
      responses.pop("422", None)
      for status, text in _ERRORS.items():
        responses[status] = {"description": text, "content": _ERROR_CONTENT}
      if path in _NOT_FOUND:
        responses["404"] = {"description": _NOT_FOUND[path], "content": _ERROR_CONTENT}
  video = schema["paths"]["/video/{row}"]["get"]["responses"]
  video["200"] = {"description": "the video file (Range requests answered: a player seeks in it)",
                  "content": {"video/*": {"schema": {"type": "string", "format": "binary"}}}}
  video["403"] = {"description": "the service serves no video files, or this one lies outside its video roots",
                  "content": _ERROR_CONTENT}
  schema["paths"]["/thumbnails/{name}"]["get"]["responses"]["200"] = {
      "description": "the strip: a few frames of the clip side by side",
      "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}
  app.openapi_schema = schema
  return schema


def _name_only(value: Any) -> str | None:
  return None if value is None else (pathlib.PurePath(str(value)).name or str(value))


def create_app(searcher: Searcher, *, max_batch: int | None = None, title: str = "clipvip_jax search",
               allowed_hosts: Sequence[str] | None = None, show_paths: bool = False,
               video_roots: Sequence[str | pathlib.Path] = ()) -> FastAPI:
  """The ASGI app serving `searcher`'s index (module doc). Queries are batched by a QueryBatcher started with the
  app (lifespan), so the app must run in one event loop (uvicorn, or TestClient used as a context manager).

  allowed_hosts: the Host names it answers to besides the address a connection reached (default: localhost;
  "*": any, which gives up the DNS-rebinding guard). show_paths: /api/index shows the index's, checkpoint's and
  source's absolute paths instead of their names. video_roots: folders whose video files /video/ROW serves (none:
  the page shows frames only)."""
  views = Views(searcher, video_roots)
  batcher = QueryBatcher(searcher) if max_batch is None else QueryBatcher(searcher, max_batch)

  @contextlib.asynccontextmanager
  async def lifespan(app: FastAPI):
    batcher.start()
    yield
    await batcher.stop()

  app = FastAPI(title=title, description="Text-to-video and video-to-video search over one clipvip_jax index.",
                lifespan=lifespan, docs_url=None, redoc_url=None)  # the docs pages load scripts from a CDN
  app.state.batcher, app.state.views = batcher, views
  app.openapi = lambda: _openapi(app)

  @app.exception_handler(BadRequest)
  async def bad_request(request: Request, exc: BadRequest):
    return _error(exc.status, exc.message)

  @app.exception_handler(RequestValidationError)
  async def invalid(request: Request, exc: RequestValidationError):
    return _error(400, _validation_sentence(exc))

  @app.exception_handler(StarletteHTTPException)
  async def http_error(request: Request, exc: StarletteHTTPException):
    message = {404: "there is nothing at this address", 405: "this address does not take that method"}.get(
        exc.status_code, str(exc.detail))
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # HEAD is answered wherever GET is (Guard)
      allowed = [m.strip() for m in headers.get("Allow", "GET").split(",") if m.strip()]
      headers["Allow"] = ", ".join(allowed + ["HEAD"] if "GET" in allowed and "HEAD" not in allowed else allowed)
    return _error(exc.status_code, message, headers)

  @app.exception_handler(Exception)
  async def internal(request: Request, exc: Exception):
    return _error(500, f"the server failed to answer ({type(exc).__name__}); see its log")

  app.add_middleware(Guard, allowed_hosts=LOCAL_HOSTS if allowed_hosts is None else allowed_hosts)

  @app.get("/api/health", summary="Liveness", response_model=HealthAnswer)
  async def health() -> dict[str, str]:
    return {"status": "ok"}

  @app.get("/api/index", summary="What the index holds", response_model=IndexAnswer)
  async def index_info() -> dict[str, Any]:
    view = views.current()
    index, meta = view.snapshot.index, view.snapshot.index.meta
    shown = (lambda value: None if value is None else str(value)) if show_paths else _name_only
    return {"path": shown(index.path), "rows": index.count, "dims": index.dims, "dtype": index.dtype,
            "kind": index.kind, "checkpoint": shown(searcher.model.checkpoint), "step": meta.get("step"),
            "source": shown(meta.get("source")), "captions": bool(meta.get("captions")),
            "thumbnails": view.thumbnails.available, "moments": index.moments, "backend": searcher.backend,
            "generation": int(meta.get("generation") or 0),
            "limits": {"max_query_chars": MAX_QUERY_CHARS, "max_top_k": MAX_TOP_K},
            "served": {"queries": batcher.queries, "model_calls": batcher.model_calls}}

  @app.get("/api/search", summary="Text to clips, best first", response_model=SearchAnswer)
  async def search_text(q: str = Query(..., description=f"the sentence (at most {MAX_QUERY_CHARS} characters, no "
                                                        "control characters but tab)"),
                        top_k: int = Query(DEFAULT_TOP_K, description=f"1..{MAX_TOP_K}")) -> dict[str, Any]:
    query, top_k = check_query(q), check_top_k(top_k)
    view = views.current()
    hits = await batcher.rank(query, top_k, view.snapshot)
    return {"query": query, "top_k": top_k, "results": view.clips.results(hits)}

  @app.get("/api/similar", summary="The clips most like a clip (video to video)", response_model=SimilarAnswer)
  async def similar(id: str | None = Query(None, description="a clip id of the index"),  # noqa: A002
                    row: int | None = Query(None, description="a row of the index (a moment), instead of id"),
                    top_k: int = Query(DEFAULT_TOP_K, description=f"1..{MAX_TOP_K}")) -> dict[str, Any]:
    view = views.current()
    row, top_k = view.clips.row(id, row), check_top_k(top_k)
    hits = await batcher.similar(row, top_k, view.snapshot)
    return {"clip": view.clips.describe(row), "top_k": top_k, "results": view.clips.results(hits)}

  @app.get("/api/clip", summary="One clip: captions and thumbnail", response_model=ClipAnswer)
  async def clip(id: str | None = Query(None, description="a clip id of the index"),  # noqa: A002
                 row: int | None = Query(None, description="a row of the index, instead of id")) -> dict[str, Any]:
    clips = views.current().clips
    return clips.describe(clips.row(id, row))

  @app.get("/video/{row}", summary="A row's video file, inside the declared video roots", response_class=Response)
  async def video(row: str) -> Response:
    if not re.fullmatch(r"0|[1-9][0-9]{0,11}", row):
      raise BadRequest(f"video {row[:100]!r} is not a row number", 404)
    number = int(row)
    view = views.current()
    if view.videos is None:
      raise BadRequest("this service serves no video files (serve --video-root DIR declares where they may come "
                       "from)", 403)
    if number >= view.snapshot.index.count:
      raise BadRequest(f"the index has no row {number}", 404)
    return FileResponse(view.videos.resolve(number))

  @app.get("/thumbnails/{name}", summary="A clip's thumbnail strip (JPEG)", response_class=Response)
  async def thumbnail(name: str) -> Response:
    check_name(name, "thumbnail name")
    if not _THUMBNAIL_NAME.fullmatch(name):
      raise BadRequest(f"thumbnail name {name!r} is not ROW.jpg", 404)
    data = views.current().thumbnails.strip(int(name[:-4]))
    if data is None:
      raise BadRequest(f"the index has no thumbnail {name!r}", 404)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})

  @app.get("/static/{name}", include_in_schema=False)
  async def static(name: str) -> Response:
    check_name(name, "file name")
    if name not in STATIC_FILES:
      raise BadRequest(f"there is no page file {name!r}", 404)
    return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name])

  @app.get("/", include_in_schema=False)
  async def page() -> Response:
    return FileResponse(STATIC_DIR / "index.html", media_type=STATIC_FILES["index.html"])

  @app.get("/index.html", include_in_schema=False)
  async def page_alias() -> Response:
    return RedirectResponse("/")

  return app


# ------------------------------------------------------------------------------------------------ under uvicorn


def _raw_answer(status: int, reason: str, message: str) -> bytes:
  """A whole HTTP/1.1 answer with the service's JSON sentence, closing the connection (written straight to the
  socket: h11 has refused the request, or none arrived)."""
  body = json.dumps({"error": message}).encode("utf-8")
  head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
          "connection: close\r\nx-content-type-options: nosniff\r\n\r\n")
  return head.encode("ascii") + body


def guarded_protocol(request_timeout: float = REQUEST_TIMEOUT_S, max_head_bytes: int = MAX_REQUEST_HEAD_BYTES):
  """uvicorn's h11 protocol class with (1) a request timeout: a request's line, headers and body must arrive
  within `request_timeout` seconds of the connection opening or the previous answer ending (uvicorn has no such
  limit: a connection that sends half its headers, or a byte now and then, is otherwise kept open for ever); a
  late request gets 408 and the connection is closed; and (2) the service's JSON sentence for what h11 refuses
  (malformed HTTP, raw bytes outside ASCII in the address: 400; a request line and headers over
  `max_head_bytes`: 431) instead of uvicorn's text/plain."""
  import h11
  from uvicorn.protocols.http.h11_impl import H11Protocol

  class GuardedH11Protocol(H11Protocol):
    timeout = request_timeout
    _timer = None

    def connection_made(self, transport) -> None:
      super().connection_made(transport)
      self._watch()

    def data_received(self, data: bytes) -> None:
      super().data_received(data)
      self._watch()

    def on_response_complete(self) -> None:
      super().on_response_complete()
      self._watch()

    def connection_lost(self, exc) -> None:
      self._cancel()
      super().connection_lost(exc)

    def _cancel(self) -> None:
      if self._timer is not None:
        self._timer.cancel()
        self._timer = None

    def _watch(self) -> None:
      """The clock runs while the client owes us (the rest of) a request."""
      owed = self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing()
      if owed and self._timer is None:
        self._timer = self.loop.call_later(self.timeout, self._expired)
      elif not owed:
        self._cancel()

    def _expired(self) -> None:
      self._timer = None
      if self.transport.is_closing():
        return
      if self.conn.our_state is h11.IDLE and self.conn.trailing_data[0]:  # half a request line or headers
        self.logger.warning("a request did not arrive whole within %.1f s; closing the connection", self.timeout)
        self.transport.write(_raw_answer(408, "Request Timeout", f"the request did not arrive whole within "
                                                                 f"{self.timeout:g} s"))
      self.transport.close()

    def send_400_response(self, msg: str) -> None:
      self._cancel()
      if len(self.conn.trailing_data[0]) > max_head_bytes:
        answer = _raw_answer(431, "Request Header Fields Too Large",
                             f"the request's line and headers are longer than {max_head_bytes} bytes")
      else:
        answer = _raw_answer(400, "Bad Request", "the request is not valid HTTP/1.1 (a malformed line or header, "
                                                 "or a raw byte outside ASCII in the address)")
      self.transport.write(answer)
      self.transport.close()

  return GuardedH11Protocol


def server_config(app, host: str, port: int, *, request_timeout: float = REQUEST_TIMEOUT_S,
                  log_level: str = "warning"):
  """The uvicorn.Config python -m clipvip_jax.serve runs `app` with: the guarded h11 protocol (request timeout,
  JSON refusals, MAX_REQUEST_HEAD_BYTES), no websockets, no access log, no Server header."""
  import uvicorn
  return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                        http=guarded_protocol(request_timeout), ws="none", lifespan="on", server_header=False,
                        h11_max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
