"""HTTP service and web page: ``msflow serve --model runs/demo`` then open http://127.0.0.1:8000/.

Endpoints
---------
``GET /``             the web page (drop or pick an image; shows the overlay, score and decision)
``GET /static/<f>``   the page's own CSS/JS, from an in-memory allow-list (never a filesystem lookup)
``GET /health``       ``{"status": "ok"}`` (always open, also with an API key)
``GET /model``        ``{config, metrics, threshold, dataset, msflow_version, runtime}``, every filesystem
                      path cut to its last part (the training data's folders are nobody's business)
``POST /predict``     multipart field ``file`` (an image). JSON ``{score, normalized_score, decision,
                      threshold, defect_pixels, width, height, timing_ms}``; ``?overlay=true`` adds
                      ``overlay_png`` (base64 PNG: jet heat map of the image map, predicted defect contour
                      in red); ``?format=png`` answers that PNG itself, the verdict in ``X-MSFlow-*`` headers.

Every error is JSON ``{"detail": "..."}``; bad input never gives a 500:

* 413: the body exceeds ``max_upload_bytes``, by its ``Content-Length`` (checked before anything is
  read) or by the bytes counted as they come (a chunked body or a lying header); or the image has more
  than ``max_pixels`` pixels by its header, refused before decoding (decompression bombs).
* 415: not ``multipart/form-data``, or not a decodable image in one of :data:`ALLOWED_FORMATS`.
* 400: a malformed multipart body (no boundary, garbage, too many parts).
* 422: no ``file`` field, or a bad query parameter.
* 401: an API key is configured (:func:`read_api_key`) and the ``X-API-Key`` header is missing or wrong
  (compared in constant time). ``/health``, the page and its static files stay open (the page is where
  a person types the key).
* 429: over the client's request rate, or ``max_concurrent`` requests in progress (:class:`Limits`);
  with ``Retry-After``. Checked before the API key, so guessing keys is rate-limited too.

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
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from msflow.errors import missing_extra

try:
    from fastapi import FastAPI, HTTPException, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ImportError as missing:  # the service is the extra "serve"
    raise missing_extra(missing.name or "fastapi", "serve", "msflow serve") from None

from msflow._version import __version__
from msflow.data.images import decode, image_size, to_uint8
from msflow.errors import DataError, ImageTooLargeError, MSFlowError, require_extra
from msflow.files import without_paths
from msflow.infer.predictor import Predictor

log = logging.getLogger("msflow.serve")

API_KEY_HEADER = "X-API-Key"
API_KEY_ENV = "MSFLOW_API_KEY"
DEFAULT_MAX_UPLOAD_BYTES = 20 * 2**20
DEFAULT_MAX_CONCURRENT = 8  # msflow serve's default: requests in progress at once, beyond which 429
DEFAULT_RATE = 10.0  # msflow serve's default: requests per second per client (burst: one second's worth)
DEFAULT_MAX_PIXELS = 40_000_000  # ~ 8000 x 5000; a bigger image needs GBs for its full-resolution maps
# Decoders a request may reach. Image.open would otherwise try every Pillow plugin (EPS even runs
# Ghostscript); camera images come in these.
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM")
OPEN_PATHS = frozenset({"/", "/health"})  # no API key needed (plus /static/*)
# The only files the service ever serves (name in msflow/static -> media type), besides the page.
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
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


@dataclass(frozen=True)
class Limits:
    """What one client, and all of them together, may ask of the service (``None``: no limit): bodies
    of ``max_body`` bytes, ``max_concurrent`` requests in progress (one more is refused at once, not
    queued), ``rate`` requests per second per client in bursts of ``burst`` (:class:`TokenBuckets`)."""

    max_body: int = DEFAULT_MAX_UPLOAD_BYTES
    max_concurrent: int | None = None
    rate: float | None = None
    burst: int | None = None

    def __post_init__(self) -> None:
        if self.max_body <= 0:
            raise MSFlowError(f"max_upload_bytes must be positive, got {self.max_body}")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise MSFlowError(f"the concurrent request limit must be at least 1, got {self.max_concurrent}")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise MSFlowError(f"the request rate limit must be a positive number, got {self.rate}")
        if self.burst is not None and self.burst < 1:
            raise MSFlowError(f"the request burst must be at least 1, got {self.burst}")


class TokenBuckets:
    """One token bucket per client: ``burst`` tokens at most, refilled at ``rate`` per second; a request
    takes one. Buckets that have refilled completely are forgotten when there are too many clients, so
    memory stays bounded under a flood of addresses."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic, max_clients: int = 10_000
    ) -> None:
        self.rate, self.burst, self.clock, self.max_clients = float(rate), float(burst), clock, max_clients
        self.buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, when)

    def take(self, client: str) -> float:
        """0 when ``client`` may go on (a token is taken), else the seconds until it may."""
        now = self.clock()
        tokens, then = self.buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens < 1.0:
            self.buckets[client] = (tokens, now)
            return (1.0 - tokens) / self.rate
        if client not in self.buckets and len(self.buckets) >= self.max_clients:
            self._forget_full(now)
        self.buckets[client] = (tokens - 1.0, now)
        return 0.0

    def _forget_full(self, now: float) -> None:
        full = [c for c, (t, when) in self.buckets.items() if t + (now - when) * self.rate >= self.burst]
        for client in full or list(self.buckets)[: len(self.buckets) // 2]:
            del self.buckets[client]


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((v for k, v in scope.get("headers", []) if k.lower() == name), None)


class GuardMiddleware:
    """Pure ASGI middleware: rate and concurrency limits, API key, body-size cap (header and counted
    bytes), security headers.

    It runs before any routing or body parsing, so a refused request (limited, unauthenticated or
    oversized) is answered without reading its body.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, limits: Limits) -> None:
        self.app = app
        self.api_key = api_key.encode("utf-8") if api_key else None
        self.limits = limits
        self.max_body = int(limits.max_body)
        mib = self.max_body / 2**20
        self.too_large = f"request body too large: the limit is {self.max_body:,} bytes ({mib:.3g} MiB)"
        rate, burst = limits.rate, limits.burst
        self.buckets = TokenBuckets(rate, burst or max(1, math.ceil(rate))) if rate else None
        self.active = 0  # requests in progress (one event loop: no lock needed)

    async def _reply(self, send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]]) -> None:
        body = json.dumps({"detail": detail}).encode()
        length = (b"content-length", str(len(body)).encode())
        headers = [(b"content-type", b"application/json"), length, *headers, *SECURITY_HEADERS]
        if status == 413:  # the rest of the body is not read: the connection cannot be reused
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _refusal(self, scope: Scope, api: bool) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
        """Why a request is refused before anything is read, or ``None`` to let it in: the limits and
        the key first (API paths only), then the declared size (every path)."""
        if api:
            wait = self.buckets.take((scope.get("client") or ("?",))[0]) if self.buckets else 0.0
            if wait > 0:
                return 429, "too many requests from this client; retry later", _retry_after(wait)
            given = _header(scope, API_KEY_HEADER.lower().encode()) or b""
            if self.api_key is not None and not hmac.compare_digest(given, self.api_key):
                why = f"missing or invalid API key (send it in the {API_KEY_HEADER} header)"
                return 401, why, [(b"www-authenticate", API_KEY_HEADER.encode())]
            limit = self.limits.max_concurrent
            if limit is not None and self.active >= limit:
                busy = f"the service is busy ({limit} requests in progress); retry later"
                return 429, busy, _retry_after(1)
        declared = _header(scope, b"content-length")
        try:
            size = int(declared) if declared is not None else 0
        except ValueError:
            return 400, "invalid Content-Length header", []
        return (413, self.too_large, []) if size > self.max_body else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        api = path not in OPEN_PATHS and not path.startswith("/static/")
        refusal = self._refusal(scope, api)
        if refusal is not None:
            await self._reply(send, *refusal)
            return
        self.active += api
        try:
            await self._pass_on(scope, receive, send)
        finally:
            self.active -= api

    async def _pass_on(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app, counting the body bytes as they come and adding the security headers."""
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
                await self._reply(send, 413, self.too_large, [])


def _retry_after(seconds: float) -> list[tuple[bytes, bytes]]:
    return [(b"retry-after", str(max(1, math.ceil(seconds))).encode())]


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


def create_app(
    predictor: Predictor,
    api_key: str | None = None,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_concurrent: int | None = None,
    rate: float | None = None,
    burst: int | None = None,
) -> FastAPI:
    """The FastAPI application serving ``predictor`` (see the module docstring for the API).

    ``max_concurrent``, ``rate`` and ``burst`` are the :class:`Limits` (``None``: none; ``msflow serve``
    sets them); ``burst`` defaults to one second's worth of ``rate``.
    """
    limits = Limits(max_upload_bytes, max_concurrent, rate, burst)
    # No interactive docs: they load their assets from a CDN.
    app = FastAPI(title="MSFlow anomaly detection", version=__version__, docs_url=None, redoc_url=None)
    app.state.predictor = predictor
    _add_error_handlers(app)
    _add_read_routes(app, model_info(predictor))
    _add_predict_route(app, predictor, max_pixels)
    app.add_middleware(GuardMiddleware, api_key=api_key, limits=limits)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors) or "invalid request"
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def _server_fault(request: Request, exc: Exception) -> JSONResponse:
        # Only reached for genuine server faults: every input problem is an HTTPException by then.
        log.exception("internal error while handling %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error"}, status_code=500)


