"""HTTP service and web page: ``msflow serve --model runs/demo`` then open http://127.0.0.1:8000/.

Endpoints
---------
``GET /``             the web page (drop or pick an image; shows the overlay, score and decision)
``GET /static/<f>``   the page's own CSS/JS, from a fixed in-memory allow-list (never a filesystem lookup)
``GET /health``       ``{"status": "ok"}`` (always open, also with an API key)
``GET /model``        ``{config, metrics, threshold, dataset, msflow_version}``
``POST /predict``     multipart field ``file`` (an image). JSON ``{score, normalized_score, decision,
                      threshold, defect_pixels, width, height, timing_ms}``; ``?overlay=true`` adds
                      ``overlay_png`` (base64 PNG: jet heat map of the image map with the predicted
                      defect contour in red); ``?format=png`` answers the overlay PNG itself
                      (``image/png``, with the verdict in ``X-MSFlow-*`` headers).

Limits and errors (every error is JSON ``{"detail": "..."}``; bad input never gives a 500):

* 413: the request body exceeds ``max_upload_bytes`` (multipart overhead included). The
  ``Content-Length`` header is checked before anything is read, and the bytes actually received are
  counted as well, so a chunked body or a lying header cannot get past the cap. Images with more
  than ``max_pixels`` pixels are refused from their header, before decoding (decompression bombs).
* 415: the request is not ``multipart/form-data``, or the upload is not a decodable image in one of
  :data:`ALLOWED_FORMATS`.
* 400: a malformed multipart body (no boundary, garbage, too many parts).
* 422: no ``file`` field, or a bad query parameter.
* 401: an API key is configured (``--api-key`` or ``$MSFLOW_API_KEY``) and the ``X-API-Key`` header is
  missing or wrong (compared in constant time). ``/health``, the page and its static files stay open
  (the page is where a person types the key).

Predictions run in a worker thread (the event loop stays responsive); the :class:`Predictor` serialises
forward passes with its own lock, so concurrent requests are safe.
"""

from __future__ import annotations

import base64
import hmac
import io
import json
import logging
import math
import os
import threading
import time
from importlib import resources
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from msflow._version import __version__
from msflow.data.images import decode, image_size, to_uint8
from msflow.errors import DataError, ImageTooLargeError, MSFlowError
from msflow.infer.predictor import Predictor

log = logging.getLogger("msflow.serve")

API_KEY_HEADER = "X-API-Key"
API_KEY_ENV = "MSFLOW_API_KEY"
DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20
DEFAULT_MAX_PIXELS = 40_000_000  # ~ 8000 x 5000; a bigger image needs GBs for its full-resolution maps
# Decoders a request may reach. Image.open would otherwise try every Pillow plugin (EPS even runs
# Ghostscript); camera images come in these.
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM")
OPEN_PATHS = frozenset({"/", "/health"})  # no API key needed (plus /static/*)
STATIC_FILES = {  # URL name -> (package file, media type); the only files the service ever serves
    "app.js": ("app.js", "text/javascript; charset=utf-8"),
    "style.css": ("style.css", "text/css; charset=utf-8"),
}
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
]


class BodyTooLarge(Exception):
    """Raised from ``receive`` when a request body goes past the cap (turned into a 413)."""


def _json_error(
    status: int, detail: str, extra_headers: list[tuple[bytes, bytes]] | None = None
) -> tuple[dict, bytes]:
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(extra_headers or []),
    ]
    return {"type": "http.response.start", "status": status, "headers": headers}, body


