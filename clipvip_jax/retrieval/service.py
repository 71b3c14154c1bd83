"""The search service: a JSON API and a web page over one index, its model loaded once (FastAPI).

    app = create_app(Searcher("idx/"))        # python -m clipvip_jax.serve runs it under uvicorn

  GET /                          the page (clipvip_jax/retrieval/static: plain HTML, CSS and JS, no build step)
  GET /api/search?q=TEXT&top_k=K text -> clips: {"query", "top_k", "results": [{"rank", "id", "score",
                                 "captions", "thumbnail"}]}, best first, as search.Searcher.search ranks them
  GET /api/similar?id=ID&top_k=K the clips most like clip ID (video to video), the clip itself left out
  GET /api/clip?id=ID            one clip: id, row, captions, thumbnail
  GET /api/health                {"status": "ok"}
  GET /api/index                 what the index holds and how the service is doing (batches, queries)
  GET /thumbnails/ROW.jpg        a clip's thumbnail strip, from the index's thumbnails/ folder
  GET /openapi.json              the API's OpenAPI description

Safety: every request is checked before anything runs (query length, top_k, names); a bad one gets a 4xx and
{"error": one sentence}, never a traceback, and never reaches the model. Names (clip ids, thumbnail and static
file names) are looked up in tables (the index's id table, row numbers, a fixed list of page files), never joined
into a path, and a name that looks like a path (`..`, absolute, backslash, control characters, after URL
decoding) is refused outright: nothing outside the index folder and the page's own files can be served.
"""

from __future__ import annotations

import contextlib
import pathlib
import re
import threading
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from clipvip_jax.retrieval.query_batcher import Hits, QueryBatcher
from clipvip_jax.retrieval.search import Searcher
from clipvip_jax.retrieval.thumbnails import Thumbnails

