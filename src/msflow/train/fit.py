"""``fit``: from a config to a finished run folder (the job behind ``msflow train`` and ``Detector.fit``).

A run is a sequence of named steps, each a function below. Under torchrun every rank runs the same
steps; what differs between ranks (who writes, who waits, what is sharded) is
:class:`~msflow.train.distributed.Distributed`'s business. The run folder's files: docs/choices.md
("A run folder"); ``budget.json`` records what ``--budget`` decided.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msflow.config import Config, replace, save_yaml
from msflow.data.datasets import Sample, load_data, load_dataset, load_test_set, validate_samples
from msflow.data.images import read_mask
from msflow.data.sizing import resolve_image_size
from msflow.device import resolve_device, seed_everything
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
from msflow.train.loop import StepHook, TrainState, make_optimizer, train_flows
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
    # At least one image whenever a hold-out is asked for; none from fewer than 4 images.
    n_hold = max(round(fraction * len(train)), int(fraction > 0)) if len(train) >= 4 else 0
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
    device: torch.device = torch.device("cpu")  # this rank's, once the job is set up

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
    """Train a model as ``cfg`` says, save it, then evaluate the last epoch on the test set; returns
    the test metrics (under torchrun, rank 0's on every rank).

    The model is saved before the test evaluation: ``resume=True`` on a run whose evaluation failed only
    evaluates. ``resume="auto"`` and restarted jobs continue a checkpoint of the same configuration
    (:mod:`msflow.train.resume`). SIGTERM during training checkpoints the step, then raises
    :class:`~msflow.errors.StoppedError`.
    """
    began = time.perf_counter()
    with Distributed.from_environment() as dist:
        run = Run(Path(run_dir), dist, dist.main_only(log), progress and dist.is_main, step_hook)
        # A warning, so it shows under --quiet too: nobody typed --resume for an automatic continuation.
        opening = open_run(cfg, run.folder, resume, dist.restarts, logger.warning)
        t = opening.cfg.train
        if opening.finished:
            run.log(f"'{run.folder}' holds a finished model: evaluating it (no training)")
            return dist.from_main(lambda: evaluate(Predictor.load(run.folder, t.device), run))
        run.device = dist.setup(resolve_device(t.device), t.batch_size, t.budget)
        seed_everything(t.seed)
        data = load_training_data(opening.cfg, run.log)
        cfg = resolve_settings(opening.cfg, data, run)
        built = time.perf_counter()
        model = MSFlow(cfg.model).to(run.device)
        build_seconds = round(time.perf_counter() - built, 2)
        features = extract(model, cfg, data, run)
        if cfg.train.budget is not None and not opening.resume:  # a resumed run keeps the epochs it chose
            cfg = apply_budget(cfg, model, features, data, began, run)
        state, timings = train(model, features, cfg, opening, data, run)
        del features  # freed before any rank waits for another (a disk cache deletes its files)
        predictor, synthetic_auroc = choose(Predictor(model, cfg, None, run.device), data, run)
        predictor.threshold, calib_info = calibrate(predictor, data, validation, run)
        record = {"model_build_seconds": build_seconds, **timings, "synthetic_auroc": synthetic_auroc}
        save(predictor, data, state, {**record, **calib_info}, run)
        return dist.result_from_main(evaluate(predictor, run, data))


def load_training_data(cfg: Config, log: Callable[[str], None]) -> TrainingData:
    """The dataset, refused before any work if an image cannot be used, with the seeded hold-out split."""
    name, train, test = load_data(cfg.data)
    log(f"dataset {name}: {len(train)} good training images, {len(test)} test images")
    validate_samples(train, f"training set of '{name}'")
    if test:  # a folder of good images only may have no test set: the model is still made
        validate_samples(test, f"test set of '{name}'")
    fit_samples, holdout = split_holdout(train, cfg.data.holdout_fraction, cfg.train.seed)
    use = "the threshold and the label-free check of scores and maps"
    line = (
        f"held out {len(holdout)} of {len(train)} good training images (never trained on) for {use}"
        if holdout
        else f"no hold-out ({len(train)} good images): the training images set {use} (biased low)"
    )
    log(line if test else f"{line}; no test set, so no test metrics")
    return TrainingData(name, fit_samples, holdout, test)


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


def extract(model: MSFlow, cfg: Config, data: TrainingData, run: Run) -> Features:
    """The frozen backbone's features of the training images, once (each rank extracts its shard)."""
    start = time.perf_counter()
    t = cfg.train
    settings = dict(device=run.device, batch_size=t.batch_size, where=t.cache, workers=cfg.data.workers)
    settings.update(progress=run.progress, dist=run.dist)
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
    cfg: Config, model: MSFlow, features: Features, data: TrainingData, began: float, run: Run
) -> Config:
    """The config with the epochs that fit ``--budget`` (recorded in ``budget.json``; the budget itself
    is then cleared from ``config.yaml``, so that a resumed run keeps these epochs). One process only."""
    cache = features.cache
    cost = measure_epoch_cost(model, cache, cfg.train, run.device)
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
    model: MSFlow, features: Features, cfg: Config, opening: Opening, data: TrainingData, run: Run
) -> tuple[TrainState, dict]:
    """Train the flows (from the checkpoint when the run continues), checkpointing as configured, then
    calibrate the global normalisation on the training features. Returns the state and the timings."""
    start = time.perf_counter() - features.seconds
    optimizer = make_optimizer(model.trainable_parameters(), cfg.train.lr, run.device)
    state = load_training_state(run.folder, model, optimizer) if opening.resume else TrainState()
    run.dist.on_main(trim_train_log, run.folder, state.epoch)  # lines past the checkpoint are redone

    def checkpoint(state: TrainState) -> None:
        run.dist.on_main(save_training_state, run.folder, model, optimizer, cfg, state, opening.requested)
        run.dist.wait_for_main()

    def on_epoch_end(state: TrainState) -> None:
        run.dist.on_main(_log_epoch, state, model, cfg, data.test, run)
        due = state.epoch % cfg.train.checkpoint_every == 0
        if due or state.epoch == total_epochs(cfg.train, state.plateau):
            checkpoint(state)

    model.train()
    train_flows(
        model,
        features.cache,
        cfg.train,
        run.device,
        state,
        optimizer,
        on_epoch_end=on_epoch_end,
        step_hook=run.step_hook,
        progress=run.progress,
        dist=run.dist,
        holdout=features.holdout,
        on_stop=checkpoint,
    )
    model.eval()
    cache = features.cache
    batches = cache.batches(cfg.train.batch_size, run.dist.shard(len(cache)))
    on_device = ([f.to(run.device) for f in b] for b in batches)
    model.calibrate_global_normalization(on_device, gather=run.dist.gather_rows)
    return state, {
        "train_seconds": round(time.perf_counter() - start, 2),
        "feature_extraction_seconds": round(features.seconds, 2),
        **({"training_tiles": len(cache)} if cfg.model.tile else {}),
    }


