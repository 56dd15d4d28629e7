"""Reporting helpers: anomaly-map overlays, prediction CSVs, plots and metric tables.

Plots use ``Figure`` + ``FigureCanvasAgg`` directly: off-screen Agg rendering without
importing ``pyplot`` or switching the process-wide backend (no global figure registry).
"""

from __future__ import annotations

import csv
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

from msflow.errors import MSFlowError

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
    """Blend a jet-coloured anomaly map over an RGB image and draw mask contours.

    Args:
        image: ``(H, W, 3)`` uint8 RGB image (other dtypes are clipped to 0..255).
        anomaly_map: ``(H, W)`` float anomaly scores.
        alpha: Weight of the heat map: ``out = (1 - alpha) * image + alpha * jet(map)``.
        vmin: Score mapped to the bottom of the colormap (default: the map's minimum).
        vmax: Score mapped to the top of the colormap (default: the map's maximum).
        gt_mask: Optional boolean ``(H, W)`` ground truth; its contour is drawn in green.
        pred_mask: Optional boolean ``(H, W)`` prediction; its contour is drawn in red.
            Where both contours meet, the ground truth (green) is drawn on top.

    Returns:
        ``(H, W, 3)`` uint8 RGB overlay.

    Raises:
        ValueError: On mismatched shapes or ``alpha`` outside [0, 1].
    """
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
    """Write :func:`jet_overlay` ``(image, anomaly_map, **kw)`` as a PNG, creating parent dirs.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(jet_overlay(image, anomaly_map, **kw), mode="RGB").save(
        path, format="PNG", compress_level=3
    )
    return path


# The one schema of predictions.csv, for evaluations (``msflow test``, the end of training) and for
# predictions (``msflow predict``): a column a writer does not know is left empty (no label when
# predicting; no mask area or overlay when evaluating).
PREDICTION_FIELDS = [
    "image",
    "label",
    "defect_type",
    "score",
    "normalized_score",
    "decision",
    "threshold",
    "defect_pixels",
    "overlay",
]


def write_predictions_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write per-image predictions as UTF-8 CSV.

    The header is the keys of the first row; keys that only appear in later rows are
    appended after them, and values a row lacks are left empty. No rows → empty file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    with path.open("w", encoding="utf-8", newline="") as fh:
        if rows:
            writer = csv.DictWriter(fh, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)
    return path


class RowWriter:
    """CSV rows written as they come and flushed, so a crash keeps every finished row.

    ``append=True`` continues an existing file (its header is kept; a last line cut short by a crash
    is dropped first). Columns are fixed up front; values a row lacks are left empty.
    """

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
    """Cut a last line that a crash left without its newline (it is redone); reads only the tail."""
    with path.open("r+b") as fh:
        end = fh.seek(0, io.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - 65536)
            fh.seek(start)
            chunk = fh.read(pos - start)
            if pos == end and chunk.endswith(b"\n"):
                return
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                fh.truncate(start + cut + 1)
                return
            pos = start
        fh.truncate(0)


def read_rows(path: str | Path) -> Iterator[dict[str, str]]:
    """The rows of a CSV written by :class:`RowWriter`, one at a time (call after opening the writer
    with ``append=True``, which drops a cut-short last line)."""
    path = Path(path)
    if not path.is_file():
        return
    with path.open("r", encoding="utf-8", newline="") as fh:
        yield from csv.DictReader(fh)


def _save_figure(fig: Figure, path: str | Path) -> Path:  # creates parent dirs
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100)
    return path


def plot_score_histogram(
    path: str | Path,
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    threshold: float | None = None,
) -> Path:
    """Save overlapping histograms of good (label 0) vs defective (label 1) image scores.

    Both classes share the same bins; a class with no samples is simply left out.
    ``threshold`` (if given) is drawn as a vertical dashed line.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).astype(int).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    finite = np.isfinite(scores)
    scores, labels = scores[finite], labels[finite]
    bins = np.histogram_bin_edges(scores, bins=min(50, max(10, scores.size // 5))) if scores.size else 10

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for value, name, colour in ((0, "good", "tab:blue"), (1, "defective", "tab:red")):
        subset = scores[labels == value]
        if subset.size:
            ax.hist(subset, bins=bins, alpha=0.5, color=colour, label=f"{name} (n={subset.size})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold = {threshold:.4g}")
    ax.set_xlabel("image anomaly score")
    ax.set_ylabel("number of images")
    ax.set_title("Image score distribution")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return _save_figure(fig, path)


def plot_loss_curve(path: str | Path, history: Sequence[Mapping[str, Any]]) -> Path | None:
    """Save a line plot of training loss per epoch.

    The y axis is always linear with scientific tick labels: MSFlow's NLL is often large
    and negative (around -1e5), where a log axis is impossible. Entries without a finite
    ``loss`` are skipped.

    Returns:
        The path written, or ``None`` (nothing written) when there is nothing to plot.
    """
    points = sorted(
        (float(h["epoch"]), float(h["loss"]))
        for h in history
        if h.get("loss") is not None and h.get("epoch") is not None and math.isfinite(float(h["loss"]))
    )
    if not points:
        return None
    epochs, losses = zip(*points, strict=False)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    ax.plot(epochs, losses, marker="o", markersize=3)
    ax.set_yscale("linear")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("Training loss")
    ax.grid(True, alpha=0.3)
    return _save_figure(fig, path)


def _is_number(value: Any) -> bool:
    """True for finite-or-not real numbers except bools (NaN counts; callers filter it)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_missing(value: Any) -> bool:  # None or NaN
    return value is None or (_is_number(value) and math.isnan(float(value)))


def _cell(value: Any) -> str:
    if _is_missing(value):
        return MISSING
    if _is_number(value) and not isinstance(value, numbers.Integral):
        return f"{float(value):.2f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def metrics_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Render rows as a markdown table (floats with 2 decimals, None/NaN/absent as "–").

    Returns:
        The table text, header first, without a trailing newline.
    """
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def with_mean_row(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], name_key: str = "category"
) -> list[dict[str, Any]]:
    """Return ``rows`` plus a row holding each numeric column's mean.

    Each mean is taken over the rows that have a numeric, non-NaN value in that column;
    a column with none (or a non-numeric column) gets ``None``. ``name_key`` is "mean".
    """
    mean: dict[str, Any] = {}
    for col in columns:
        values = [float(r[col]) for r in rows if _is_number(r.get(col)) and not _is_missing(r.get(col))]
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
    """Write ``stem.md`` (markdown), ``stem.csv`` and ``stem.json`` (list of dicts).

    Only ``columns`` are written, in that order. CSV keeps full precision with missing
    values empty; JSON uses ``null`` for missing values.

    Returns:
        ``{"md": ..., "csv": ..., "json": ...}`` paths.
    """
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


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """Short terminal summary of evaluation metrics (values already in percent).

    One line per known metric present (e.g. ``image AUROC     97.12``; ``n/a`` with the reason for
    those listed in ``metrics["not_available"]``), then, if
    ``metrics["per_defect_type"]`` is set, one indented image-AUROC line per defect type.
    """

    def num(value: Any) -> str:
        return _cell(float(value) if _is_number(value) else value)

    missing = metrics.get("not_available") or {}
    lines = []
    for key, label in _METRIC_LABELS:
        if key in metrics:
            lines.append(f"{label:<14} {num(metrics[key]):>6}")
        elif key in missing:
            lines.append(f"{label:<14} {'n/a':>6}  ({missing[key]})")
    per_type = metrics.get("per_defect_type")
    if per_type:
        lines.append("per defect type (image AUROC):")
        width = max(12, *(len(str(name)) for name in per_type))
        lines += [f"  {str(name):<{width}} {num(value):>6}" for name, value in per_type.items()]
    return "\n".join(lines) if lines else "(no metrics)"
