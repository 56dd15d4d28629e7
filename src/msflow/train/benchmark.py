"""``msflow benchmark``: train and test every category under a root; one table with a mean row.

Each category gets its own run folder under ``output``; the table (``results.md``, ``.csv``,
``.json``) holds the last-epoch test metrics and the training time of each. A category that fails
(bad data, say) is reported in the table and the others go on. Models are freed between categories
(the official loop kept them all alive: official-code-differences.md, B19).
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

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
) -> list[dict]:
    output = Path(output)
    found = find_categories(root)
    if categories:
        by_name = {p.name: p for p in found}
        missing = [c for c in categories if c not in by_name]
        if missing:
            raise MSFlowError(f"categories not found under '{root}': {', '.join(missing)}")
        found = [by_name[c] for c in categories]
    rows = []
    for folder in found:
        print(f"== {folder.name}")
        row: dict = {"category": folder.name}
        try:
            metrics = fit(cfg.updated(data={"dataset": str(folder)}), output / folder.name, progress=progress)
            row.update({k: metrics.get(k) for k in COLUMNS[1:-1]})
        except MSFlowError as err:
            row["error"] = str(err).splitlines()[0]
            print(f"error: {row['error']}")
        rows.append(row)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    table = report.with_mean_row(rows, COLUMNS)
    report.write_table(output / "results", table, COLUMNS)
    print(report.metrics_table(table, COLUMNS))
    print(f"table: {output / 'results.md'} (.csv, .json)")
    return table
