"""Evaluate a trained model on a test set and write the report: the job of ``msflow test`` and of the
last step of ``msflow train``.

The model is already saved when this runs (``fit`` writes it first), so a run whose evaluation was
killed loses nothing: ``msflow test --model RUN`` (or ``msflow train --resume``) finishes it.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Any

from msflow.data.datasets import Sample
from msflow.evaluate import report
from msflow.evaluate.evaluation import ShardMerge, evaluate_stream, write_metrics
from msflow.infer.predictor import Predictor, Resolution
from msflow.model.checkpoint import update_meta


def evaluate_run(
    predictor: Predictor,
    samples: list[Sample],
    out_dir: str | Path,
    dataset: str,
    pro_mode: str = "standard",
    resolution: Resolution = "original",
    batch_size: int = 8,
    progress: bool = True,
    run_dir: str | Path | None = None,
    sharding: ShardMerge | None = None,
) -> dict[str, Any]:
    """Metrics of ``predictor`` on ``samples``, with ``metrics.json`` and the report in ``out_dir``.

    With ``run_dir`` (the run the model was loaded from) the run's training figures are added to the
    metrics, and when ``out_dir`` is the run folder the metrics also go into its ``model.json`` (the run
    is then finished). With ``sharding`` (every rank calls this) each rank predicts its shard of
    ``samples``; rank 0 writes the files and returns the metrics, the others return ``{}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    mine = sharding.shard(len(samples)) if sharding is not None else range(len(samples))
    maps = partial(predictor.iter_maps, batch_size=batch_size, resolution=resolution)
    metrics = evaluate_stream(
        samples,
        maps(samples[mine.start : mine.stop], progress=progress, desc="test"),
        predictor.threshold,
        out_dir,
        pro_mode=pro_mode,
        pixel_range=predictor.pixel_range,
        resolution=resolution,
        sharding=sharding,
        redraw=lambda chosen: maps(chosen, progress=False),
        # a second pass (only when a metric's error bound needs it) predicts the maps again: cheaper in
        # memory and disk than keeping a test set's full-size maps
        replay=lambda: maps(samples, progress=progress, desc="test, finer bins"),
    )
    if sharding is not None and not metrics:
        return {}  # not rank 0: it writes the report
    seconds = time.perf_counter() - start
    metrics["dataset"] = dataset
    if samples:
        metrics["test_images_per_second"] = round(len(samples) / max(seconds, 1e-9), 2)
    if run_dir is not None:
        metrics.update(predictor.meta.get("training") or {})
    write_metrics(out_dir / "metrics.json", metrics)
    if predictor.threshold is not None:  # report.html needs the decision (report_data.json)
        report.write_html_report(out_dir, _training_log(Path(run_dir)) if run_dir is not None else None)
    if run_dir is not None and Path(run_dir).resolve() == out_dir.resolve():
        update_meta(Path(run_dir) / "model", metrics=metrics)
    return metrics


def _training_log(run_dir: Path) -> list[dict[str, Any]]:
    """The run's per-epoch log (``train_log.jsonl``) for the report's loss curve; lines that do not
    parse (a crash cut one short) are skipped."""
    path = run_dir / "train_log.jsonl"
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [e for e in entries if isinstance(e, dict) and "epoch" in e]
