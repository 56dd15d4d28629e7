"""``msflow benchmark``: train and test every category under a root; one table with a mean row.

Each category gets its own run folder under ``output``; the table (``results.md``, ``.csv``,
``.json``) holds the last-epoch test metrics and the training time of each, in the categories' order,
a failed category's error in its row. Categories run one after the other in this process (each model
freed before the next: B19), or each as a Ray task (:mod:`msflow.cluster`); rerunning skips finished
categories and resumes interrupted ones (docs/scaling.md).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch

from msflow.cluster import require_ray, run_tasks
from msflow.config import Config
from msflow.data.datasets import find_categories
from msflow.errors import MSFlowError
from msflow.evaluate import report
from msflow.train.fit import fit

COLUMNS = ["category", "image_auroc", "pixel_auroc", "aupro", "image_f1_max", "train_seconds", "error"]


def run_benchmark(
    root: str | Path,
    output: str | Path,
    cfg: Config,
    categories: list[str] | None = None,
    progress: bool = True,
    executor: str = "local",
    address: str | None = None,
    cpus_per_task: int = 1,
    gpus_per_task: float = 0.0,
) -> list[dict]:
    """Train and test each category; returns the table rows (one per category, then the mean).

    ``address``, ``cpus_per_task`` and ``gpus_per_task`` are for ``executor="ray"``: the Ray cluster to
    join (default: start a local instance) and what each category's task reserves.
    """
    if executor not in ("local", "ray"):
        raise MSFlowError(f"executor must be 'local' or 'ray', got {executor!r}")
    if executor == "ray":
        require_ray()  # before any work: a one-line error when the extra is not installed
    output = Path(output)
    found = find_categories(root)
    if categories:
        by_name = {p.name: p for p in found}
        missing = [c for c in categories if c not in by_name]
        if missing:
            raise MSFlowError(f"categories not found under '{root}': {', '.join(missing)}")
        found = [by_name[c] for c in categories]
    print(report.metrics_table([], COLUMNS))  # rows follow as categories finish
    bars = progress and executor == "local"  # no progress bars in Ray tasks
    rows: dict[str, dict] = {}
    todo = []  # run_category's arguments
    for folder in found:
        done = finished_row(output / folder.name)
        if done is None:
            todo.append((folder.name, cfg.updated(data={"dataset": str(folder)}), output / folder.name, bars))
        else:
            rows[folder.name] = done
            _print_row(done, "already finished, skipped")
    if executor == "ray":
        tasks = run_tasks(run_category, todo, address, cpus_per_task, gpus_per_task)
        results = (
            row if error is None else {"category": todo[i][0], "error": error} for i, row, error in tasks
        )
    else:
        results = (run_category(*job) for job in todo)
    for row in results:
        rows[row["category"]] = row
        _print_row(row)
    table = report.with_mean_row([rows[folder.name] for folder in found], COLUMNS)
    report.write_table(output / "results", table, COLUMNS)
    print(report.metrics_table(table, COLUMNS))
    print(f"table: {output / 'results.md'} (.csv, .json)")
    return table


def run_category(name: str, cfg: Config, run_dir: Path, progress: bool = True) -> dict:
    """One category's fit as a table row; a user-fixable failure becomes the row's error."""
    row: dict = {"category": name}
    try:
        # Interrupted earlier (a rerun, or a Ray retry after its worker died): continue its checkpoint.
        metrics = fit(cfg, run_dir, resume="auto", progress=progress)
        row.update({k: metrics.get(k) for k in COLUMNS[1:-1]})
    except MSFlowError as err:
        row["error"] = str(err).splitlines()[0]
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def finished_row(run_dir: Path) -> dict | None:
    """The row of a category whose run folder is complete (model and metrics written), else None."""
    metrics_file = run_dir / "metrics.json"
    if not ((run_dir / "model.json").is_file() and metrics_file.is_file()):
        return None
    try:
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # unreadable: train it again (fit refuses to overwrite and says so)
    return {"category": run_dir.name, **{k: metrics.get(k) for k in COLUMNS[1:-1]}}


def _print_row(row: dict, note: str = "") -> None:
    line = report.metrics_table([row], COLUMNS).splitlines()[-1]
    print(f"{line}  {note}" if note else line, flush=True)
