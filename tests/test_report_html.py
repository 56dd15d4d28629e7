"""report.html, the page a person opens to judge a run: written by every ``msflow test`` (and train),
self-contained (no network), with the metrics, ROC/PR curves, the score histogram with the rates at the
threshold and a gallery; checked as data and in headless Chromium (skipped where it is missing)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from msflow.cli import main
from msflow.evaluate import report

try:
    from fake_data import make_fake_category
    from serve_fixtures import build_run
    from test_browser import CHROMIUM, browser  # noqa: F401
except ImportError:  # tests/ became a package
    from .fake_data import make_fake_category
    from .serve_fixtures import build_run
    from .test_browser import CHROMIUM, browser  # noqa: F401


@pytest.fixture(scope="module")
def tested(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    run = build_run(root)
    data = make_fake_category(root / "data", n_train=2, n_good=5, n_bad=5, size=64)
    out = root / "test-out"
    argv = ["test", "--model", str(run), "--data", str(data), "--output", str(out)]
    assert main(argv) == 0
    return out


def test_report_is_written_self_contained(tested: Path) -> None:
    page = (tested / "report.html").read_text()
    metrics = json.loads((tested / "metrics.json").read_text())
    assert "miss_rate" in metrics and "false_positive_rate" in metrics
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from anywhere
    for label in ("image AUROC", "pixel AUROC", "AUPRO", "test miss rate %", "test FPR %"):
        assert f"<td>{label}</td>" in page
    assert f"± {metrics['pixel_auroc_error_bound']:.2g}" in page  # the error bounds are shown
    data = json.loads((tested / "report_data.json").read_text())
    assert set(data["curves"]) == {"image", "pixel"} and data["curves"]["pixel"]["roc"]["x"]
    kinds = {e["kind"] for e in data["gallery"]}
    assert kinds and kinds <= {"miss", "false_alarm", "typical_defective", "typical_good"}
    assert page.count("<figure>") == len(data["gallery"])


def test_gallery_picks_the_worst_and_the_typical() -> None:
    scores = np.array([0.1, 0.2, 0.9, 0.3, 0.8, 0.7, 0.05, 0.95])
    labels = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    picks = dict(report.gallery_picks(scores, labels, threshold=0.5))
    assert [i for i, k in report.gallery_picks(scores, labels, 0.5) if k == "miss"] == [6, 3]  # lowest first
    assert [i for i, k in report.gallery_picks(scores, labels, 0.5) if k == "false_alarm"] == [7, 2]
    assert picks[4] == "typical_defective" and picks[0] == "typical_good"


def test_pixel_curves_from_histograms_match_sklearn() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 50, 1000), rng.integers(0, 500, 1000)
    curves = report.histogram_curves(pos, neg)
    x, y = np.array(curves["roc"]["x"]), np.array(curves["roc"]["y"])
    values = np.concatenate((np.repeat(np.arange(1000), pos), np.repeat(np.arange(1000), neg)))
    truth = np.concatenate((np.ones(pos.sum()), np.zeros(neg.sum())))
    area = -np.trapezoid(y, x)  # points run from the lowest threshold (1, 1) down to (0, 0)
    assert area == pytest.approx(roc_auc_score(truth, values), abs=2e-3)


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed")
def test_report_renders_in_chromium(browser, tested: Path) -> None:  # noqa: F811
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    outside: list[str] = []
    page.route(
        "**/*",
        lambda r: (
            r.continue_() if r.request.url.startswith("file:") else outside.append(r.request.url) or r.abort()
        ),
    )
    try:
        page.goto((tested / "report.html").as_uri())
        page.wait_for_load_state("load")
        widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
        data = json.loads((tested / "report_data.json").read_text())
        assert len(widths) >= 3 + len(data["gallery"]) and min(widths) > 0  # curves, histogram, gallery
        table = page.inner_text("#metrics")
        metrics = json.loads((tested / "metrics.json").read_text())
        assert "image AUROC" in table and f"{metrics['image_auroc']:.2f}" in table
        headings = page.eval_on_selector_all("h2", "hs => hs.map(h => h.textContent)")
        assert {"Metrics", "ROC and precision-recall curves", "Score histogram", "Gallery"} <= set(headings)
        assert not outside
    finally:
        page.close()
