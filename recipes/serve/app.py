"""The FastAPI app of ``deepfeat serve``: the page, its assets and the JSON API over :class:`ServeState`."""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations at run time,
# and the endpoints are closures over lazily imported FastAPI types (the CLI must load without the
# ``serve`` extra).

import contextlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepfeat.connectors.client import MilvusConnector
from deepfeat.finetune.errors import ConnectorError, DataError, DeepfeatError, MismatchError, MissingExtraError

from .requests import NotFoundError, PayloadTooLargeError, parse_search_request
from .security import LOOPBACK_NAMES, MAX_UPLOAD_BYTES, BodyLimit, SecurityHeaders
from .state import THUMBNAIL_SIZE, PanelConfig, ServeState

if TYPE_CHECKING:
    from fastapi import FastAPI

#: The page's HTML, JavaScript and CSS (nothing from a CDN).
STATIC_DIR = Path(__file__).with_name("static")


def status_of(exc: DeepfeatError) -> int:
    """The HTTP status of a refused request."""
    if isinstance(exc, PayloadTooLargeError):
        return 413
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, MismatchError):
        return 409
    if isinstance(exc, ConnectorError):
        return 503
    return 400


def _json_param(value: Any) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if not isinstance(value, str):
        raise DataError("the 'params' form field must be JSON text, not a file")
    try:
        data = json.loads(value)
    except json.JSONDecodeError as exc:
        raise DataError(f"the 'params' form field is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"the 'params' form field must be a JSON object, got {type(data).__name__}")
    return data


def create_app(
    panels: Sequence[PanelConfig],
    *,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int | None = None,
    allowed_hosts: Sequence[str] | None = LOOPBACK_NAMES,
    connectors: Mapping[str, MilvusConnector] | None = None,
) -> "FastAPI":
    """The FastAPI app of ``deepfeat serve`` over one panel, or two side by side.

    Connectors and bundles are opened here, so a locked ``.db``, a missing collection or a bundle that
    did not fill it is reported before the server starts; they are closed when the app shuts down.

    Args:
        panels: one :class:`PanelConfig`, or two to compare.
        max_upload_bytes: largest accepted upload (413 above).
        max_pixels: largest accepted image in pixels (default: ``load_image``'s decompression-bomb limit).
        allowed_hosts: ``Host`` header names answered (default: loopback names); ``None`` for any.
        connectors: open connectors by URI to share (not closed by the app), e.g. in tests.

    Endpoints: ``GET /`` (the page), ``GET /api/info``, ``GET /api/examples?n=``, ``POST /api/search``
    (multipart: ``image`` file and ``params`` JSON; or a JSON body with ``id``), ``GET
    /api/image/{panel}/{pk}?size=`` (a PNG of the record's image file, or of its row of a Hugging Face
    ``save_to_disk`` folder; files and dataset folders inside the panel's image root only).

    Long because it is a FastAPI app factory: the routes, exception handler and lifespan are closures over the
    one ``ServeState`` opened here and over the FastAPI names imported lazily (FastAPI is an optional extra).

    Raises:
        MissingExtraError: FastAPI is not installed.
    """
    try:
        from fastapi import FastAPI, Query, Request
        from fastapi.responses import FileResponse, JSONResponse, Response
        from fastapi.staticfiles import StaticFiles
        from starlette.concurrency import run_in_threadpool
        from starlette.datastructures import UploadFile
        from starlette.middleware.trustedhost import TrustedHostMiddleware
    except ImportError as exc:
        raise MissingExtraError("fastapi", "serve", "deepfeat serve") from exc

    state = ServeState.open(panels, max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, connectors=connectors)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            state.close()

    app = FastAPI(
        title="deepfeat serve",
        summary="Search a deepfeat collection by image, and compare two",
        docs_url=None,  # the interactive docs load their scripts from a CDN
        redoc_url=None,
        openapi_url="/api/openapi.json",
        lifespan=lifespan,
    )
    app.state.deepfeat = state
    # multipart framing, the params field and the file name come on top of the image bytes
    app.add_middleware(BodyLimit, limit=max_upload_bytes + 256 * 1024, file_limit=max_upload_bytes)
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    app.add_middleware(SecurityHeaders)

    @app.exception_handler(DeepfeatError)
    async def deepfeat_error(request: Request, exc: DeepfeatError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status_of(exc))

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"cache-control": "no-cache"})

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        return state.info()

    @app.get("/api/examples")
    async def examples(n: int = Query(8, ge=1, le=48), seed: int | None = None) -> list[dict[str, Any]]:
        return await run_in_threadpool(state.examples, n, seed)

    @app.post("/api/search")
    async def search(request: Request) -> dict[str, Any]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            async with request.form(max_files=1, max_fields=4) as form:
                upload = form.get("image")
                if not isinstance(upload, UploadFile):
                    raise DataError("the form has no file in its 'image' field; choose an image to upload")
                params = _json_param(form.get("params"))
                req = parse_search_request(params)
                filename = Path(upload.filename or "upload").name
                data = await upload.read(state.max_upload_bytes + 1)
            return await run_in_threadpool(state.search_upload, data, filename, req)
        if kind == "application/json":
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"the request body is not valid JSON ({exc})") from None
            return await run_in_threadpool(state.search_record, parse_search_request(body))
        raise DataError(
            f"send the query as multipart/form-data (an 'image' file) or application/json ({{\"id\": ...}}), "
            f"not {kind or 'no content type'!r}"
        )

    @app.get("/api/image/{panel}/{pk}")
    def image(panel: int, pk: str, size: int = Query(THUMBNAIL_SIZE, ge=16, le=1024)) -> Response:
        png = state.thumbnail(panel, pk, size)
        return Response(png, media_type="image/png", headers={"cache-control": "private, max-age=300"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