class GuardMiddleware:
    """Pure ASGI middleware: API key, body-size cap (header and counted bytes), security headers.

    It runs before any routing or body parsing, so an unauthenticated or oversized request is refused
    without reading its body.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int) -> None:
        self.app = app
        self.api_key = api_key.encode("utf-8") if api_key else None
        self.max_body = int(max_body)

    async def _reply(
        self, send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        start, body = _json_error(status, detail, headers)
        start["headers"] += SECURITY_HEADERS
        if status == 413:  # the rest of the body is not read: the connection cannot be reused
            start["headers"].append((b"connection", b"close"))
        await send(start)
        await send({"type": "http.response.body", "body": body})

    def _authorised(self, scope: Scope) -> bool:
        if self.api_key is None:
            return True
        path = scope.get("path", "")
        if path in OPEN_PATHS or path.startswith("/static/"):
            return True
        wanted = API_KEY_HEADER.lower().encode()
        given = next((v for k, v in scope.get("headers", []) if k.lower() == wanted), None)
        return given is not None and hmac.compare_digest(given, self.api_key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._authorised(scope):
            await self._reply(
                send,
                401,
                f"missing or invalid API key (send it in the {API_KEY_HEADER} header)",
                [(b"www-authenticate", API_KEY_HEADER.encode())],
            )
            return
        for key, value in scope.get("headers", []):
            if key.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await self._reply(send, 400, "invalid Content-Length header")
                    return
                if declared > self.max_body:
                    await self._reply(send, 413, self._too_large_message())
                    return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._reply(send, 413, self._too_large_message())

    def _too_large_message(self) -> str:
        mib = self.max_body / 2**20
        return f"request body too large: the limit is {self.max_body:,} bytes ({mib:.3g} MiB)"


def decode_upload(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode uploaded bytes with :func:`msflow.data.images.decode` (the rules every input follows),
    restricted to :data:`ALLOWED_FORMATS`; its errors become 413 (too many pixels) or 415."""
    try:
        return decode(data, max_pixels=max_pixels, formats=ALLOWED_FORMATS)
    except ImageTooLargeError as exc:
        raise HTTPException(413, str(exc)) from None
    except DataError as exc:
        raise HTTPException(415, str(exc)) from None


def overlay_png(image: np.ndarray, image_map: np.ndarray, mask: np.ndarray) -> bytes:
    """PNG bytes of the jet heat map of ``image_map`` over ``image`` with the mask's contour in red."""
    from msflow.evaluate.report import jet_overlay  # matplotlib: imported when first needed

    out = jet_overlay(to_uint8(image), image_map, alpha=0.45, pred_mask=mask)
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _finite(value: Any) -> Any:
    """JSON-safe copy: non-finite floats (an ``inf`` pixel threshold, say) become ``None``."""
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _static_assets() -> dict[str, tuple[bytes, str]]:
    root = resources.files("msflow") / "static"
    assets = {
        name: (root.joinpath(fname).read_bytes(), media) for name, (fname, media) in STATIC_FILES.items()
    }
    assets["index.html"] = (root.joinpath("index.html").read_bytes(), "text/html; charset=utf-8")
    return assets