def _add_read_routes(app: FastAPI, info: dict[str, Any]) -> None:
    """The web page, its static files (read once, here), /health and /model. They are coroutines: they
    never wait for a worker thread, so /health answers at once even when every worker thread is busy
    with predictions."""
    root = resources.files("msflow") / "static"
    files = {**STATIC_FILES, "index.html": "text/html; charset=utf-8"}
    assets = {name: (root.joinpath(name).read_bytes(), media) for name, media in files.items()}

    def asset(name: str) -> Response:
        body, media = assets[name]
        return Response(body, media_type=media, headers={"cache-control": "no-cache"})

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return asset("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in STATIC_FILES:  # an allow-list lookup in memory: no path ever reaches the filesystem
            raise HTTPException(404, "Not Found")
        return asset(name)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/model")
    async def model() -> JSONResponse:
        return JSONResponse(info)


def model_info(predictor: Predictor) -> dict[str, Any]:
    """What ``GET /model`` shows: the run's settings and figures, without any filesystem path."""
    meta = predictor.meta
    info = {
        "config": predictor.config.to_dict(),
        "metrics": meta.get("metrics"),
        "threshold": predictor.threshold.to_dict(),
        "dataset": meta.get("dataset"),
        "msflow_version": meta.get("msflow_version", __version__),
        "runtime": predictor.runtime,
    }
    return _finite(without_paths(info))


UPLOAD_FORM = {  # what /predict reads by hand, for its OpenAPI schema
    "type": "object",
    "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary", "description": "the image"}},
}
UPLOAD_SCHEMA = {
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": UPLOAD_FORM}}}
}


