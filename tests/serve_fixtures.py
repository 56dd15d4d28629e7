"""Helpers and fixtures for the serving tests (test_serve*.py, test_browser.py).

A tiny untrained model (resnet18 without pretrained weights, 64 px) is saved as a run folder once per
test session; the detector built from it is shared. Servers run in a background thread on 127.0.0.1
(loopback only) on a free port.

Test modules import the fixtures they use: ``from serve_fixtures import detector, run_dir``. The model
is cached at module level, so every module gets the same one even though pytest registers the imported
fixtures once per module.
"""

from __future__ import annotations

import contextlib
import io
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

LOOPBACK = "127.0.0.1"
IMAGE_THRESHOLD = 0.5

_cache: dict[str, object] = {}


def build_run(root: Path) -> Path:
    """Save an untrained 64-px resnet18 MSFlow as a run folder under ``root`` (a few seconds on a CPU)."""
    import torch

    from msflow.config import Config
    from msflow.evaluate.threshold import Threshold
    from msflow.model.checkpoint import save_model
    from msflow.model.msflow import MSFlow

    run_dir = root / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = Config().updated(model={"backbone": "resnet18", "pretrained": False, "image_size": 64})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MSFlow(cfg.model)
    threshold = Threshold(
        image=IMAGE_THRESHOLD, pixel=1.0, score_min=0.0, score_max=1.0, method="test", num_images=1
    )
    save_model(
        model,
        cfg,
        run_dir / "model",
        threshold=threshold.to_dict(),
        metrics={"image_auroc": 50.0},
        dataset="fake",
    )
    return run_dir


def shared_run_dir() -> Path:
    if "run_dir" not in _cache:
        root = Path(tempfile.mkdtemp(prefix="msflow-serve-test-"))
        _cache["run_dir"] = build_run(root)
    return _cache["run_dir"]  # type: ignore[return-value]


def shared_detector():
    if "detector" not in _cache:
        from msflow.detector import Detector

        _cache["detector"] = Detector.load(shared_run_dir(), device="cpu")
    return _cache["detector"]


@pytest.fixture(scope="session")
def run_dir() -> Path:
    return shared_run_dir()


@pytest.fixture(scope="session")
def detector():
    return shared_detector()


def png_bytes(size: int = 32, seed: int = 0, mode: str = "RGB") -> bytes:
    """A random ``size`` x ``size`` PNG."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
    img = Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode=mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app, log_level: str = "warning", startup_timeout: float = 30.0) -> Iterator[str]:
    """Run ``app`` with uvicorn on 127.0.0.1 in a daemon thread; yields its base URL."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(
        app,
        host=LOOPBACK,
        port=port,
        log_level=log_level,
        lifespan="off",
        access_log=False,
        timeout_keep_alive=5,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn failed to start")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start within {startup_timeout} s")
        time.sleep(0.02)
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def raw_http(port: int, request: bytes, timeout: float = 10.0, read_limit: int = 1 << 20) -> bytes:
    """Send raw bytes to 127.0.0.1:``port``; return what comes back until the server closes or ``timeout``.

    The write side is left open (uvicorn drops a half-closed connection), so requests should carry
    ``Connection: close``.
    """
    chunks: list[bytes] = []
    total = 0
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(request)
        while total < read_limit:
            try:
                data = sock.recv(65536)
            except (TimeoutError, OSError):
                break
            if not data:
                break
            chunks.append(data)
            total += len(data)
    return b"".join(chunks)


def status_of(raw: bytes) -> int:
    """The status code of a raw HTTP/1.1 response (0 when there is none)."""
    try:
        return int(raw.split(b"\r\n", 1)[0].split()[1])
    except (IndexError, ValueError):
        return 0