def create_app(
    predictor: Predictor,
    api_key: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> FastAPI:
    """The FastAPI application serving ``predictor`` (see the module docstring for the API)."""
    if max_upload_bytes <= 0:
        raise MSFlowError(f"max_upload_bytes must be positive, got {max_upload_bytes}")
    app = FastAPI(
        title="MSFlow anomaly detection", version=__version__, docs_url=None, redoc_url=None
    )  # the interactive docs load assets from a CDN
    app.state.predictor = predictor
    assets = _static_assets()
    # Decoding, the forward pass (serialised by the predictor's lock anyway) and the overlay of at most
    # this many requests at once: it bounds the memory that big images can take, not the throughput.
    heavy = threading.BoundedSemaphore(max(2, min(8, os.cpu_count() or 2)))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors)
        detail = detail or "invalid request"
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def _server_fault(request: Request, exc: Exception) -> JSONResponse:
        # Only reached for genuine server faults: every input problem is an HTTPException by then.
        log.exception("internal error while handling %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    # The small endpoints are coroutines: they never wait for a worker thread, so /health answers at
    # once even when every worker thread is busy with predictions.
    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        body, media = assets["index.html"]
        return Response(body, media_type=media, headers={"cache-control": "no-cache"})

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in STATIC_FILES:  # an allow-list lookup in memory: no path ever reaches the filesystem
            raise HTTPException(404, "Not Found")
        body, media = assets[name]
        return Response(body, media_type=media, headers={"cache-control": "no-cache"})

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/model")
    async def model_info() -> JSONResponse:
        meta = predictor.meta or {}
        return JSONResponse(
            _finite(
                {
                    "config": predictor.config.to_dict(),
                    "metrics": meta.get("metrics"),
                    "threshold": predictor.threshold.to_dict(),
                    "dataset": meta.get("dataset"),
                    "msflow_version": meta.get("msflow_version", __version__),
                    "runtime": predictor.runtime,
                }
            )
        )

    upload_schema = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary", "description": "the image"}
                        },
                    }
                }
            },
        }
    }

    @app.post("/predict", openapi_extra=upload_schema)
    async def predict(
        request: Request,
        overlay: bool = Query(False, description="add overlay_png (base64)"),
        format: Literal["json", "png"] = Query("json", description="png: answer the overlay PNG itself"),
    ) -> Response:
        t0 = time.perf_counter()
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "multipart/form-data":
            raise HTTPException(415, "send the image as multipart/form-data in a field named 'file'")
        try:
            form = await request.form(max_files=1, max_fields=8, max_part_size=64 * 1024)
        except (StarletteHTTPException, BodyTooLarge):  # starlette's 400s carry a useful message
            raise
        except ClientDisconnect:
            raise HTTPException(400, "client disconnected while sending the body") from None
        except Exception as exc:  # noqa: BLE001 - python-multipart raises assorted errors on garbage
            raise HTTPException(400, f"malformed multipart body ({type(exc).__name__})") from None
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise HTTPException(422, "no complete form field 'file' (an image upload) in the request")
            data = await upload.read()
        finally:
            await form.close()
        t_read = time.perf_counter()
        want_overlay = overlay or format == "png"

        def work() -> tuple[dict[str, Any], bytes | None, dict[str, float]]:
            with heavy:
                return judge()

        def judge() -> tuple[dict[str, Any], bytes | None, dict[str, float]]:
            t1 = time.perf_counter()
            image = decode_upload(data, max_pixels)
            t2 = time.perf_counter()
            try:
                pred = predictor.predict_images([image])[0]
            except DataError as exc:
                raise HTTPException(415, str(exc)) from None
            t3 = time.perf_counter()
            png = overlay_png(image, pred.image_map, pred.mask) if want_overlay else None
            t4 = time.perf_counter()
            summary = pred.summary()
            summary.update(zip(("width", "height"), image_size(image), strict=True))
            return summary, png, {"decode": t2 - t1, "predict": t3 - t2, "overlay": t4 - t3}

        summary, png, parts = await run_in_threadpool(work)
        total_ms = round((time.perf_counter() - t0) * 1000.0, 2)
        result = _finite({**summary, "timing_ms": total_ms})
        result["timing_detail_ms"] = {
            "read": round((t_read - t0) * 1000.0, 2),
            **{k: round(v * 1000.0, 2) for k, v in parts.items()},
        }
        if format == "png":
            headers = {
                "X-MSFlow-Score": repr(summary["score"]),
                "X-MSFlow-Decision": summary["decision"],
                "X-MSFlow-Normalized-Score": repr(summary["normalized_score"]),
                "X-MSFlow-Timing-Ms": str(total_ms),
            }
            return Response(png, media_type="image/png", headers=headers)
        if png is not None:
            result["overlay_png"] = base64.b64encode(png).decode("ascii")
        return JSONResponse(result)

    app.add_middleware(GuardMiddleware, api_key=api_key, max_body=max_upload_bytes)
    return app


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    runtime: str = "auto",
    max_upload_mb: float = 20.0,
    device: str = "auto",
) -> None:
    """Load the run ``model`` and serve it with uvicorn until interrupted (``msflow serve``)."""
    import uvicorn

    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    api_key = api_key or None  # an empty key means no key
    if not (max_upload_mb > 0 and math.isfinite(max_upload_mb)):
        raise MSFlowError(f"--max-upload-mb must be a positive number, got {max_upload_mb}")
    predictor = Predictor.load(model, device, runtime, batch_size=1)  # a request is one image
    app = create_app(predictor, api_key=api_key, max_upload_bytes=int(max_upload_mb * 2**20))
    loopback = host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
    mc = predictor.config.model
    log.info(
        f"msflow serve: model '{model}' ({mc.backbone}, {'x'.join(map(str, mc.size))} px, "
        f"runtime {predictor.runtime}, device {predictor.device})"
    )
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    api = "API: POST /predict, GET /model, GET /health"
    log.info(f"open http://{_url_host(shown)}:{port}/ in a browser ({api})")
    if api_key:
        log.info(f"an API key is required: header {API_KEY_HEADER} (the web page has a field for it)")
    elif not loopback:
        log.warning(
            f"listening on {host} without an API key; anyone who can reach it can use it "
            f"(set --api-key or ${API_KEY_ENV})"
        )
    uvicorn.run(app, host=host, port=port, log_level="info")