def _log_epoch(state: TrainState, model: MSFlow, cfg: Config, test: list[Sample], run: Run) -> None:
    """The epoch's line in train_log.jsonl, with a test evaluation every ``eval_every`` epochs."""
    entry, every = state.history[-1], cfg.train.eval_every
    if every and state.epoch % every == 0 and state.epoch < total_epochs(cfg.train, state.plateau):
        # Logged only, never used to pick a checkpoint (B14).
        predictor = Predictor(model, cfg, None, run.device)
        results = predictor.iter_maps(test, batch_size=cfg.train.batch_size, progress=False)
        entry["test"] = evaluate_stream(test, results, pixel_range=predictor.pixel_range)
        model.train()
    with (run.folder / "train_log.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
    if "plateau_at" in entry:
        run.log(
            f"held-out NLL plateau after epoch {state.epoch}: the learning rate decays from here, "
            f"training ends after epoch {entry['schedule_epochs']}"
        )


def choose(predictor: Predictor, data: TrainingData, run: Run) -> tuple[Predictor, float | None]:
    """The label-free choices where the settings say "auto" (the maps, then under them the image score:
    :mod:`msflow.train.choice`), made by rank 0 on the synthetic check; every rank gets them. Returns
    a predictor of the trained model under the decided settings, and the score's synthetic AUROC."""
    if len(data.calibration) < 2:  # "auto" with fewer kept its incumbents in resolve_settings
        return predictor, None

    def decide() -> dict:
        cfg = predictor.config
        settings, auroc = choose_settings(
            predictor, data.fit, data.holdout, run.folder, cfg.train.batch_size, log=run.log
        )
        save_yaml(replace(cfg, model=cfg.model.with_maps(settings)), run.folder / "config.yaml")
        return {"settings": settings, "synthetic_auroc": auroc}

    decided = run.dist.from_main(decide)
    # A new predictor: nothing edited in place
    return predictor.with_settings(decided["settings"]), decided["synthetic_auroc"]


def calibrate(
    predictor: Predictor, data: TrainingData, validation: str | None, run: Run
) -> tuple[Threshold, dict[str, Any]]:
    """The threshold from the held-out good images (or a labelled folder), and how it does on them.

    Data-parallel, each rank predicts its shard of the good images and rank 0 merges the calibrations
    (quantiles do not depend on the order of the scores, the pixel counts add exactly), then alone
    reads the labelled folder; every rank gets the threshold.
    """
    mine = run.dist.shard(len(data.calibration))
    images, batch_size = data.calibration[mine.start : mine.stop], predictor.config.train.batch_size
    calib = good_image_calibration(predictor, images, batch_size, run.progress)
    merged = run.dist.merge_to_main(calib)  # rank 0's, with every rank's images

    def decide() -> dict:
        scores, where = merged[0].scores, "holdout" if data.holdout else "train"
        threshold = merged[0].threshold(where)
        if validation:
            threshold = calibrate_on_folder(predictor, validation, batch_size, threshold, run.progress)
        flagged = sum(threshold.is_defective(s) for s in scores)
        count = "holdout_images" if data.holdout else "calibration_training_images"
        info = {count: len(scores), f"{where}_false_positive_rate": round(100.0 * flagged / len(scores), 4)}
        return {"threshold": threshold.to_dict(), "info": info}

    decided = run.dist.from_main(decide)  # the other ranks wait for rank 0's threshold
    return Threshold.from_dict(decided["threshold"]), decided["info"]


def good_image_calibration(
    predictor: Predictor, images: list[Sample], batch_size: int, progress: bool = False
) -> GoodImageCalibration:
    """The scores and pixel-map values of good images, of which the thresholds are quantiles."""
    calib = GoodImageCalibration(predictor.pixel_range)
    for maps in predictor.iter_maps(images, batch_size=batch_size, progress=progress, desc="calibrate"):
        calib.add(maps.score, maps.anomaly_map)
    return calib


def run_holdout(cfg: Config, data: str | None = None) -> tuple[list[Sample], list[Sample]]:
    """(fit, held-out) good images of a finished run's dataset (``data`` when it has moved): the split
    its training made."""
    _, train, _ = load_dataset(data or cfg.data.dataset)
    return split_holdout(train, cfg.data.holdout_fraction, cfg.train.seed)


def recalibrate_threshold(
    predictor: Predictor, data: str | None = None, batch_size: int = 8, log: Callable[[str], None] = print
) -> Predictor:
    """The predictor with thresholds for its own maps and score, from the run's held-out good images.

    A threshold is a quantile of the scores it was calibrated on, so a run re-scored with another score
    or other maps (``msflow test --score ...``) would otherwise judge new scores against an old scale:
    the decision rates would mean nothing. Same images and rule as :func:`calibrate`; no test image.
    """
    fit_samples, holdout = run_holdout(predictor.config, data)
    threshold = good_image_calibration(predictor, holdout or fit_samples, batch_size).threshold(
        "holdout" if holdout else "train"
    )
    log(
        f"threshold re-calibrated for score {predictor.config.model.score} on {threshold.num_images} "
        f"{'held-out' if holdout else 'training'} good images: {threshold.image:.6g}"
    )
    return predictor.with_threshold(threshold)


def save(predictor: Predictor, data: TrainingData, state: TrainState, record: dict, run: Run) -> None:
    """The model with its threshold and training record (rank 0), before the test evaluation: from
    here on, nothing trained can be lost. ``record``: timings, synthetic AUROC, calibration figures."""
    cfg = predictor.config
    training = {
        "epochs": state.epoch,
        "stop": cfg.train.stop,
        "synthetic_auroc": record.pop("synthetic_auroc"),
        **({"plateau": asdict(state.plateau)} if cfg.train.stop == "plateau" else {}),
        "train_images": len(data.fit),
        **record,
    }
    predictor.meta = {"training": training}

    def write() -> None:
        meta = {"threshold": predictor.threshold.to_dict(), "dataset": data.name, "training": training}
        save_model(predictor.model, cfg, run.folder / "model", **meta)
        report.plot_loss_curve(run.folder / "loss_curve.png", state.history)

    run.dist.on_main(write)


def evaluate(predictor: Predictor, run: Run, data: TrainingData | None = None) -> dict:
    """The last step: the test-set report in the run folder. A run just trained (``data``) is evaluated
    by every rank on its shard, rank 0 writing; a saved run (rank 0 alone) on its config's test set."""
    cfg = predictor.config
    name, test = (data.name, data.test) if data is not None else load_test_set(cfg.data)
    return evaluate_run(
        predictor,
        test,
        run.folder,
        str(name),
        resolution=cfg.train.eval_resolution,
        batch_size=cfg.train.batch_size,
        progress=run.progress,
        run_dir=run.folder,
        sharding=run.dist.sharding if data is not None else None,  # a saved run: rank 0 alone
    )


def calibrate_on_folder(
    predictor: Predictor, folder: str, batch_size: int, fallback: Threshold, progress: bool = True
) -> Threshold:
    """F1-optimal thresholds on a labelled folder in MVTec layout (its test/ part)."""
    _, _, samples = load_dataset(folder)
    validate_samples(samples, f"validation set '{folder}'")
    calib = LabelledCalibration(predictor.pixel_range)
    results = predictor.iter_maps(samples, batch_size=batch_size, progress=progress, desc="validation")
    annotated = any(s.mask is not None for s in samples)  # then an image without a mask has no defect pixel
    for sample, maps in zip(samples, results, strict=True):
        mask = read_mask(sample.mask) if sample.mask is not None else None
        if mask is None and annotated:
            mask = np.zeros(maps.anomaly_map.shape, bool)
        calib.add(maps.score, sample.label, mask, maps.anomaly_map)
    return calib.threshold(fallback.pixel)