async def _read_upload(request: Request) -> bytes:
    """The bytes of the multipart field ``file``; a malformed body is a 4xx with its reason."""
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
        return await upload.read()
    finally:
        await form.close()


def _judge(
    predictor: Predictor, data: bytes, max_pixels: int, want_overlay: bool, heavy: threading.Semaphore
) -> tuple[dict[str, Any], bytes | None, dict[str, float]]:
    """Holding ``heavy``, decode, predict and (if wanted) draw one upload: (summary, PNG, seconds/step)."""
    with heavy:
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
    width, height = image_size(image)
    summary = {**pred.summary(), "width": width, "height": height}
    return summary, png, {"decode": t2 - t1, "predict": t3 - t2, "overlay": t4 - t3}


def _answer(summary: dict[str, Any], png: bytes | None, timing: dict[str, float], as_png: bool) -> Response:
    total_ms = round(timing.pop("total") * 1000.0, 2)
    if as_png:
        headers = {
            "X-MSFlow-Score": repr(summary["score"]),
            "X-MSFlow-Decision": summary["decision"],
            "X-MSFlow-Normalized-Score": repr(summary["normalized_score"]),
            "X-MSFlow-Timing-Ms": str(total_ms),
        }
        return Response(png, media_type="image/png", headers=headers)
    result = _finite({**summary, "timing_ms": total_ms})
    result["timing_detail_ms"] = {k: round(v * 1000.0, 2) for k, v in timing.items()}
    if png is not None:
        result["overlay_png"] = base64.b64encode(png).decode("ascii")
    return JSONResponse(result)


