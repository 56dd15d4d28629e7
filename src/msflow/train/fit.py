"""``fit``: from a config to a finished run folder (the job behind ``msflow train`` and ``Detector.fit``).

A run is a sequence of named steps, each a function below: open the run folder (fresh, resumed or
restarted: :mod:`msflow.train.resume`), load the data, resolve the settings, extract the features,
train, choose the label-free settings, calibrate the threshold, save the model, evaluate. Under
torchrun every rank runs the same steps; what differs between ranks (who writes, who waits, what is
sharded) is :class:`~msflow.train.distributed.Distributed`'s business.

Run folder::

    config.yaml              the resolved configuration (an "auto" image size, score or maps as decided)
    map_selection.json       the synthetic check of the maps: every normalisation and smoothing setting's
                             pixel AUROC on synthetic defects' exact masks, and the one chosen
    score_selection.json     the synthetic check: every candidate score's AUROC on held-out good images
                             vs synthetic defects, the best one (chosen with ``score: auto``) and the
                             one used (no test label is read)
    model.safetensors/.json  the final model, its config, threshold, training figures (no pickle); written
                             before the test evaluation, which then adds its metrics to model.json
    checkpoint/last.*        training state after the last completed epoch, or the step a SIGTERM
                             stopped at (for --resume and restarts: msflow.train.resume)
    metrics.json             test-set metrics of the LAST epoch (never test-selected, B14);
                             missing if the evaluation died: ``msflow test --model RUN`` writes it
    predictions.csv          per-image score, normalised score, decision, label, defect type
    overlays/*.png           heatmaps over a sample of test images, with GT and predicted contours
    score_histogram.png, loss_curve.png, train_log.jsonl
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msflow.config import Config, replace, save_yaml
from msflow.data.datasets import Sample, load_data, load_dataset, load_test_set, validate_samples
from msflow.data.images import read_image, read_mask
from msflow.data.sizing import resolve_image_size
from msflow.device import resolve_device, seed_everything
from msflow.errors import MSFlowError
from msflow.evaluate import report
from msflow.evaluate.evaluation import evaluate_stream
from msflow.evaluate.threshold import GoodImageCalibration, LabelledCalibration, Threshold
from msflow.infer.evaluate_run import evaluate_run
from msflow.infer.predictor import Predictor
from msflow.logs import log as logger
from msflow.model.checkpoint import save_model
from msflow.model.msflow import MSFlow
from msflow.train.budget import measure_epoch_cost, plan
from msflow.train.choice import choose_settings
from msflow.train.distributed import Distributed
from msflow.train.features import FeatureCache
from msflow.train.loop import StepHook, TrainState, make_average, make_optimizer, train_flows
from msflow.train.resume import (
    Opening,
    Resume,
    load_training_state,
    open_run,
    save_training_state,
    trim_train_log,
)
from msflow.train.schedule import total_epochs


def split_holdout(train: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Seeded split of the good training images into (fit, held out for threshold calibration)."""
    n_hold = int(round(fraction * len(train))) if len(train) >= 4 else 0
    if fraction > 0:
        n_hold = max(n_hold, 1 if len(train) >= 4 else 0)
    order = np.random.default_rng(seed).permutation(len(train))
    hold = sorted(order[:n_hold].tolist())
    keep = sorted(order[n_hold:].tolist())
    return [train[i] for i in keep], [train[i] for i in hold]


@dataclass
class Run:
    """A training run's surroundings: its folder, its place in a (data-parallel) job, how it reports."""

    folder: Path
    dist: Distributed
    log: Callable[[str], None]
    progress: bool
    step_hook: StepHook | None = None

    def save_config(self, cfg: Config) -> None:
        self.dist.on_main(save_yaml, cfg, self.folder / "config.yaml")


@dataclass
class TrainingData:
    name: str
    fit: list[Sample]  # the good images the flows learn
    holdout: list[Sample]  # good images held out: threshold, label-free choices, plateau rule
    test: list[Sample]

    @property
    def calibration(self) -> list[Sample]:
        return self.holdout or self.fit  # with no hold-out, training images stand in (biased low)


@dataclass
class Features:
    cache: FeatureCache
    holdout: FeatureCache | None  # for the plateau rule only
    seconds: float


