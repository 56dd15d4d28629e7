"""Reporting helpers: anomaly-map overlays, prediction CSVs, plots and metric tables.

Plots use ``Figure`` + ``FigureCanvasAgg`` directly: off-screen Agg rendering without
importing ``pyplot`` or switching the process-wide backend (no global figure registry).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from skimage.segmentation import find_boundaries
from sklearn.metrics import precision_recall_curve, roc_curve

from msflow.errors import MSFlowError
from msflow.evaluate.streaming import suffix_sums

GT_COLOUR = (0, 255, 0)
PRED_COLOUR = (255, 0, 0)
MISSING = "–"  # en dash, shown for None / NaN / absent values

_METRIC_LABELS = (
    ("image_auroc", "image AUROC"),
    ("pixel_auroc", "pixel AUROC"),
    ("aupro", "AUPRO"),
    ("image_f1_max", "image F1-max"),
    ("pixel_f1_max", "pixel F1-max"),
    ("false_positive_rate", "test FPR %"),  # good test images judged defective
    ("miss_rate", "test miss rate %"),  # defective test images judged good
    ("holdout_false_positive_rate", "held-out FPR %"),  # the calibration images
)


def _normalise(anomaly_map: np.ndarray, vmin: float | None, vmax: float | None) -> np.ndarray:
    """Map values linearly onto [0, 1]; a degenerate range (or an all-NaN map) gives zeros."""
    amap = np.asarray(anomaly_map, dtype=np.float64)
    finite = amap[np.isfinite(amap)]
    lo = float(vmin) if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else 0.0)
    if not hi > lo:
        return np.zeros(amap.shape, dtype=np.float64)
    norm = (amap - lo) / (hi - lo)
    return np.clip(np.nan_to_num(norm, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def _boundary(mask: np.ndarray, shape: tuple[int, int], name: str) -> np.ndarray:
    """One-pixel inner contour of a boolean mask; edges touching the image border are closed."""
    mask = np.asarray(mask).astype(bool)
    if mask.shape != shape:
        raise ValueError(f"{name} has shape {mask.shape}, expected {shape}")
    padded = np.pad(mask, 1, constant_values=False)
    return find_boundaries(padded, mode="inner")[1:-1, 1:-1]


def jet_overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    alpha: float = 0.45,
    vmin: float | None = None,
    vmax: float | None = None,
    gt_mask: np.ndarray | None = None,
    pred_mask: np.ndarray | None = None,
) -> np.ndarray:
    """``(1 - alpha) * image + alpha * jet(map)`` as (H, W, 3) uint8 RGB, with the contours of
    ``gt_mask`` (green, on top) and ``pred_mask`` (red). ``image`` is (H, W, 3) RGB (clipped to
    0..255); ``vmin``/``vmax`` map to the colormap's ends (default: the map's minimum and maximum)."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3), got {img.shape}")
    shape = img.shape[:2]
    if np.shape(anomaly_map) != shape:
        raise ValueError(f"anomaly_map has shape {np.shape(anomaly_map)}, expected {shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")

    colours = matplotlib.colormaps["jet"](_normalise(anomaly_map, vmin, vmax))[..., :3] * 255.0
    base = np.clip(img.astype(np.float64), 0.0, 255.0)
    out = np.clip(np.rint((1.0 - alpha) * base + alpha * colours), 0, 255).astype(np.uint8)
    if pred_mask is not None:
        out[_boundary(pred_mask, shape, "pred_mask")] = PRED_COLOUR
    if gt_mask is not None:
        out[_boundary(gt_mask, shape, "gt_mask")] = GT_COLOUR
    return out