def _add_predict_route(app: FastAPI, predictor: Predictor, max_pixels: int) -> None:
    # Decoding, the forward pass (serialised by the predictor's lock anyway) and the overlay of at most
    # this many requests at once: it bounds the memory that big images can take, not the throughput.
    heavy = threading.BoundedSemaphore(max(2, min(8, os.cpu_count() or 2)))

    @app.post("/predict", openapi_extra=UPLOAD_SCHEMA)
    async def predict(
        request: Request,
        overlay: bool = Query(False, description="add overlay_png (base64)"),
        format: Literal["json", "png"] = Query("json", description="png: answer the overlay PNG itself"),
    ) -> Response:
        t0 = time.perf_counter()
        data = await _read_upload(request)
        t_read = time.perf_counter()
        want_overlay = overlay or format == "png"
        summary, png, parts = await run_in_threadpool(
            _judge, predictor, data, max_pixels, want_overlay, heavy
        )
        timing = {"read": t_read - t0, **parts, "total": time.perf_counter() - t0}
        return _answer(summary, png, timing, format == "png")


def read_api_key(api_key_file: str | None = None) -> str | None:
    """The service's key: the first line of ``api_key_file`` if given, else ``$MSFLOW_API_KEY``, else
    none. Never a command-line value, which every user of the machine can read in the process list."""
    if api_key_file is None:
        return os.environ.get(API_KEY_ENV) or None
    path = Path(api_key_file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or err
        raise MSFlowError(f"cannot read the API key file '{path}': {reason}") from None
    key = next(iter(text.strip().splitlines()), "").strip()
    if not key:
        raise MSFlowError(f"the API key file '{path}' is empty")
    if os.name == "posix" and path.stat().st_mode & 0o077:
        log.warning("the API key file '%s' is readable by other users (chmod 600 it)", path)
    return key


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    runtime: str = "auto",
    max_upload_mb: float = 20.0,
    device: str = "auto",
    api_key_file: str | None = None,
    max_concurrent: int | None = DEFAULT_MAX_CONCURRENT,
    rate: float | None = DEFAULT_RATE,
    burst: int | None = None,
) -> None:
    """Load the run ``model`` and serve it with uvicorn until interrupted (``msflow serve``).

    The key is ``api_key`` (from Python), else :func:`read_api_key` (the file, else the environment).
    """
    uvicorn = require_extra("uvicorn", "serve", "msflow serve")
    api_key = (api_key or None) if api_key is not None else read_api_key(api_key_file)  # "" means none
    if not (max_upload_mb > 0 and math.isfinite(max_upload_mb)):
        raise MSFlowError(f"--max-upload-mb must be a positive number, got {max_upload_mb}")
    limits = {"max_concurrent": max_concurrent, "rate": rate, "burst": burst}
    Limits(1, **limits)  # a bad limit is refused before the model loads
    predictor = Predictor.load(model, device, runtime, batch_size=1)  # a request is one image
    app = create_app(predictor, api_key=api_key, max_upload_bytes=int(max_upload_mb * 2**20), **limits)
    _announce(model, predictor, host, port, api_key is not None)
    uvicorn.run(app, host=host, port=port, log_level="info")


def _announce(model: str, predictor: Predictor, host: str, port: int, keyed: bool) -> None:
    mc = predictor.config.model
    log.info(
        f"msflow serve: model '{model}' ({mc.backbone}, {'x'.join(map(str, mc.size))} px, "
        f"runtime {predictor.runtime}, device {predictor.device})"
    )
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    shown = f"[{shown}]" if ":" in shown and not shown.startswith("[") else shown  # an IPv6 address
    api = "API: POST /predict, GET /model, GET /health"
    log.info(f"open http://{shown}:{port}/ in a browser ({api})")
    loopback = host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
    if keyed:
        log.info(f"an API key is required: header {API_KEY_HEADER} (the web page has a field for it)")
    elif not loopback:
        log.warning(
            f"listening on {host} without an API key; anyone who can reach it can use it "
            f"(set ${API_KEY_ENV} or --api-key-file)"
        )