# Longer than any caption, and than what the text tower's tokens hold (it truncates); stricter than the library's
# tokenizer.MAX_QUERY_CHARS, which guards against pasted files: a query over HTTP is a sentence.
MAX_QUERY_CHARS = 500
MAX_TOP_K = 100
DEFAULT_TOP_K = 12
MAX_ID_CHARS = 1000
STATIC_DIR = pathlib.Path(__file__).parent / "static"
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
_THUMBNAIL_NAME = re.compile(r"(0|[1-9][0-9]{0,11})\.jpg")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class BadRequest(Exception):
  """A request that failed validation: answered with `status` and {"error": message}."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.message, self.status = message, status


def check_name(name: str, what: str) -> str:
  """`name` unless it looks like a path out of where it is looked up (the URL layer has decoded it already)."""
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
  if q is None or not q.strip():
    raise BadRequest("the query is empty; pass a sentence as q")
  if len(q) > MAX_QUERY_CHARS:
    raise BadRequest(f"the query is {len(q)} characters long; the limit is {MAX_QUERY_CHARS}")
  if _CONTROL.search(q.replace("\t", " ")):
    raise BadRequest("the query holds control characters")
  return q.strip()


def check_top_k(top_k: int) -> int:
  if not 1 <= top_k <= MAX_TOP_K:
    raise BadRequest(f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
  return top_k


class ClipTable:
  """Row <-> clip id and what the page shows of a row; the id -> row map is built on first use (it reads every
  id once: a second for a million rows)."""

  def __init__(self, searcher: Searcher, thumbnails: Thumbnails):
    self.index, self.thumbnails = searcher.index, thumbnails
    self._rows: dict[str, int] | None = None
    self._lock = threading.Lock()

  def row(self, clip_id: str) -> int:
    with self._lock:
      if self._rows is None:
        self._rows = {self.index.id(r): r for r in range(self.index.count)}
    row = self._rows.get(clip_id)
    if row is None:
      raise BadRequest(f"the index has no clip {clip_id!r}", 404)
    return row

  def describe(self, row: int, score: float | None = None, rank: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": self.index.id(row), "row": row, "captions": self.index.captions(row),
                           "thumbnail": f"/thumbnails/{row}.jpg" if self.thumbnails.has(row) else None}
    if score is not None:
      out = {"rank": rank, **out, "score": round(score, 6)}
    return out

  def results(self, hits: Hits) -> list[dict[str, Any]]:
    return [self.describe(row, score, rank) for rank, (row, score) in enumerate(hits, 1)]


def _error(status: int, message: str) -> JSONResponse:
  return JSONResponse({"error": message}, status_code=status)


def _validation_sentence(exc: RequestValidationError) -> str:
  errors = exc.errors()
  if not errors:
    return "the request is malformed"
  first = errors[0]
  where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "the request"
  return f"{where}: {first.get('msg', 'invalid value')}".rstrip(".")


class RefusePathNames:
  """ASGI middleware: a raw path holding `..` or `.` segments, encoded dots, slashes or backslashes, or an empty
  segment is refused before routing (Starlette decodes %2e%2e%2f into ../ before a route sees the name)."""

  def __init__(self, app):
    self.app = app

  async def __call__(self, scope, receive, send):
    if scope["type"] == "http":
      raw = scope.get("raw_path") or scope["path"].encode("utf-8")
      raw = raw.decode("latin-1").split("?", 1)[0]
      lowered = raw.lower()
      if "/../" in f"{raw}/" or "/./" in f"{raw}/" or "//" in raw or "\\" in raw or \
          any(code in lowered for code in ("%2e", "%2f", "%5c", "%00")):
        response = _error(400, "the address holds a path segment this service does not serve")
        await response(scope, receive, send)
        return
    await self.app(scope, receive, send)


def create_app(searcher: Searcher, *, max_batch: int | None = None, title: str = "clipvip_jax search") -> FastAPI:
  """The ASGI app serving `searcher`'s index (module doc). Queries are batched by a QueryBatcher started with the
  app (lifespan), so the app must run in one event loop (uvicorn, or TestClient used as a context manager)."""
  thumbnails = Thumbnails(searcher.index.path, searcher.index.count)
  clips = ClipTable(searcher, thumbnails)
  batcher = QueryBatcher(searcher) if max_batch is None else QueryBatcher(searcher, max_batch)

  @contextlib.asynccontextmanager
  async def lifespan(app: FastAPI):
    batcher.start()
    yield
    await batcher.stop()

  app = FastAPI(title=title, description="Text-to-video and video-to-video search over one clipvip_jax index.",
                lifespan=lifespan, docs_url=None, redoc_url=None)  # the docs pages load scripts from a CDN
  app.state.batcher, app.state.clips = batcher, clips

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
    return _error(exc.status_code, message)

  @app.exception_handler(Exception)
  async def internal(request: Request, exc: Exception):
    return _error(500, f"the server failed to answer ({type(exc).__name__}); see its log")

  app.add_middleware(RefusePathNames)

  @app.get("/api/health", summary="Liveness")
  async def health() -> dict[str, str]:
    return {"status": "ok"}

  @app.get("/api/index", summary="What the index holds")
  async def index_info() -> dict[str, Any]:
    index, meta = searcher.index, searcher.index.meta
    return {"path": str(index.path), "rows": index.count, "dims": index.dims, "dtype": index.dtype,
            "kind": index.kind, "checkpoint": searcher.model.checkpoint, "step": meta.get("step"),
            "source": meta.get("source"), "captions": bool(meta.get("captions")),
            "thumbnails": thumbnails.available, "backend": searcher.backend,
            "limits": {"max_query_chars": MAX_QUERY_CHARS, "max_top_k": MAX_TOP_K},
            "served": {"queries": batcher.queries, "model_calls": batcher.model_calls}}

  @app.get("/api/search", summary="Text to clips, best first")
  async def search_text(q: str = Query(..., description=f"the sentence (at most {MAX_QUERY_CHARS} characters)"),
                        top_k: int = Query(DEFAULT_TOP_K, description=f"1..{MAX_TOP_K}")) -> dict[str, Any]:
    query, top_k = check_query(q), check_top_k(top_k)
    hits = await batcher.rank(query, top_k)
    return {"query": query, "top_k": top_k, "results": clips.results(hits)}

  @app.get("/api/similar", summary="The clips most like a clip (video to video)")
  async def similar(id: str = Query(..., description="a clip id of the index"),  # noqa: A002 - the API's name
                    top_k: int = Query(DEFAULT_TOP_K, description=f"1..{MAX_TOP_K}")) -> dict[str, Any]:
    row, top_k = clips.row(check_name(id, "clip id")), check_top_k(top_k)
    hits = await batcher.similar(row, top_k)
    return {"clip": clips.describe(row), "top_k": top_k, "results": clips.results(hits)}

  @app.get("/api/clip", summary="One clip: captions and thumbnail")
  async def clip(id: str = Query(..., description="a clip id of the index")) -> dict[str, Any]:  # noqa: A002
    return clips.describe(clips.row(check_name(id, "clip id")))

  @app.get("/thumbnails/{name}", summary="A clip's thumbnail strip (JPEG)")
  async def thumbnail(name: str) -> Response:
    check_name(name, "thumbnail name")
    if not _THUMBNAIL_NAME.fullmatch(name):
      raise BadRequest(f"thumbnail name {name!r} is not ROW.jpg", 404)
    data = thumbnails.strip(int(name[:-4]))
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