def save_overlay(path: str | Path, image: np.ndarray, anomaly_map: np.ndarray, **kw: Any) -> Path:
    """Write :func:`jet_overlay` ``(image, anomaly_map, **kw)`` as a PNG (parent folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(jet_overlay(image, anomaly_map, **kw)).save(path, format="PNG", compress_level=3)
    return path


# The one schema of predictions.csv, for evaluations (``msflow test``, the end of training) and for
# predictions (``msflow predict``): a column a writer does not know is left empty (no label when
# predicting; no mask area or overlay when evaluating).
PREDICTION_FIELDS = [
    "image", "label", "defect_type", "score", "normalized_score", "decision", "threshold", "defect_pixels",
    "overlay",
]  # fmt: skip


class RowWriter:
    """CSV rows written as they come and flushed, so a crash keeps every finished row. Columns are fixed
    up front (values a row lacks are left empty); ``append=True`` continues an existing file under the
    same header, a last line cut short by a crash dropped first."""

    def __init__(self, path: str | Path, fields: Sequence[str], append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fields = list(fields)
        resume = append and self.path.is_file() and self.path.stat().st_size > 0
        if resume:
            _drop_partial_line(self.path)
            with self.path.open(encoding="utf-8", newline="") as fh:
                header = next(csv.reader(fh), [])
            if header and header != self.fields:  # appending under another header would garble rows
                raise MSFlowError(
                    f"'{self.path}' has the columns {header}, not {self.fields}: cannot continue it"
                )
        self._fh = self.path.open("a" if resume else "w", encoding="utf-8", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=self.fields, restval="", extrasaction="ignore")
        if not resume or self.path.stat().st_size == 0:
            self._writer.writeheader()
        self._fh.flush()

    def write(self, row: Mapping[str, Any]) -> None:
        self._writer.writerow(row)
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _drop_partial_line(path: Path) -> None:
    """Cut a last line that a crash left without its newline (it is redone). Reads only the last MiB: a
    row is a few hundred bytes, so the last complete one ends there."""
    with path.open("r+b") as fh:
        end = fh.seek(0, io.SEEK_END)
        start = fh.seek(max(0, end - 2**20))
        tail = fh.read()
        if not tail.endswith(b"\n"):
            fh.truncate(start + tail.rfind(b"\n") + 1)


def read_rows(path: str | Path) -> Iterator[dict[str, str]]:
    """The rows of a CSV written by :class:`RowWriter`, one at a time (call after opening the writer
    with ``append=True``, which drops a cut-short last line)."""
    path = Path(path)
    if not path.is_file():
        return
    with path.open("r", encoding="utf-8", newline="") as fh:
        yield from csv.DictReader(fh)


def _render(fig: Figure, path: str | Path | None = None) -> Any:
    """``fig`` as a PNG file at ``path`` (parent folders made; returns the path), or without a path as a
    data URI for report.html (a little smaller: 90 dpi, not 100)."""
    FigureCanvasAgg(fig)
    if path is None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    return path


def plot_score_histogram(
    path: str | Path,
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    threshold: float | None = None,
) -> Path:
    """Save overlapping histograms of good vs defective image scores (:func:`_score_histogram`)."""
    return _render(_score_histogram(scores, labels, threshold, "Image score distribution", 4.5), path)


def _score_histogram(scores: Any, labels: Any, threshold: float | None, title: str, height: float) -> Figure:
    """Good (label 0) and defective (label 1) finite scores over shared bins, the threshold dashed; one
    drawing for the run folder's PNG and report.html."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(int).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    finite = np.isfinite(scores)
    scores, labels = scores[finite], labels[finite]
    fig = Figure(figsize=(7, height))
    ax = fig.add_subplot()
    bins = np.histogram_bin_edges(scores, bins=min(50, max(10, scores.size // 5))) if scores.size else 10
    for value, name, colour in ((0, "good", "tab:blue"), (1, "defective", "tab:red")):
        subset = scores[labels == value]
        if subset.size:
            ax.hist(subset, bins=bins, alpha=0.5, color=colour, label=f"{name} (n={subset.size})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold = {threshold:.4g}")
    ax.set(xlabel="image anomaly score", ylabel="number of images", title=title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return fig


def plot_loss_curve(path: str | Path, history: Sequence[Mapping[str, Any]]) -> Path | None:
    """Save a line plot of training loss per epoch (entries without a finite ``loss`` skipped); ``None``
    (nothing written) when there is nothing to plot."""
    fig = Figure(figsize=(7, 4.5))
    return _render(fig, path) if _draw_loss(fig, history) else None


def _draw_loss(fig: Figure, history: Sequence[Mapping[str, Any]]) -> bool:
    """The loss curve on ``fig``; False when no epoch has a finite loss. The y axis is linear with
    scientific tick labels: MSFlow's NLL is often large and negative (around -1e5), no log axis."""
    points = [(float(h["epoch"]), float(h["loss"])) for h in history if _is_number(h.get("loss"))]
    points = [p for p in points if math.isfinite(p[1])]
    if not points:
        return False
    ax = fig.add_subplot()
    ax.plot(*zip(*sorted(points), strict=True), marker="o", markersize=3)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
    ax.set(xlabel="epoch", ylabel="loss", title="Training loss")
    ax.grid(True, alpha=0.3)
    return True


def _is_number(value: Any) -> bool:
    """True for finite-or-not real numbers except bools (NaN counts; callers filter it)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _cell(value: Any) -> str:
    if value is None or (_is_number(value) and math.isnan(float(value))):
        return MISSING
    if _is_number(value) and not isinstance(value, numbers.Integral):
        return f"{float(value):.2f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def metrics_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Rows as a markdown table, no trailing newline (floats with 2 decimals, None/NaN/absent "–")."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def with_mean_row(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], name_key: str = "category"
) -> list[dict[str, Any]]:
    """``rows`` plus a row ``{name_key: "mean"}`` holding each column's mean over the rows with a number
    there (NaN not counted; ``None`` where there is none)."""
    mean: dict[str, Any] = {}
    for col in columns:
        values = [float(r[col]) for r in rows if _is_number(r.get(col)) and not math.isnan(r[col])]
        mean[col] = sum(values) / len(values) if values else None
    mean[name_key] = "mean"
    return [dict(r) for r in rows] + [mean]


def _plain(value: Any) -> Any:
    """JSON/CSV-friendly value: numpy scalars to Python, NaN/inf to None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_table(
    stem: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]
) -> dict[str, Path]:
    """Write ``columns`` of ``rows`` to ``stem.md``, ``stem.csv`` (full precision, missing values empty)
    and ``stem.json`` (missing: null); returns ``{"md": path, "csv": ..., "json": ...}``."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = {ext: stem.with_name(f"{stem.name}.{ext}") for ext in ("md", "csv", "json")}
    records = [{c: _plain(row.get(c)) for c in columns} for row in rows]

    paths["md"].write_text(metrics_table(rows, columns) + "\n", encoding="utf-8")
    with paths["csv"].open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows({c: ("" if v is None else v) for c, v in rec.items()} for rec in records)
    paths["json"].write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return paths


def _other_resolution_lines(metrics: Mapping[str, Any], num: Any) -> list[str]:
    """The pixel metrics at both resolutions, when one differs by more than a point between them."""
    other = metrics.get("model_resolution") or {}
    keys = [(k, label) for k, label in _METRIC_LABELS if k.startswith("pixel") or k == "aupro"]
    keys = [(k, label) for k, label in keys if _is_number(metrics.get(k)) and _is_number(other.get(k))]
    if not any(abs(float(metrics[k]) - float(other[k])) > 1.0 for k, _ in keys):
        return []
    headline = metrics.get("eval_resolution", "original")
    lines = [f"pixel metrics differ by more than a point between resolutions (headline above: {headline}):"]
    lines.append(f"  {'':<14} {'original':>8} {'model':>8}")
    return lines + [f"  {label:<14} {num(metrics[k]):>8} {num(other[k]):>8}" for k, label in keys]


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """Terminal summary (values in percent): one line per known metric (``image AUROC     97.12``;
    ``n/a`` with the reason for those in ``not_available``), then one line per defect type."""

    def num(value: Any) -> str:
        return _cell(float(value) if _is_number(value) else value)

    missing = metrics.get("not_available") or {}
    lines = []
    for key, label in _METRIC_LABELS:
        if key in metrics:
            lines.append(f"{label:<14} {num(metrics[key]):>6}")
        elif key in missing:
            lines.append(f"{label:<14} {'n/a':>6}  ({missing[key]})")
    lines += _other_resolution_lines(metrics, num)
    per_type = metrics.get("per_defect_type")
    if per_type:
        lines.append("per defect type (image AUROC):")
        width = max(12, *(len(str(name)) for name in per_type))
        lines += [f"  {str(name):<{width}} {num(value):>6}" for name, value in per_type.items()]
    return "\n".join(lines) if lines else "(no metrics)"


# --- the run's report page: report.html, self-contained (every figure inline, no network) -------------------
CURVE_POINTS = 512
GALLERY = (  # (kind, title, how many)
    ("miss", "Worst misses: defective images judged good, lowest scores first", 4),
    ("false_alarm", "Worst false alarms: good images judged defective, highest scores first", 4),
    ("typical_defective", "Typical defective images (correctly found, scores near their median)", 2),
    ("typical_good", "Typical good images (correctly passed, scores near their median)", 2),
)


def image_curves(labels: np.ndarray, scores: np.ndarray) -> dict[str, dict[str, list[float]]]:
    """Image-level ROC and PR curves (sklearn) from per-image labels and scores; empty with one class."""
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=np.float64)
    if labels.min(initial=0) == labels.max(initial=0):
        return {}
    fpr, tpr, _ = roc_curve(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    return {
        "roc": {"x": fpr.tolist(), "y": tpr.tolist()},
        "pr": {"x": recall.tolist(), "y": precision.tolist()},
    }


def histogram_curves(pos: np.ndarray, neg: np.ndarray, points: int = CURVE_POINTS) -> dict[str, Any]:
    """Pixel-level ROC and PR curves from the evaluation's per-bin counts of defect (``pos``) and
    defect-free (``neg``) pixels, at ``points`` thresholds spread by pixel mass (no second pass)."""
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    p, n = pos.sum(), neg.sum()
    if not (p and n):
        return {}
    mass = np.cumsum(pos + neg)
    at = np.searchsorted(mass, np.linspace(0, mass[-1], points), side="left")
    edges = np.unique(np.concatenate(([0], at, [pos.size])))
    tp, fp = suffix_sums(pos)[edges], suffix_sums(neg)[edges]  # pixels at or above each edge
    tpr, fpr = tp / p, fp / n
    precision = np.divide(tp, tp + fp, out=np.ones_like(tp), where=tp + fp > 0)
    return {"roc": {"x": fpr.tolist(), "y": tpr.tolist()}, "pr": {"x": tpr.tolist(), "y": precision.tolist()}}


def gallery_picks(scores: np.ndarray, labels: np.ndarray, threshold: float) -> list[tuple[int, str]]:
    """(image index, kind) for the report's gallery, kinds as in :data:`GALLERY`."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels).astype(int)
    judged = scores >= threshold
    picks: list[tuple[int, str]] = []
    groups = {
        "miss": (np.flatnonzero((labels == 1) & ~judged), lambda i: scores[i]),
        "false_alarm": (np.flatnonzero((labels == 0) & judged), lambda i: -scores[i]),
    }
    for kind, positive in (("typical_defective", 1), ("typical_good", 0)):
        found = np.flatnonzero((labels == positive) & (judged == bool(positive)))
        median = float(np.median(scores[found])) if found.size else 0.0
        groups[kind] = (found, lambda i, m=median: abs(scores[i] - m))
    for kind, _, count in GALLERY:
        found, key = groups[kind]
        picks += [(int(i), kind) for i in sorted(found, key=key)[:count]]
    return picks


_CURVE_AXES = {  # which: (x label, y label, title, legend place)
    "roc": ("false-positive rate", "true-positive rate", "ROC curve", "lower right"),
    "pr": ("recall", "precision", "Precision-recall curve", "lower left"),
}


def _curve_figure(curves: Mapping[str, Any], which: str, metrics: Mapping[str, Any]) -> str | None:
    """ROC or PR ("roc"/"pr") of the image and pixel levels in one plot, as a data URI."""
    levels = [(name, curves.get(name, {}).get(which)) for name in ("image", "pixel")]
    levels = [(name, c) for name, c in levels if c]
    if not levels:
        return None
    fig = Figure(figsize=(5, 4.2))
    ax = fig.add_subplot()
    for name, c in levels:
        key = f"{name}_auroc" if which == "roc" else None
        label = f"{name} (AUROC {metrics[key]:.2f})" if key and _is_number(metrics.get(key)) else name
        ax.plot(c["x"], c["y"], label=label, drawstyle="steps-post" if which == "roc" else "default")
    if which == "roc":
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    xlabel, ylabel, title, legend = _CURVE_AXES[which]
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.grid(True, alpha=0.3)
    ax.legend(loc=legend)
    return _render(fig)


_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
    "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
    ".figs img{max-width:49%}.gallery{display:flex;flex-wrap:wrap;gap:12px}"
    "figure{margin:0;width:250px}figure img{width:250px}figcaption{font-size:13px}"
    ".defective{color:#b00;font-weight:bold}.good{color:#070;font-weight:bold}"
)


def _metric_rows(metrics: Mapping[str, Any]) -> list[str]:
    rows = []
    for key, label in _METRIC_LABELS:
        if key in metrics:
            bound = metrics.get(key.removesuffix("_max") + "_error_bound")  # the streamed pixel metrics
            shown = _cell(metrics[key]) + (f" ± {float(bound):.2g}" if _is_number(bound) else "")
        elif key in (metrics.get("not_available") or {}):
            shown = f"n/a ({metrics['not_available'][key]})"
        else:
            continue
        rows.append(f"<tr><td>{html.escape(label)}</td><td>{html.escape(shown)}</td></tr>")
    for name, value in (metrics.get("per_defect_type") or {}).items():
        rows.append(f"<tr><td>image AUROC: {html.escape(str(name))}</td><td>{_cell(value)}</td></tr>")
    return rows


def _gallery_html(out_dir: Path, entries: Sequence[Mapping[str, Any]]) -> str:
    parts = []
    for kind, title, _ in GALLERY:
        figures = [_gallery_figure(out_dir, e) for e in entries if e["kind"] == kind]
        parts.append(f"<h3>{html.escape(title)}</h3>")
        parts.append('<div class="gallery">' + "".join(figures) + "</div>" if figures else "<p>none</p>")
    return "\n".join(parts)


def _gallery_figure(out_dir: Path, e: Mapping[str, Any]) -> str:
    """One gallery image, inline, with its score, the decision and the truth."""
    data = base64.b64encode((out_dir / e["file"]).read_bytes()).decode("ascii")
    truth = "defective" if e["label"] else "good"
    return (
        f'<figure><img alt="{html.escape(e["name"])}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(e['name'])}<br>score {e['score']:.4g}: judged "
        f'<span class="{e["decision"]}">{e["decision"]}</span>, truly {truth}</figcaption></figure>'
    )


def write_html_report(out_dir: str | Path, history: Sequence[Mapping[str, Any]] | None = None) -> Path:
    """``out_dir/report.html``, one self-contained page (figures inline, no network) from what the
    evaluation wrote there: ``metrics.json``, ``predictions.csv`` and ``report_data.json`` (curves,
    threshold, gallery); ``history`` (the training log) adds the loss curve."""
    out_dir = Path(out_dir)
    metrics = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
    data = json.loads((out_dir / "report_data.json").read_text(encoding="utf-8"))
    rows = list(read_rows(out_dir / "predictions.csv"))
    scores = np.array([float(r["score"]) for r in rows], np.float64)
    labels = np.array([int(r["label"] or 0) for r in rows], np.int64)
    threshold = data.get("threshold")
    rates = ", ".join(
        f"{label} {_cell(metrics[key])} %"
        for key, label in (("false_positive_rate", "false alarms"), ("miss_rate", "misses"))
        if key in metrics
    )
    figures = [_curve_figure(data["curves"], "roc", metrics), _curve_figure(data["curves"], "pr", metrics)]
    loss_fig = Figure(figsize=(7, 3.5))
    loss = _render(loss_fig) if _draw_loss(loss_fig, history or []) else None
    histogram = _render(_score_histogram(scores, labels, threshold, f"Test image scores: {rates}", 4))
    body = [
        f"<h1>msflow report: {html.escape(str(metrics.get('dataset', out_dir.name)))}</h1>",
        f"<p>{len(rows)} test images; image threshold {threshold:.6g} "
        f"({html.escape(rates or 'no rates: one class only')}).</p>"
        if threshold is not None
        else "",
        '<h2>Metrics</h2><table id="metrics"><tr><th>metric</th><th>value (%)</th></tr>'
        + "".join(_metric_rows(metrics))
        + "</table>",
        "<p>± : the bound on the error of the streamed pixel metrics against the exact computation.</p>",
        '<h2>ROC and precision-recall curves</h2><div class="figs">'
        + "".join(f'<img alt="curve" src="{f}">' for f in figures if f)
        + "</div>",
        f'<h2>Score histogram</h2><img alt="histogram" src="{histogram}">',
        f'<h2>Training loss</h2><img alt="loss" src="{loss}">' if loss else "",
        "<h2>Gallery</h2><p>Heat map of the image map; green: the true defect, red: the predicted one.</p>",
        _gallery_html(out_dir, data.get("gallery", [])),
    ]
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>msflow report</title>'
        f"<style>{_STYLE}</style></head><body>" + "\n".join(body) + "</body></html>\n"
    )
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