def fit(
    cfg: Config,
    run_dir: str | Path,
    resume: Resume = False,
    validation: str | None = None,
    progress: bool = True,
    step_hook: StepHook | None = None,
    log: Callable[[str], None] = logger.info,
) -> dict:
    """Train a model as ``cfg`` says, save it, then evaluate the last epoch on the test set.

    The finished model (with its threshold) is written before the test evaluation starts, so nothing
    trained is lost if the evaluation fails: ``resume=True`` on such a run only evaluates. ``resume="auto"``
    continues a checkpoint of the same configuration if there is one (a retried job), and so does a
    restarted torchrun or Slurm job without being told (:mod:`msflow.train.resume`). SIGTERM during
    training writes a checkpoint of the current step and raises :class:`~msflow.errors.StoppedError`.
    Returns the test metrics (see :func:`msflow.evaluate.evaluation.evaluate_stream`). Under torchrun
    every rank calls this (data-parallel training, see :mod:`msflow.train.distributed`); rank 0 writes
    the run folder, the others wait for it, and all return its metrics.
    """
    with Distributed.from_environment() as dist:
        run = Run(Path(run_dir), dist, dist.main_only(log), progress and dist.is_main, step_hook)
        metrics = _fit(cfg, run, resume, validation)
        return dist.result_from_main(metrics)  # after _fit returned: the waiting ranks hold no features


def _fit(cfg: Config, run: Run, resume: Resume, validation: str | None) -> dict:
    """The steps of a training run, in order."""
    began = time.perf_counter()
    if cfg.train.budget is not None and run.dist.enabled:
        raise MSFlowError("--budget times this process alone; it cannot be used with torchrun (set --epochs)")
    # A warning, so it shows under --quiet too: nobody typed --resume for an automatic continuation.
    opening = open_run(cfg, run.folder, resume, run.dist.restarts, logger.warning)
    if opening.finished:
        run.log(f"'{run.folder}' holds a finished model: evaluating it (no training)")
        return run.dist.on_main(_evaluate_saved, opening.cfg, run) or {}
    device = run.dist.setup(resolve_device(opening.cfg.train.device), opening.cfg.train.batch_size)
    seed_everything(opening.cfg.train.seed)
    data = load_training_data(opening.cfg, run.log)
    cfg = resolve_settings(opening.cfg, data, run)
    built = time.perf_counter()
    model = MSFlow(cfg.model).to(device)
    build_seconds = round(time.perf_counter() - built, 2)
    features = extract(model, cfg, data, device, run)
    if cfg.train.budget is not None and not opening.resume:  # a resumed run keeps the epochs it chose
        cfg = apply_budget(cfg, model, features, data, device, began, run)
    state, timings = train(model, features, cfg, opening, device, run, data.test)
    del features  # the features are no longer needed (a disk cache deletes its files)
    predictor, synthetic_auroc = choose(Predictor(model, cfg, None, device), data, run)
    predictor.threshold, calib_info = calibrate(predictor, data, validation, run)
    record = {"model_build_seconds": build_seconds, **timings, "synthetic_auroc": synthetic_auroc}
    save(predictor, data, state, {**record, **calib_info}, run)
    return _evaluate(predictor, run.folder, run.progress, data.name, data.test, run.dist)


def load_training_data(cfg: Config, log: Callable[[str], None]) -> TrainingData:
    """The dataset, refused before any work if an image cannot be used, with the seeded hold-out split."""
    name, train, test = load_data(cfg.data)
    log(f"dataset {name}: {len(train)} good training images, {len(test)} test images")
    validate_samples(train, f"training set of '{name}'")
    if test:  # a folder of good images only may have no test set: the model is still made
        validate_samples(test, f"test set of '{name}'")
    fit_samples, holdout = split_holdout(train, cfg.data.holdout_fraction, cfg.train.seed)
    log(_holdout_line(len(holdout), len(train), len(test)))
    return TrainingData(name, fit_samples, holdout, test)


def _holdout_line(held: int, good: int, test: int) -> str:
    """What the hold-out is for, in one line (and what a run without a test set will not report)."""
    use = "the threshold and the label-free check of scores and maps"
    line = (
        f"held out {held} of {good} good training images (never trained on) for {use}"
        if held
        else f"no hold-out ({good} good images): the training images set {use} (biased low)"
    )
    return line if test else f"{line}; no test set, so no test metrics"


