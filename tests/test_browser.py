"""The web page in headless Chromium (Debian's /usr/bin/chromium driven by the pip ``playwright`` package).

Skipped when /usr/bin/chromium or playwright is missing, or the browser cannot start. The screenshot
goes to $MSFLOW_SCREENSHOT_DIR (or the test's tmp_path); its path is printed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from msflow.infer.serve import create_app

try:
    from serve_fixtures import detector, png_bytes, running_server  # noqa: F401
except ImportError:  # tests/ became a package
    from .serve_fixtures import detector, png_bytes, running_server  # noqa: F401

CHROMIUM = Path(os.environ.get("MSFLOW_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
API_KEY = "browser-test-key"
TIMEOUT_MS = 60_000

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    try:
        pw = sync_api.sync_playwright().start()
    except Exception as exc:  # noqa: BLE001 - the bundled node driver may be unusable here
        pytest.skip(f"playwright driver cannot start: {exc}")
    try:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True, timeout=TIMEOUT_MS
        )
    except Exception as exc:  # noqa: BLE001
        pw.stop()
        pytest.skip(f"{CHROMIUM} cannot be started by playwright: {str(exc).splitlines()[0]}")
    yield browser
    browser.close()
    pw.stop()


@pytest.fixture(scope="module")
def server(detector):  # noqa: F811
    with running_server(create_app(detector.predictor, api_key=API_KEY)) as url:
        yield url


@pytest.fixture
def screenshot_dir(tmp_path) -> Path:
    target = Path(os.environ.get("MSFLOW_SCREENSHOT_DIR") or tmp_path)
    target.mkdir(parents=True, exist_ok=True)
    return target


def open_page(browser, url: str):
    """A page on ``url`` that records console errors and refuses any request that leaves the server."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    problems: list[str] = []
    origin = urlsplit(url).netloc
    page.on(
        "console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None
    )
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))

    def only_this_server(route):
        u = urlsplit(route.request.url)
        if u.scheme in ("data", "blob") or u.netloc == origin:
            route.continue_()
        else:
            problems.append(f"external request: {route.request.url}")
            route.abort()

    page.route("**/*", only_this_server)
    page.goto(url + "/")
    return page, problems


def wait_until(page, expression: str, timeout_s: float = TIMEOUT_MS / 1000) -> None:
    """Poll a JS expression with page.evaluate. (wait_for_function evaluates its predicate with eval,
    which the page's Content-Security-Policy rightly forbids; page.evaluate runs outside it.)"""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {expression}")
        time.sleep(0.05)


def wait_state(page, state: str) -> None:
    page.wait_for_selector(f"#status[data-state='{state}']", state="attached")


def api_predict(url: str, data: bytes) -> dict:
    r = httpx.post(
        f"{url}/predict",
        files={"file": ("part.png", data, "image/png")},
        headers={"X-API-Key": API_KEY},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_upload_shows_the_api_score(browser, server, screenshot_dir, tmp_path):
    data = png_bytes(96, seed=11)
    image_path = tmp_path / "part.png"
    image_path.write_bytes(data)
    page, problems = open_page(browser, server)
    try:
        # Without the key the server refuses and the page says so.
        page.wait_for_selector("#model-info:has-text('API key')")
        page.set_input_files("#file", str(image_path))
        wait_state(page, "error")
        assert "401" in page.inner_text("#status")

        # Typing the key retries the same image.
        page.fill("#api-key", API_KEY)
        page.press("#api-key", "Tab")  # 'change' fires on blur
        wait_state(page, "done")
        wait_until(page, "document.getElementById('overlay').naturalWidth > 0")

        expected = api_predict(server, data)
        shown_score = page.inner_text("#result-score").strip()
        assert shown_score == f"{expected['score']:.4f}"
        assert float(page.get_attribute("#result-score", "data-value")) == expected["score"]
        assert page.inner_text("#result-normalized").strip() == f"{expected['normalized_score']:.4f}"
        decision = page.inner_text("#result-decision").strip()
        assert decision == expected["decision"].upper()
        assert expected["decision"] in page.get_attribute("#result-decision", "class")
        colour = page.eval_on_selector("#result-decision", "e => getComputedStyle(e).color")
        assert colour == ("rgb(179, 38, 30)" if expected["decision"] == "defective" else "rgb(27, 127, 59)")
        size = page.eval_on_selector("#overlay", "e => [e.naturalWidth, e.naturalHeight]")
        assert size == [96, 96]
        assert "Model: resnet18, 64 px" in page.inner_text("#model-info")

        shot = screenshot_dir / "msflow_web_page.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"\nscreenshot: {shot}  (score shown {shown_score}, decision {decision})")
        assert shot.stat().st_size > 1000
        assert problems == [] or all("401" in p for p in problems), problems
        assert not any("external request" in p or "page error" in p for p in problems), problems
    finally:
        page.close()


def test_drop_an_image(browser, server):
    data = png_bytes(40, seed=12)
    page, problems = open_page(browser, server)
    try:
        page.fill("#api-key", API_KEY)
        # Drop a file on the drop zone (a synthetic DataTransfer, as a real drag would deliver).
        page.evaluate(
            """async (bytes) => {
                const file = new File([new Uint8Array(bytes)], "dropped.png", {type: "image/png"});
                const dt = new DataTransfer();
                dt.items.add(file);
                const drop = document.getElementById("drop");
                const init = {dataTransfer: dt, bubbles: true, cancelable: true};
                drop.dispatchEvent(new DragEvent("dragover", init));
                drop.dispatchEvent(new DragEvent("drop", init));
            }""",
            list(data),
        )
        wait_state(page, "done")
        expected = api_predict(server, data)
        assert page.inner_text("#result-score").strip() == f"{expected['score']:.4f}"
        assert page.inner_text("#result-size").strip() == "40 × 40 px"
        assert "dropped.png" in page.inner_text("#status")
        assert not any("external request" in p or "page error" in p for p in problems), problems
    finally:
        page.close()


def test_bad_file_shows_the_error(browser, server, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image")
    page, problems = open_page(browser, server)
    try:
        page.fill("#api-key", API_KEY)
        page.set_input_files("#file", str(bad))
        wait_state(page, "error")
        text = page.inner_text("#status")
        assert "415" in text and "not an image" in text
        assert page.is_hidden("#result")
    finally:
        page.close()
