"""``msflow predict``: judge image files and folders with a trained run, write maps, masks and a summary.

Per image (all at the image's original resolution), as ``images`` says (``msflow predict --images``):
``"all"`` (the default) writes ``<name>_overlay.png`` (jet heatmap of the "mul" map with the predicted
contour), ``<name>_map.png`` (the "add" map as 16-bit grey, scaled to [0, 1] by its maximum possible
value 3) and ``<name>_mask.png`` (0/255); ``"overlay"`` only the first; ``"none"`` (``--no-images``)
none. For the whole call: ``predictions.csv`` (written row by row as batches finish, flushed, so a crash
keeps every finished row; ``--resume`` continues it and skips the images already there) and
``summary.json`` (counts and failures, not the rows). A file that cannot be read is listed as failed;
the others carry on.

:func:`run_predict_on_ray` spreads a very large input over a Ray cluster's workers in chunks of files
(``msflow predict --executor ray``); the outputs are those of :func:`run_predict`, in the same order.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from PIL import Image

from msflow.cluster import require_ray, run_tasks
from msflow.data.images import IMAGE_EXTENSIONS, list_images, read_image, to_uint8
from msflow.errors import DataError, MSFlowError
from msflow.evaluate import report
from msflow.files import atomic_write_bytes
from msflow.infer.predictor import Prediction, Predictor
from msflow.logs import Progress


def _out_name(path: Path, used: set[str]) -> str:
    name = path.stem
    while name in used:  # same stem in two folders: keep both
        name = f"{name}_{len(used)}"
    used.add(name)
    return name


RAY_CHUNK = 256  # files per Ray task: loading the model once per task is small next to 256 images


def _plan(inputs: list[str], output: Path) -> list[tuple[Path, str]]:
    """The image files of ``inputs`` (folders searched recursively, each file once) with their output
    names, decided up front so that any split of the work agrees."""
    files: dict[Path, Path] = {}
    for path in map(Path, inputs):
        if not (path.is_dir() or path.is_file()):
            raise MSFlowError(f"input '{path}' does not exist")
        for f in list_images(path, recursive=True) if path.is_dir() else [path]:
            files.setdefault(f.resolve(), f)  # the first spelling of a file given twice
    if not files:
        raise MSFlowError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {', '.join(inputs)}")
    output.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    return [(f, _out_name(f, used)) for f in files.values()]


ImageOutputs = Literal["all", "overlay", "none"]  # what predict writes per image besides its CSV row
IMAGE_OUTPUTS: tuple[str, ...] = get_args(ImageOutputs)


class _Tally:
    """The ``predictions.csv`` of one call, counting the verdicts it holds (the summary's numbers)."""

    def __init__(self, output: Path, resume: bool = False) -> None:
        self.writer = report.RowWriter(output / "predictions.csv", report.PREDICTION_FIELDS, append=resume)
        self.counts = {"predicted": 0, "defective": 0}
        self.done: set[str] = set()  # read after the writer has dropped a line cut short by a crash
        for row in report.read_rows(self.writer.path) if resume else ():
            self.done.add(row["image"])
            self.count(row)

    def count(self, row: dict) -> None:
        self.counts["predicted"] += 1
        self.counts["defective"] += row["decision"] == "defective"

    def write(self, row: dict) -> None:
        self.writer.write(row)
        self.count(row)


def run_predict(
    predictor: Predictor,
    inputs: list[str],
    output: str | Path,
    batch_size: int = 8,
    progress: bool = True,
    images: ImageOutputs = "all",
    resume: bool = False,
) -> dict:
    """Predict every input (module doc); returns the summary (also written to ``output/summary.json``).
    Nothing per image is kept in memory but its path and name. ``resume=True`` keeps the rows already
    in ``predictions.csv`` and skips their images (a fresh run starts the file anew)."""
    output = Path(output)
    planned = _plan(inputs, output)
    tally = _Tally(output, resume)
    todo = [(f, name) for f, name in planned if str(f) not in tally.done]
    start = time.perf_counter()
    bar = Progress(desc="predict", total=len(todo), unit="images", enabled=progress)
    try:
        failures = predict_files(predictor, todo, output, batch_size, images, tally.write, bar.update)
    finally:
        tally.writer.close()
        bar.close()
    return _write_summary(predictor, output, len(planned), tally, failures, time.perf_counter() - start)


def predict_files(
    predictor: Predictor,
    todo: list[tuple[Path, str]],
    output: Path,
    batch_size: int,
    images: ImageOutputs,
    on_row: Callable[[dict], object],
    done: Callable[[int], object] | None = None,
) -> list[dict]:
    """Judge the files of ``todo``, writing each one's images under its name and giving its row to
    ``on_row`` as soon as it exists (none is kept); returns the failures."""
    if images not in IMAGE_OUTPUTS:
        raise MSFlowError(f"images must be one of {', '.join(IMAGE_OUTPUTS)}, got {images!r}")
    failures = []
    for i in range(0, len(todo), batch_size):
        chunk = todo[i : i + batch_size]
        loaded = []
        for f, name in chunk:  # read first, so one bad file does not sink its batch
            try:
                loaded.append((f, name, read_image(f)))
            except DataError as err:
                failures.append({"image": str(f), "error": str(err)})
        if loaded:
            results = predictor.predict_images([arr for _, _, arr in loaded])
            for (f, name, arr), res in zip(loaded, results, strict=True):
                on_row({"image": str(f), **res.summary(), **_write_images(output, name, arr, res, images)})
        if done is not None:
            done(len(chunk))
    return failures


def _write_images(output: Path, name: str, image: np.ndarray, res: Prediction, images: ImageOutputs) -> dict:
    """One image's files, as ``images`` says; the CSV's ``overlay`` entry (empty without one)."""
    if images == "none":
        return {}
    mask = res.mask if res.is_defective else None
    report.save_overlay(output / f"{name}_overlay.png", to_uint8(image), res.image_map, pred_mask=mask)
    if images == "all":
        grey = (np.clip(res.anomaly_map / 3.0, 0, 1) * 65535).astype(np.uint16)
        Image.fromarray(grey).save(output / f"{name}_map.png")
        Image.fromarray((res.mask * 255).astype(np.uint8)).save(output / f"{name}_mask.png")
    return {"overlay": f"{name}_overlay.png"}


def _write_summary(
    predictor: Predictor, output: Path, n_files: int, tally: _Tally, failures: list[dict], seconds: float
) -> dict:
    counts, skipped = tally.counts, len(tally.done)
    new = counts["predicted"] - skipped
    summary = {
        "model": str(predictor.meta.get("dataset", "")),
        "runtime": predictor.runtime,
        "threshold": predictor.threshold.to_dict(),
        "images": n_files,
        "predicted": counts["predicted"],
        "defective": counts["defective"],
        "skipped": skipped,
        "failed": len(failures),
        "failures": failures,
        "seconds": round(seconds, 3),
        "images_per_second": round(new / seconds, 2) if seconds > 0 and new else None,
        "predictions": "predictions.csv",
    }
    atomic_write_bytes(output / "summary.json", json.dumps(summary, indent=2).encode())
    return summary


def run_predict_on_ray(
    model: str | Path,
    inputs: list[str],
    output: str | Path,
    batch_size: int = 8,
    progress: bool = True,
    images: ImageOutputs = "all",
    device: str = "auto",
    runtime: str = "torch",
    threshold: float | None = None,
    address: str | None = None,
    cpus_per_task: int = 1,
    gpus_per_task: float = 0.0,
    chunk_size: int = RAY_CHUNK,
) -> dict:
    """:func:`run_predict` with chunks of files as Ray tasks, each loading the model from ``model``
    (on a cluster, ``model``, the inputs and ``output`` must be on a shared filesystem)."""
    require_ray()
    # Refuses a bad model before any task. CPU tasks: "auto" is resolved here, once, so that the tasks do
    # not all time the runtimes at the same moment on the same cores; GPU tasks resolve it on their GPU.
    on_cpu = gpus_per_task == 0 and device in ("auto", "cpu")
    predictor = Predictor.load(model, "cpu", runtime if on_cpu else "torch", batch_size, threshold)
    runtime = predictor.runtime if on_cpu else runtime
    output = Path(output)
    planned = _plan(inputs, output)
    start = time.perf_counter()
    load = {"run": str(model), "device": device, "runtime": runtime, "image_threshold": threshold}
    step = max(1, chunk_size)
    jobs = [(load, planned[i : i + step], output, batch_size, images) for i in range(0, len(planned), step)]
    parts: list[tuple[list[dict], list[dict]]] = [([], []) for _ in jobs]
    bar = Progress(desc="predict (ray)", total=len(planned), unit="images", enabled=progress)
    for index, result, error in run_tasks(_predict_task, jobs, address, cpus_per_task, gpus_per_task):
        if error is None:
            parts[index] = result
        else:  # a lost task: its files are failures, the others stand
            parts[index] = ([], [{"image": str(f), "error": error} for f, _ in jobs[index][1]])
        bar.update(len(jobs[index][1]))
    bar.close()
    tally = _Tally(output)
    try:  # the tasks' rows, in input order (they come back out of order)
        for rows, _ in parts:
            for row in rows:
                tally.write(row)
    finally:
        tally.writer.close()
    failures = [fail for part in parts for fail in part[1]]
    return _write_summary(predictor, output, len(planned), tally, failures, time.perf_counter() - start)


def _predict_task(
    load: dict[str, Any], todo: list[tuple[Path, str]], output: Path, batch_size: int, images: ImageOutputs
) -> tuple[list[dict], list[dict]]:
    """One Ray task: load the model (``load``: :meth:`Predictor.load`'s arguments), judge a chunk of
    files; (rows, failures)."""
    predictor = Predictor.load(**load)
    rows: list[dict] = []
    failures = predict_files(predictor, todo, output, batch_size, images, rows.append)
    return rows, failures