def resolve_settings(cfg: Config, data: TrainingData, run: Run) -> Config:
    """Settings that depend on the data, decided before training ("auto" image size, fallbacks of the
    label-free choices); the run folder's config.yaml says what was decided. Every rank decides alike."""
    if len(data.calibration) < 2:  # nothing to judge scores or maps on: every "auto" keeps its incumbent
        resolved = cfg.model.with_maps(cfg.model.maps.resolved())
        if resolved != cfg.model:
            cfg = replace(cfg, model=resolved)
            run.log(f"{resolved.maps}: 'auto' needs at least 2 good images to judge the scores and maps on")
    if isinstance(cfg.model.image_size, str):  # "auto:N": the training images' aspect ratio
        # Tiles are square, so a tiled model's input is the square budget.
        size = cfg.model.image_size
        size = int(size.partition(":")[2]) if cfg.model.tile else resolve_image_size(size, data.fit)
        cfg = cfg.updated(model={"image_size": size})
        run.log(f"image size {cfg.model.image_size} (auto: the training images' median aspect ratio)")
    run.dist.on_main(run.folder.mkdir, parents=True, exist_ok=True)
    run.save_config(cfg)
    return cfg


def extract(model: MSFlow, cfg: Config, data: TrainingData, device: torch.device, run: Run) -> Features:
    """The frozen backbone's features of the training images, once (each rank extracts its shard)."""
    start = time.perf_counter()
    t = cfg.train
    settings = dict(
        device=device,
        batch_size=t.batch_size,
        where=t.cache,
        workers=cfg.data.workers,
        progress=run.progress,
        dist=run.dist,
    )
    cache = FeatureCache.build(model, data.fit, **settings)
    # The plateau rule reads the held-out good images' NLL after every epoch (standardised with the
    # training statistics; never a test image).
    holdout = None
    if t.stop == "plateau" and data.holdout:
        holdout = FeatureCache.build(model, data.holdout, **settings, fit_statistics=False)
    if cfg.model.tile:
        run.log(
            f"tiles of {cfg.model.tile} px (overlap {cfg.model.tile_overlap:g}) resized to "
            f"{cfg.model.image_size}: {len(cache)} training tiles from {len(data.fit)} images"
        )
    return Features(cache, holdout, time.perf_counter() - start)


def apply_budget(
    cfg: Config,
    model: MSFlow,
    features: Features,
    data: TrainingData,
    device: torch.device,
    began: float,
    run: Run,
) -> Config:
    """The config with the epochs that fit ``--budget`` (recorded in ``budget.json``; the budget itself
    is then cleared from ``config.yaml``, so that a resumed run keeps these epochs). One process only."""
    cache = features.cache
    cost = measure_epoch_cost(model, cache, cfg.train, device)
    spent = time.perf_counter() - began  # loading, extraction and this measurement
    checks = len(data.test) + 3 * len(data.calibration)  # test images, and the synthetic checks' images
    extract_rate = features.seconds / max(len(cache), 1)
    decided = plan(cfg.train.budget, spent, cost, len(cache), checks, extract_rate, cfg.train.epochs)
    (run.folder / "budget.json").write_text(json.dumps(decided, indent=2), encoding="utf-8")
    run.log(
        f"budget {cfg.train.budget:g} min: {decided['epoch_seconds']:.1f} s per epoch here, "
        f"{decided['spent_seconds'] / 60:.1f} min spent, ~{decided['evaluation_seconds_estimate'] / 60:.1f} "
        f"min for the checks and the test -> {decided['epochs']} epochs "
        f"(expected {decided['expected_total_minutes']:.1f} min"
        + ("" if decided["fits"] else "; even one epoch exceeds the budget")
        + ")"
    )
    run.log("expected accuracy against 100 epochs, from measured runs (msflow.train.budget):")
    for line in decided["expected_cost"]:
        run.log(f"  {line}")
    cfg = replace(cfg, train=replace(cfg.train, epochs=decided["epochs"], budget=None))
    run.save_config(cfg)
    return cfg


