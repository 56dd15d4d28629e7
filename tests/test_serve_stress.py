"""The service under a real uvicorn on 127.0.0.1: hostile input, concurrent load, memory, path traversal.

Bounded: about 60 bad requests, 200 predictions of a 32x32 image with the 64-px model (16 client
threads), a few raw-socket probes; well under a minute on 2 cores. Loopback only.
"""

from __future__ import annotations

import gc
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import numpy as np
import psutil
import pytest
import torch

from msflow.infer.serve import create_app

try:
    from serve_fixtures import detector, png_bytes, raw_http, running_server, status_of  # noqa: F401
except ImportError:  # tests/ became a package
    from .serve_fixtures import detector, png_bytes, raw_http, running_server, status_of  # noqa: F401

MAX_UPLOAD = 256 * 1024
N_REQUESTS = 200
N_WORKERS = 16
MAX_RSS_GROWTH_MB = 300


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # On a small shared CI machine intra-op threads fight the 16 client threads and each other;
    # one thread keeps the timing predictable. Restored for the rest of the session.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def server(detector):  # noqa: F811
    with running_server(create_app(detector.predictor, max_upload_bytes=MAX_UPLOAD)) as url:
        yield url


@pytest.fixture(scope="module")
def port(server) -> int:
    return urlsplit(server).port


def multipart(
    payload: bytes,
    boundary: str = "b0undary",
    name: str = "file",
    filename: str = "x.png",
    ctype: str = "image/png",
    close: bool = True,
) -> bytes:
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        f"Content-Type: {ctype}\r\n\r\n"
    ).encode()
    return head + payload + (f"\r\n--{boundary}--\r\n".encode() if close else b"")


