"""The HTTP service (msflow.serve) through FastAPI's TestClient: API, limits, errors, API key, page."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from msflow.infer.serve import create_app, decode_upload

try:
    from serve_fixtures import IMAGE_THRESHOLD, detector, png_bytes, run_dir  # noqa: F401
except ImportError:  # tests/ became a package
    from .serve_fixtures import IMAGE_THRESHOLD, detector, png_bytes, run_dir  # noqa: F401

KEYS = {"score", "normalized_score", "decision", "threshold", "defect_pixels", "width", "height", "timing_ms"}


@pytest.fixture(scope="module")
def client(detector) -> TestClient:  # noqa: F811
    # raise_server_exceptions (the default) turns any unexpected server error into a test failure.
    with TestClient(create_app(detector.predictor)) as c:
        yield c


@pytest.fixture(scope="module")
def image() -> bytes:
    return png_bytes(48, seed=1)


def post(client: TestClient, data: bytes, name: str = "part.png", ctype: str = "image/png", **params):
    return client.post("/predict", files={"file": (name, data, ctype)}, params=params)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny (invalid) image stream."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert r.headers["x-content-type-options"] == "nosniff"


def test_model(client, detector):  # noqa: F811
    r = client.get("/model")
    assert r.status_code == 200
    body = r.json()
    assert {"config", "metrics", "threshold", "dataset", "msflow_version"} <= set(body)
    assert body["config"]["model"]["backbone"] == "resnet18"
    assert body["config"]["model"]["image_size"] == 64
    assert body["metrics"] == {"image_auroc": 50.0}
    assert body["dataset"] == "fake"
    assert body["threshold"]["image"] == IMAGE_THRESHOLD
    assert body["msflow_version"]


def test_predict_json(client, image, detector):  # noqa: F811
    r = post(client, image)
    assert r.status_code == 200, r.text
    body = r.json()
    assert KEYS <= set(body) and "overlay_png" not in body
    assert (body["width"], body["height"]) == (48, 48)
    assert body["threshold"] == detector.threshold.image
    assert body["decision"] == ("defective" if body["score"] >= body["threshold"] else "good")
    assert (body["normalized_score"] >= 0.5) == (body["decision"] == "defective")
    assert 0.0 <= body["normalized_score"] <= 1.0
    assert isinstance(body["defect_pixels"], int) and 0 <= body["defect_pixels"] <= 48 * 48
    assert body["timing_ms"] > 0
    # The same numbers as the Python API.
    expected = detector.predict(Image.open(io.BytesIO(image))).summary()
    assert body["score"] == pytest.approx(expected["score"], rel=1e-6, abs=1e-9)
    assert body["decision"] == expected["decision"]


def test_predict_overlay_is_png_of_image_size(client):
    data = png_bytes(40, seed=2)
    body = post(client, data, overlay="true").json()
    png = base64.b64decode(body["overlay_png"], validate=True)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    overlay = Image.open(io.BytesIO(png))
    assert overlay.format == "PNG" and overlay.size == (40, 40) and overlay.mode == "RGB"


def test_predict_non_square_grey_and_rgba(client):
    grey = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (30, 50), dtype=np.uint8)).save(grey, "PNG")
    body = post(client, grey.getvalue(), overlay="1").json()
    assert (body["width"], body["height"]) == (50, 30)
    assert Image.open(io.BytesIO(base64.b64decode(body["overlay_png"]))).size == (50, 30)
    assert post(client, png_bytes(20, seed=4, mode="RGBA")).status_code == 200


def test_predict_jpeg_and_format_png(client):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (24, 36, 3), dtype=np.uint8)).save(buf, "JPEG")
    r = post(client, buf.getvalue(), name="x.jpg", ctype="image/jpeg", format="png")
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (36, 24)
    assert r.headers["x-msflow-decision"] in ("good", "defective")
    assert float(r.headers["x-msflow-score"]) == pytest.approx(post(client, buf.getvalue()).json()["score"])


def test_content_type_of_the_part_does_not_matter(client, image):
    # Browsers send odd part types (application/octet-stream); the bytes decide.
    assert post(client, image, name="blob", ctype="application/octet-stream").status_code == 200


def test_oversized_upload_is_413(detector):  # noqa: F811
    small = TestClient(create_app(detector.predictor, max_upload_bytes=2000))
    big = png_bytes(64, seed=6)  # ~12 KB of random pixels
    assert len(big) > 2000
    r = post(small, big)
    assert r.status_code == 413
    assert "limit" in r.json()["detail"]
    # No Content-Length (chunked): the bytes are counted while they arrive.
    boundary = "xyz"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + big
        + f"\r\n--{boundary}--\r\n".encode()
    )

    def chunks():
        for i in range(0, len(body), 1000):
            yield body[i : i + 1000]

    r = small.post(
        "/predict", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert r.status_code == 413, r.text
    # Under the cap still works.
    assert post(small, png_bytes(8, seed=7)).status_code == 200


def test_too_many_pixels_is_413(detector):  # noqa: F811
    c = TestClient(create_app(detector.predictor, max_pixels=10_000))
    r = post(c, png_header_only(20_000, 20_000))
    assert r.status_code == 413 and "pixels" in r.json()["detail"]
    assert post(c, png_bytes(32)).status_code == 200


@pytest.mark.parametrize(
    "data,name,ctype",
    [
        (b"hello, this is not an image\n" * 10, "notes.txt", "text/plain"),
        (np.random.default_rng(0).bytes(5000), "noise.png", "image/png"),
        (b"", "empty.png", "image/png"),
        (png_bytes(32)[:200], "truncated.png", "image/png"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "x.eps", "application/postscript"),
        (b"GIF89a" + b"\0" * 20, "bad.gif", "image/gif"),
    ],
)
def test_not_an_image_is_415(client, data, name, ctype):
    r = post(client, data, name=name, ctype=ctype)
    assert r.status_code == 415, r.text
    assert isinstance(r.json()["detail"], str) and r.json()["detail"]


def test_missing_field_is_422(client, image):
    r = client.post("/predict", files={"image": ("a.png", image, "image/png")})
    assert r.status_code == 422 and "file" in r.json()["detail"]
    r = client.post("/predict", data={"file": "not a file"}, files={"other": ("a.png", image, "image/png")})
    assert r.status_code == 422


def test_wrong_request_content_type_is_415(client, image):
    for ctype in ("image/png", "application/json", "text/plain", "application/x-www-form-urlencoded"):
        r = client.post("/predict", content=image, headers={"content-type": ctype})
        assert r.status_code == 415, (ctype, r.text)
        assert "multipart" in r.json()["detail"]
    assert client.post("/predict").status_code == 415  # no body at all


ABC = "multipart/form-data; boundary=abc"
PART = b"--abc\r\nContent-Disposition: form-data; "


@pytest.mark.parametrize(
    "body,ctype",
    [
        (b"garbage", ABC),
        (PART + b'name="file"; filename="a.png"\r\n\r\n\x89PNG', ABC),  # cut short
        (b"--abc\r\nnot-a-header\r\n\r\ndata\r\n--abc--\r\n", ABC),
        (PART + b'filename="a.png"\r\n\r\ndata\r\n--abc--\r\n', ABC),  # no name
        (b"anything", "multipart/form-data"),  # no boundary
        (b"--abc\r\n\r\n--abc--\r\n", "multipart/form-data; boundary=zzz"),  # wrong boundary
        (b"--" + b"a" * 100 + b"\r\n", "multipart/form-data; boundary=" + "a" * 100),
    ],
)
def test_malformed_multipart_is_4xx(client, body, ctype):
    r = client.post("/predict", content=body, headers={"content-type": ctype})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert isinstance(r.json()["detail"], str)


def test_too_many_files_is_4xx(client, image):
    files = [("file", ("a.png", image, "image/png")), ("file", ("b.png", image, "image/png"))]
    r = client.post("/predict", files=files)
    assert r.status_code == 400


def test_bad_query_is_422(client, image):
    assert post(client, image, overlay="banana").status_code == 422
    r = post(client, image, format="gif")
    assert r.status_code == 422 and isinstance(r.json()["detail"], str)


def test_api_key(detector, image, monkeypatch):  # noqa: F811
    c = TestClient(create_app(detector.predictor, api_key="s3cret-key"))
    assert c.get("/health").status_code == 200  # stays open
    assert c.get("/").status_code == 200  # the page, where the key is typed
    assert c.get("/static/app.js").status_code == 200
    for headers in (
        {},
        {"X-API-Key": "wrong"},
        {"X-API-Key": ""},
        {"X-API-Key": "s3cret-key "},
        {"Authorization": "Bearer s3cret-key"},
    ):
        r = c.post("/predict", files={"file": ("a.png", image, "image/png")}, headers=headers)
        assert r.status_code == 401, headers
        assert "API key" in r.json()["detail"]
        assert c.get("/model", headers=headers).status_code == 401
    good = {"X-API-Key": "s3cret-key"}
    assert c.post("/predict", files={"file": ("a.png", image, "image/png")}, headers=good).status_code == 200
    assert c.get("/model", headers=good).status_code == 200
    assert c.get("/model", headers={"x-api-key": "s3cret-key"}).status_code == 200  # any header-name case


def test_api_key_checked_before_the_body_is_read(detector):  # noqa: F811
    c = TestClient(create_app(detector.predictor, api_key="k", max_upload_bytes=100))
    r = c.post("/predict", content=b"x" * 1000, headers={"content-type": "multipart/form-data; boundary=a"})
    assert r.status_code == 401  # not 413: nothing is read for an unauthenticated client


def test_serve_reads_key_from_env(monkeypatch, run_dir):  # noqa: F811
    import uvicorn

    import msflow.infer.serve as serve_mod

    seen = {}

    def fake_run(app, host, port, log_level):
        seen.update(app=app, host=host, port=port, log_level=log_level)

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.setenv("MSFLOW_API_KEY", "from-env")
    serve_mod.serve(str(run_dir), host="127.0.0.1", port=8123, max_upload_mb=1.0, device="cpu")
    assert (seen["host"], seen["port"], seen["log_level"]) == ("127.0.0.1", 8123, "info")
    c = TestClient(seen["app"])
    assert c.get("/model").status_code == 401
    assert c.get("/model", headers={"X-API-Key": "from-env"}).status_code == 200


def test_index_page(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    for element_id in (
        "file",
        "drop",
        "api-key",
        "status",
        "result-score",
        "result-normalized",
        "result-decision",
        "overlay",
    ):
        assert f'id="{element_id}"' in html, element_id
    assert "http://" not in html and "https://" not in html  # no external assets
    assert "default-src 'none'" in r.headers["content-security-policy"]
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert "X-API-Key" in js.text and "/predict" in js.text
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")


@pytest.mark.parametrize(
    "path",
    [
        "/static/index.html/../../serve.py",
        "/static/..%2f..%2fserve.py",
        "/static/serve.py",
        "/static/__init__.py",
        "/static/",
        "/static/.",
        "/static/%2e%2e",
        "/../etc/passwd",
        "/etc/passwd",
        "/docs",
        "/redoc",
    ],
)
def test_no_other_files(client, path):
    r = client.get(path)
    assert r.status_code == 404
    assert "import" not in r.text and "root:" not in r.text


def test_decode_upload_rules():
    # The same decoder as files: 16-bit greyscale at full precision, as float RGB in [0, 1].
    arr = np.full((4, 4), 1000, dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    img = decode_upload(buf.getvalue())
    assert img.shape == (4, 4, 3) and img[0, 0].tolist() == [np.float32(1000) / np.float32(65535)] * 3


# --- hardening: the key never from argv, no paths in /model, limits answered with 429 ---------------------
def test_serve_reads_key_from_file_and_refuses_it_on_the_command_line(tmp_path, monkeypatch, run_dir, capsys):  # noqa: F811
    import uvicorn

    from msflow.cli import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app))
    monkeypatch.setenv("MSFLOW_API_KEY", "from-env")  # the file wins over the environment
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    key_file.chmod(0o600)
    assert (
        main(
            [
                "serve",
                "--model",
                str(run_dir),
                "--device",
                "cpu",
                "--runtime",
                "torch",
                "--api-key-file",
                str(key_file),
            ]
        )
        == 0
    )
    c = TestClient(seen["app"])
    assert c.get("/model", headers={"X-API-Key": "from-env"}).status_code == 401
    assert c.get("/model", headers={"X-API-Key": "from-file"}).status_code == 200

    seen.clear()
    capsys.readouterr()
    assert main(["serve", "--model", str(run_dir), "--api-key", "in-argv"]) == 2
    err = capsys.readouterr().err
    assert "MSFLOW_API_KEY" in err and "--api-key-file" in err and len(err.strip().splitlines()) == 1
    assert not seen  # nothing was served
    assert main(["serve", "--model", str(run_dir), "--api-key-file", str(tmp_path / "none")]) == 2
    assert "none" in capsys.readouterr().err


def test_model_shows_no_filesystem_paths(detector):  # noqa: F811
    import copy

    predictor = copy.copy(detector.predictor)
    predictor.config = predictor.config.updated(data={"dataset": "/home/alice/secret-data/bottle"})
    predictor.meta = {**predictor.meta, "dataset": "/home/alice/secret-data/bottle"}
    predictor.meta["metrics"] = {"image_auroc": 99.0, "dataset": "C:\\Users\\alice\\bottle"}
    body = TestClient(create_app(predictor)).get("/model")
    assert body.status_code == 200
    assert "alice" not in body.text and "secret" not in body.text
    assert body.json()["dataset"] == "bottle" and body.json()["config"]["data"]["dataset"] == "bottle"
    assert body.json()["metrics"] == {"image_auroc": 99.0, "dataset": "bottle"}


def test_rate_limit_is_429_per_client(detector, image):  # noqa: F811
    c = TestClient(create_app(detector.predictor, rate=0.5, burst=2))
    assert [c.get("/model").status_code for _ in range(2)] == [200, 200]
    refused = c.get("/model")
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert "too many requests" in refused.json()["detail"]
    assert post(c, image).status_code == 429  # every API path shares the client's bucket
    assert c.get("/health").status_code == 200  # health checks and the page stay open
    assert c.get("/").status_code == 200
    other = TestClient(create_app(detector.predictor, rate=0.5, burst=2), client=("10.0.0.2", 5000))
    assert other.get("/model").status_code == 200  # a different app, a different client: its own bucket


def test_token_buckets_refill_at_the_rate():
    from msflow.infer.serve import TokenBuckets

    now = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=3, clock=lambda: now[0], max_clients=2)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)  # empty: one token comes in 1/rate s
    assert buckets.take("b") == 0.0  # another client has its own bucket
    now[0] = 0.5
    assert buckets.take("a") == 0.0 and buckets.take("a") > 0
    now[0] = 100.0
    assert buckets.take("c") == 0.0  # a third client: the full buckets are forgotten, memory stays bounded
    assert len(buckets.buckets) <= 2


def test_concurrency_limit_is_429_while_busy():
    import asyncio

    from msflow.infer.serve import GuardMiddleware, Limits

    async def scenario() -> list[int]:
        gate = asyncio.Event()

        async def slow_app(scope, receive, send):
            await gate.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        guard = GuardMiddleware(slow_app, api_key=None, limits=Limits(max_concurrent=2))

        async def call(path: str) -> int:
            statuses = []

            async def send(message):
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])

            async def receive():
                return {"type": "http.request", "body": b"", "more_body": False}

            scope = {"type": "http", "path": path, "headers": [], "client": ("1.2.3.4", 1)}
            await guard(scope, receive, send)
            return statuses[0]

        busy = [asyncio.create_task(call("/predict")) for _ in range(2)]
        await asyncio.sleep(0.05)
        refused = await call("/predict")  # answered at once, while two are in progress
        health = asyncio.create_task(call("/health"))  # open paths do not count and are not refused
        await asyncio.sleep(0.05)
        gate.set()
        done = [await t for t in busy]
        after = await call("/predict")  # the two finished: room again
        return [*done, refused, await health, after]

    assert asyncio.run(scenario()) == [200, 200, 429, 200, 200]


def test_bad_limits_are_one_line_errors(detector):  # noqa: F811
    from msflow.errors import MSFlowError

    for kw in ({"max_concurrent": 0}, {"rate": -1.0}, {"burst": 0}, {"max_upload_bytes": 0}):
        with pytest.raises(MSFlowError):
            create_app(detector.predictor, **kw)