def train(
    model: MSFlow,
    features: Features,
    cfg: Config,
    opening: Opening,
    device: torch.device,
    run: Run,
    test: list[Sample],
) -> tuple[TrainState, dict]:
    """Train the flows (from the checkpoint when the run continues), checkpointing as configured, then
    calibrate the global normalisation on the training features. Returns the state and the timings."""
    start = time.perf_counter() - features.seconds
    optimizer = make_optimizer(model.trainable_parameters(), cfg.train.lr, device)
    average = make_average(model, cfg.train)
    state = load_training_state(run.folder, model, optimizer, average) if opening.resume else TrainState()
    run.dist.on_main(trim_train_log, run.folder, state.epoch)  # lines past the checkpoint are redone

    def checkpoint(state: TrainState) -> None:
        run.dist.on_main(
            save_training_state, run.folder, model, optimizer, cfg, state, opening.requested, average
        )
        run.dist.wait_for_main()

    def on_epoch_end(state: TrainState) -> None:
        run.dist.on_main(_log_epoch, state, model, cfg, test, run.folder, run.log)
        due = state.epoch % cfg.train.checkpoint_every == 0
        if due or state.epoch == total_epochs(cfg.train, state.plateau):
            checkpoint(state)

    model.train()
    train_flows(
        model,
        features.cache,
        cfg.train,
        device,
        state,
        optimizer,
        on_epoch_end=on_epoch_end,
        step_hook=run.step_hook,
        progress=run.progress,
        dist=run.dist,
        holdout=features.holdout,
        on_stop=checkpoint,
        average=average,
    )
    if average is not None:  # the averaged weights are the model from here on
        average.copy_to_model()
    model.eval()
    cache = features.cache
    model.calibrate_global_normalization(
        ([f.to(device) for f in b] for b in cache.batches(cfg.train.batch_size, run.dist.shard(len(cache)))),
        gather=run.dist.gather_rows,
    )
    return state, {
        "train_seconds": round(time.perf_counter() - start, 2),
        "feature_extraction_seconds": round(features.seconds, 2),
        **({"training_tiles": len(cache)} if cfg.model.tile else {}),
    }