def assert_alive(url: str) -> None:
    r = httpx.get(f"{url}/health", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_hostile_requests_never_500(server):
    rng = np.random.default_rng(0)
    good = png_bytes(32, seed=1)
    mp = "multipart/form-data; boundary=b0undary"
    cases: list[tuple[str, dict, bytes]] = []  # (label, headers, body)
    for i in range(10):
        cases.append(
            (
                f"random-bytes-{i}",
                {"content-type": "application/octet-stream"},
                rng.bytes(int(rng.integers(1, 20_000))),
            )
        )
        cases.append((f"random-multipart-{i}", {"content-type": mp}, rng.bytes(int(rng.integers(1, 20_000)))))
        cut = int(rng.integers(1, len(multipart(good))))
        cases.append((f"truncated-multipart-{i}", {"content-type": mp}, multipart(good)[:cut]))
        cases.append((f"noise-as-image-{i}", {"content-type": mp}, multipart(rng.bytes(3000))))
        cases.append(
            (f"truncated-png-{i}", {"content-type": mp}, multipart(good[: int(rng.integers(1, len(good)))]))
        )
    for ctype in (
        "image/png",
        "application/json",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        "multipart/form-data; boundary=",
        "multipart/mixed; boundary=b0undary",
        "multipart/form-data; boundary=wrong",
        "text/html; charset=utf-8",
        "",
        "*/*",
    ):
        cases.append((f"ctype-{ctype!r}", {"content-type": ctype}, multipart(good)))
    cases.append(("text-file", {"content-type": mp}, multipart(b"just text\n" * 50, ctype="text/plain")))
    field = b'--b0undary\r\nContent-Disposition: form-data; name="%s"\r\n\r\nv\r\n'
    cases.append(("field-not-file", {"content-type": mp}, field % b"file" + b"--b0undary--\r\n"))
    cases.append(("no-disposition", {"content-type": mp}, b"--b0undary\r\n\r\nabc\r\n--b0undary--\r\n"))
    cases.append(
        (
            "many-fields",
            {"content-type": mp},
            b"".join(field % f"f{i}".encode() for i in range(50)) + b"--b0undary--\r\n",
        )
    )
    cases.append(("empty-body", {"content-type": mp}, b""))

    statuses: dict[str, int] = {}
    with httpx.Client(base_url=server, timeout=30) as client:
        for label, headers, body in cases:
            r = client.post("/predict", content=body, headers=headers)
            statuses[label] = r.status_code
            assert 400 <= r.status_code < 500, (label, r.status_code, r.text[:300])
            assert isinstance(r.json()["detail"], str), label
            if label.startswith("ctype-") and "form-data; boundary=b0undary" not in label:
                assert r.status_code in (400, 415), label
        # Bad query values and methods.
        assert client.post("/predict?overlay=maybe", files={"file": ("a.png", good)}).status_code == 422
        assert client.get("/predict").status_code == 405
        assert client.put("/health").status_code == 405
    print(f"\nhostile requests: {len(cases)}, statuses: {sorted(set(statuses.values()))}")
    assert_alive(server)


def test_oversized_bodies(server, port):
    big = multipart(np.random.default_rng(1).bytes(MAX_UPLOAD + 10_000))
    mp = "multipart/form-data; boundary=b0undary"
    with httpx.Client(base_url=server, timeout=30) as client:
        # An honest Content-Length: refused before the body is read.
        r = client.post("/predict", content=big, headers={"content-type": mp})
        assert r.status_code == 413 and "limit" in r.json()["detail"]

        # No Content-Length (chunked transfer): counted while it arrives.
        def chunks():
            for i in range(0, len(big), 16_384):
                yield big[i : i + 16_384]

        try:
            r = client.post("/predict", content=chunks(), headers={"content-type": mp})
            assert r.status_code == 413
        except httpx.TransportError:
            pass  # the server may close the connection before the client finished sending: also a refusal

    # A huge declared length with no body at all: answered at once, not after waiting for 10 GB.
    t0 = time.monotonic()
    raw = raw_http(
        port,
        (
            f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {mp}\r\n"
            f"Content-Length: {10 * 2**30}\r\nConnection: close\r\n\r\n"
        ).encode(),
        timeout=10,
    )
    assert status_of(raw) == 413 and time.monotonic() - t0 < 5

    # A lying Content-Length (small) in front of a large body: only the declared bytes are read as the
    # body; the rest is a garbage "next request" the HTTP parser refuses. Never a 500.
    raw = raw_http(
        port,
        (
            f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {mp}\r\n"
            f"Content-Length: 100\r\nConnection: close\r\n\r\n"
        ).encode()
        + big,
        timeout=10,
    )
    assert 400 <= status_of(raw) < 500

    # Chunked body with a lying chunk size / not a number / negative Content-Length.
    for head, body in [
        ("Transfer-Encoding: chunked", b"zz\r\nhello\r\n0\r\n\r\n"),
        ("Content-Length: -5", b""),
        ("Content-Length: abc", b""),
        ("Content-Length: 10\r\nContent-Length: 20", b"x" * 20),
    ]:
        raw = raw_http(
            port,
            (
                f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {mp}\r\n{head}\r\n"
                f"Connection: close\r\n\r\n"
            ).encode()
            + body,
            timeout=10,
        )
        assert 400 <= status_of(raw) < 500, (head, raw[:200])
    # Garbage that is not HTTP at all: a "request" ending in a blank line, and 20 KB without one (past
    # the HTTP parser's size limit for an incomplete head). Both are refused at once.
    garbage = np.random.default_rng(2).bytes(20_000)
    for blob in (garbage[:4096] + b"\r\n\r\n", garbage.replace(b"\n", b"x")):
        raw = raw_http(port, blob, timeout=10)
        assert status_of(raw) == 400
    assert_alive(server)


@pytest.mark.parametrize(
    "path",
    [
        "/static/../../etc/passwd",
        "/static/../../../../../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/%2e%2e/",
        "/static/%2e%2e/%2e%2e/etc/passwd",
        "/static/..%2f..%2f..%2fetc%2fpasswd",
        "/static/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/static/..\\..\\etc\\passwd",
        "/static/%2e%2e%5cserve.py",
        "/static/app.js/../../serve.py",
        "/static//etc/passwd",
        "//etc/passwd",
        "/static/%00app.js",
        "/static/app.js%00.png",
        "/etc/passwd",
        "/static/../serve.py",
    ],
)
def test_path_traversal_is_404(server, port, path):
    raw = raw_http(port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    assert status_of(raw) in (400, 404), (path, raw[:200])
    for secret in (b"root:", b"import ", b"def create_app"):
        assert secret not in raw, path


def test_concurrent_predictions_and_memory(server):
    image = png_bytes(32, seed=3)
    proc = psutil.Process()
    limits = httpx.Limits(max_connections=N_WORKERS, max_keepalive_connections=N_WORKERS)
    with httpx.Client(base_url=server, timeout=120, limits=limits) as client:

        def one(i: int) -> tuple[int, float, float | None]:
            t = time.perf_counter()
            r = client.post(
                "/predict",
                files={"file": (f"img{i}.png", image, "image/png")},
                params={"overlay": "true"} if i % 2 else None,
            )
            score = r.json().get("score") if r.status_code == 200 else None
            return r.status_code, time.perf_counter() - t, score

        # Warm up (allocator, thread pool, lazy imports) before measuring memory.
        with ThreadPoolExecutor(N_WORKERS) as pool:
            list(pool.map(one, range(2 * N_WORKERS)))
        gc.collect()
        rss_before = proc.memory_info().rss

        # The event loop must stay responsive while predictions run in worker threads.
        health_latency: list[float] = []
        stop = threading.Event()

        def probe_health() -> None:
            with httpx.Client(base_url=server, timeout=30) as probe:
                while not stop.is_set():
                    t = time.perf_counter()
                    assert probe.get("/health").status_code == 200
                    health_latency.append(time.perf_counter() - t)
                    stop.wait(0.2)

        prober = threading.Thread(target=probe_health, daemon=True)
        prober.start()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(N_WORKERS) as pool:
            results = list(pool.map(one, range(N_REQUESTS)))
        elapsed = time.perf_counter() - t0
        stop.set()
        prober.join(timeout=30)
        gc.collect()
        rss_after = proc.memory_info().rss

    codes = [c for c, _, _ in results]
    errors = sum(c != 200 for c in codes)
    latencies = np.array([t for _, t, _ in results])
    scores = {s for _, _, s in results}
    growth_mb = (rss_after - rss_before) / 2**20
    print(
        f"\nstress: {N_REQUESTS} requests, {N_WORKERS} workers, {errors} errors, {elapsed:.1f} s "
        f"({N_REQUESTS / elapsed:.1f} req/s), latency p50 {np.median(latencies) * 1000:.0f} ms, "
        f"p95 {np.percentile(latencies, 95) * 1000:.0f} ms, max {latencies.max() * 1000:.0f} ms; "
        f"/health during load: {len(health_latency)} probes, "
        f"max {max(health_latency, default=0) * 1000:.0f} ms; "
        f"RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MB (growth {growth_mb:+.1f} MB)"
    )
    assert errors == 0, sorted(set(codes))
    assert len(scores) == 1  # the same image gives the same score whatever the concurrency
    assert growth_mb < MAX_RSS_GROWTH_MB
    assert health_latency and max(health_latency) < 5.0
    assert_alive(server)