def _log_epoch(
    state: TrainState,
    model: MSFlow,
    cfg: Config,
    test: list[Sample],
    folder: Path,
    log: Callable[[str], None],
) -> None:
    """The epoch's line in train_log.jsonl, with a test evaluation every ``eval_every`` epochs."""
    entry, every = state.history[-1], cfg.train.eval_every
    if every and state.epoch % every == 0 and state.epoch < total_epochs(cfg.train, state.plateau):
        # Logged only, never used to pick a checkpoint (B14).
        predictor = Predictor(model, cfg, None, next(model.parameters()).device)
        results = predictor.iter_maps(test, batch_size=cfg.train.batch_size, progress=False)
        entry["test"] = evaluate_stream(test, results, pixel_range=predictor.pixel_range)
        model.train()
    with (folder / "train_log.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
    if "plateau_at" in entry:
        log(
            f"held-out NLL plateau after epoch {state.epoch}: the learning rate decays from here, "
            f"training ends after epoch {entry['schedule_epochs']}"
        )


def choose(predictor: Predictor, data: TrainingData, run: Run) -> tuple[Predictor, float | None]:
    """The label-free choices where the settings say "auto" (the maps, then under them the image score:
    :mod:`msflow.train.choice`), made by rank 0 on the synthetic check; every rank gets them. Returns
    a predictor of the trained model under the decided settings, and the score's synthetic AUROC."""
    decided: dict = {"model": {}, "synthetic_auroc": None}
    if len(data.calibration) >= 2:  # "auto" with fewer kept its incumbents in resolve_settings
        decided = run.dist.from_main(lambda: _choose_on_main(predictor, data, run))
    cfg = predictor.config.updated(model=decided["model"])
    chosen = predictor.with_settings(cfg.model.maps)  # nothing edited in place
    chosen.config = cfg
    return chosen, decided["synthetic_auroc"]


def _choose_on_main(predictor: Predictor, data: TrainingData, run: Run) -> dict:
    # The synthetic check, on every run (label-free evidence for the user and for choosing defaults):
    # held-out good images and synthetic defects drawn into them, with exact masks.
    cfg = predictor.config
    source = "holdout" if data.holdout else "train (no hold-out: biased)"
    images = [read_image(s.image) for s in data.calibration]
    which = "held-out" if data.holdout else "training"
    run.log(f"synthetic check: synthetic defects drawn into {len(images)} {which} good images")
    settings, auroc = choose_settings(
        predictor, images, run.folder, cfg.train.batch_size, cfg.train.seed, source=source, log=run.log
    )
    cfg = replace(cfg, model=cfg.model.with_maps(settings))
    save_yaml(cfg, run.folder / "config.yaml")
    return {
        "model": {k: getattr(cfg.model, k) for k in ("score", "normalization", "smoothing")},
        "synthetic_auroc": auroc,
    }


def calibrate(
    predictor: Predictor, data: TrainingData, validation: str | None, run: Run
) -> tuple[Threshold, dict[str, Any]]:
    """The threshold from the held-out good images (or a labelled folder), and how it does on them.

    Data-parallel, each rank predicts its shard of the good images and rank 0 merges the calibrations
    (quantiles do not depend on the order of the scores, the pixel counts add exactly), then alone
    reads the labelled folder; every rank gets the threshold.
    """
    mine = run.dist.shard(len(data.calibration))
    calib = GoodImageCalibration(predictor.pixel_range)
    batch_size = predictor.config.train.batch_size
    images = data.calibration[mine.start : mine.stop]
    for maps in predictor.iter_maps(images, batch_size=batch_size, progress=run.progress, desc="calibrate"):
        calib.add(maps.score, maps.anomaly_map)
    merged = run.dist.merge_to_main(calib)
    decided: dict = {}
    if merged is not None:
        calib = merged[0]
        threshold = calib.threshold("holdout" if data.holdout else "train")
        if validation:
            threshold = calibrate_on_folder(predictor, validation, batch_size, threshold, run.progress)
        flagged = sum(threshold.is_defective(s) for s in calib.scores)
        where = "holdout" if data.holdout else "train"
        decided = {
            "threshold": threshold.to_dict(),
            "info": {
                "holdout_images" if data.holdout else "calibration_training_images": len(calib.scores),
                f"{where}_false_positive_rate": round(100.0 * flagged / len(calib.scores), 4),
            },
        }
    decided = run.dist.result_from_main(decided)  # the other ranks wait for rank 0's threshold
    return Threshold.from_dict(decided["threshold"]), decided["info"]


def save(predictor: Predictor, data: TrainingData, state: TrainState, record: dict, run: Run) -> None:
    """The model with its threshold and training record (rank 0), before the test evaluation: from
    here on, nothing trained can be lost. ``record``: timings, synthetic AUROC, calibration figures."""
    cfg = predictor.config
    training = {
        "epochs": state.epoch,
        "stop": cfg.train.stop,
        "synthetic_auroc": record.pop("synthetic_auroc"),
        **({"plateau": state.plateau.to_dict()} if cfg.train.stop == "plateau" else {}),
        "train_images": len(data.fit),
        **record,
    }
    predictor.meta = {"training": training}

    def write() -> None:
        meta = {"threshold": predictor.threshold.to_dict(), "dataset": data.name, "training": training}
        save_model(predictor.model, cfg, run.folder / "model", **meta)
        report.plot_loss_curve(run.folder / "loss_curve.png", state.history)

    run.dist.on_main(write)


def _evaluate_saved(cfg: Config, run: Run) -> dict:
    """The test evaluation of a run whose model is already saved."""
    return _evaluate(Predictor.load(run.folder, cfg.train.device), run.folder, run.progress)


def _evaluate(
    predictor: Predictor,
    run_dir: Path,
    progress: bool,
    name: str | None = None,
    test: list[Sample] | None = None,
    dist: Distributed | None = None,
) -> dict:
    """The last step of training: the test-set report in the run folder (also finishes a saved run).
    Data-parallel (``dist``), every rank calls this and evaluates its shard; rank 0 writes the report."""
    cfg = predictor.config
    if test is None:
        name, test = load_test_set(cfg.data)
    return evaluate_run(
        predictor,
        test,
        run_dir,
        str(name),
        resolution=cfg.train.eval_resolution,
        batch_size=cfg.train.batch_size,
        progress=progress,
        run_dir=run_dir,
        sharding=dist if dist is not None and dist.enabled else None,
    )


def calibrate_on_folder(
    predictor: Predictor, folder: str, batch_size: int, fallback: Threshold, progress: bool = True
) -> Threshold:
    """F1-optimal thresholds on a labelled folder in MVTec layout (its test/ part)."""
    _, _, samples = load_dataset(folder)
    validate_samples(samples, f"validation set '{folder}'")
    calib = LabelledCalibration(predictor.pixel_range)
    results = predictor.iter_maps(samples, batch_size=batch_size, progress=progress, desc="validation")
    for sample, maps in zip(samples, results, strict=True):
        mask = read_mask(sample.mask) if sample.mask is not None else None
        if mask is None and any(s.mask is not None for s in samples):
            mask = np.zeros(maps.anomaly_map.shape, bool)
        calib.add(maps.score, sample.label, mask, maps.anomaly_map)
    return calib.threshold(fallback.pixel)
