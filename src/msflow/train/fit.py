"""``fit``: from a config to a finished run folder (the job behind ``msflow train`` and ``Detector.fit``).

Run folder::

    config.yaml              the resolved configuration (an "auto" image size, score or maps as decided)
    map_selection.json       the synthetic check of the maps: every normalisation and smoothing setting's
                             pixel AUROC on synthetic defects' exact masks, and the one chosen
    score_selection.json     the synthetic check: every candidate score's AUROC on held-out good images
                             vs synthetic defects, the best one (chosen with ``score: auto``) and the
                             one used (no test label is read)
    model.safetensors/.json  the final model, its config, threshold, training figures (no pickle); written
                             before the test evaluation, which then adds its metrics to model.json
    checkpoint/last.*        training state after the last completed epoch (for --resume)
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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from msflow.config import Config, replace, save_yaml
from msflow.data.datasets import Sample, load_data, load_dataset, validate_samples
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
from msflow.model.checkpoint import load_tensors, migrate_state_dict, save_model, save_tensors
from msflow.model.msflow import MSFlow
from msflow.train.budget import measure_epoch_cost, plan
from msflow.train.choice import choose_settings
from msflow.train.distributed import Distributed
from msflow.train.features import FeatureCache
from msflow.train.loop import StepHook, TrainState, make_optimizer, train_flows
from msflow.train.schedule import Plateau, total_epochs


def split_holdout(train: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Seeded split of the good training images into (fit, held out for threshold calibration)."""
    n_hold = int(round(fraction * len(train))) if len(train) >= 4 else 0
    if fraction > 0:
        n_hold = max(n_hold, 1 if len(train) >= 4 else 0)
    order = np.random.default_rng(seed).permutation(len(train))
    hold = sorted(order[:n_hold].tolist())
    keep = sorted(order[n_hold:].tolist())
    return [train[i] for i in keep], [train[i] for i in hold]


def _holdout_line(held: int, good: int, test: int) -> str:
    """What the hold-out is for, in one line (and what a run without a test set will not report)."""
    use = "the threshold and the label-free check of scores and maps"
    line = (
        f"held out {held} of {good} good training images (never trained on) for {use}"
        if held
        else f"no hold-out ({good} good images): the training images set {use} (biased low)"
    )
    return line if test else f"{line}; no test set, so no test metrics"


def _save_training_state(
    run_dir: Path, model: MSFlow, optimizer: torch.optim.Optimizer, cfg: Config, state: TrainState
) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    opt = optimizer.state_dict()
    for i, s in opt["state"].items():
        for key, value in s.items():
            tensors[f"optim.{i}.{key}"] = torch.as_tensor(value)
    meta = {
        "config": cfg.to_dict(),
        "param_groups": opt["param_groups"],
        "epoch": state.epoch,
        "lr_scale": state.lr_scale,
        "bad_events": state.bad_events,
        "history": state.history,
        "plateau": state.plateau.to_dict(),
    }
    if not all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point()):
        raise MSFlowError("refusing to write a checkpoint that holds NaN or inf")
    save_tensors(tensors, meta, run_dir / "checkpoint" / "last")


def _load_training_state(run_dir: Path, model: MSFlow, optimizer: torch.optim.Optimizer) -> TrainState:
    tensors, meta = load_tensors(run_dir / "checkpoint" / "last")
    model_state = migrate_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    model.load_state_dict(model_state, strict=False)
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return TrainState(
        meta["epoch"],
        meta["lr_scale"],
        meta["bad_events"],
        meta["history"],
        Plateau.from_dict(meta.get("plateau")),
    )


def _calibrate(
    predictor: Predictor,
    holdout: list[Sample],
    fit_samples: list[Sample],
    validation: str | None,
    batch_size: int,
    progress: bool,
    dist: Distributed,
) -> tuple[Threshold, dict[str, Any]] | None:
    """Thresholds from the held-out good images (or a labelled folder), and how they do on the hold-out.

    Data-parallel, each rank predicts its shard of the good images and rank 0 merges the calibrations
    (quantiles do not depend on the order of the scores, the pixel counts add exactly), then alone
    reads the labelled folder; the other ranks return ``None``.
    """
    calib_samples = holdout or fit_samples  # with no hold-out, training images stand in (biased low)
    mine = dist.shard(len(calib_samples))
    calib = GoodImageCalibration(predictor.pixel_range)
    for maps in predictor.iter_maps(
        calib_samples[mine.start : mine.stop], batch_size=batch_size, progress=progress, desc="calibrate"
    ):
        calib.add(maps.score, maps.anomaly_map)
    merged = dist.merge_to_main(calib)
    if merged is None:
        return None
    calib = merged[0]
    threshold = calib.threshold("holdout" if holdout else "train")
    if validation:
        threshold = calibrate_on_folder(predictor, validation, batch_size, threshold, progress)
    flagged = sum(threshold.is_defective(s) for s in calib.scores)
    info = {
        "holdout_images" if holdout else "calibration_training_images": len(calib.scores),
        "holdout_false_positive_rate" if holdout else "train_false_positive_rate": round(
            100.0 * flagged / len(calib.scores), 4
        ),
    }
    return threshold, info


def fit(
    cfg: Config,
    run_dir: str | Path,
    resume: bool = False,
    validation: str | None = None,
    progress: bool = True,
    step_hook: StepHook | None = None,
    log: Callable[[str], None] = logger.info,
) -> dict:
    """Train a model as ``cfg`` says, save it, then evaluate the last epoch on the test set.

    The finished model (with its threshold) is written before the test evaluation starts, so nothing
    trained is lost if the evaluation fails: ``resume=True`` on such a run only evaluates. Returns the
    test metrics (see :func:`msflow.evaluate.evaluation.evaluate_stream`). Under torchrun every rank
    calls this (data-parallel training, see :mod:`msflow.train.distributed`); rank 0 writes the run
    folder, the others wait for it, and all return its metrics.
    """
    with Distributed.from_environment() as dist:
        quiet = not dist.is_main
        metrics = _fit(
            cfg,
            Path(run_dir),
            resume,
            validation,
            progress and not quiet,
            step_hook,
            (lambda _: None) if quiet else log,
            dist,
        )
        return dist.result_from_main(metrics)  # after _fit returned: the waiting ranks hold no features


def _fit(
    cfg: Config,
    run_dir: Path,
    resume: bool,
    validation: str | None,
    progress: bool,
    step_hook: StepHook | None,
    log: Callable[[str], None],
    dist: Distributed,
) -> dict:
    began = time.perf_counter()
    last = run_dir / "checkpoint" / "last.json"
    if cfg.train.budget is not None and dist.enabled:
        raise MSFlowError("--budget times this process alone; it cannot be used with torchrun (set --epochs)")
    if resume and (run_dir / "model.json").is_file():
        if not dist.is_main:  # data-parallel: rank 0 evaluates, the others wait for it in fit()
            return {}
        log(f"'{run_dir}' holds a finished model: evaluating it (no training)")
        return _evaluate(Predictor.load(run_dir, cfg.train.device), run_dir, progress)
    if resume:
        if not last.is_file():
            raise MSFlowError(f"nothing to resume: '{last}' does not exist")
        _, meta = load_tensors(last.with_suffix(""))
        cfg = Config.from_dict(meta["config"])  # the run's own config, not today's flags
    elif last.exists() or (run_dir / "model.json").exists():
        raise MSFlowError(f"run folder '{run_dir}' already holds a run; use --resume or another --output")
    if dist.is_main:  # data-parallel: rank 0 alone writes the run folder
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
    device = dist.setup(resolve_device(cfg.train.device), cfg.train.batch_size)
    seed_everything(cfg.train.seed)

    name, train, test = load_data(cfg.data)
    log(f"dataset {name}: {len(train)} good training images, {len(test)} test images")
    validate_samples(train, f"training set of '{name}'")  # refuse bad data before any work
    if test:  # a folder of good images only may have no test set: the model is still made
        validate_samples(test, f"test set of '{name}'")
    fit_samples, holdout = split_holdout(train, cfg.data.holdout_fraction, cfg.train.seed)
    log(_holdout_line(len(holdout), len(train), len(test)))
    calib_samples = holdout or fit_samples  # with no hold-out, training images stand in (biased low)
    if len(calib_samples) < 2:  # nothing to judge scores or maps on: every "auto" keeps its incumbent
        resolved = cfg.model.with_maps(cfg.model.maps.resolved())
        if resolved != cfg.model:
            cfg = replace(cfg, model=resolved)
            if dist.is_main:
                save_yaml(cfg, run_dir / "config.yaml")
            log(f"{resolved.maps}: 'auto' needs at least 2 good images to judge the scores and maps on")
    if isinstance(cfg.model.image_size, str):  # "auto:N": the training images' aspect ratio
        # Every rank resolves the same size from the same files; rank 0 alone writes it down. Tiles are
        # square, so a tiled model's input is the square budget.
        size = cfg.model.image_size
        size = int(size.partition(":")[2]) if cfg.model.tile else resolve_image_size(size, fit_samples)
        cfg = cfg.updated(model={"image_size": size})
        if dist.is_main:
            save_yaml(cfg, run_dir / "config.yaml")
        log(f"image size {cfg.model.image_size} (auto: the training images' median aspect ratio)")

    model = MSFlow(cfg.model).to(device)
    predictor = Predictor(model, cfg, None, device)
    start = time.perf_counter()
    cache = FeatureCache.build(
        model, fit_samples, device, cfg.train.batch_size, cfg.train.cache, cfg.data.workers, progress, dist
    )
    # The plateau rule reads the held-out good images' NLL after every epoch (standardised with the
    # training statistics; never a test image).
    holdout_cache = None
    if cfg.train.stop == "plateau" and holdout:
        holdout_cache = FeatureCache.build(
            model,
            holdout,
            device,
            cfg.train.batch_size,
            cfg.train.cache,
            cfg.data.workers,
            progress,
            dist,
            fit_statistics=False,
        )
    extract_seconds = time.perf_counter() - start
    if cfg.model.tile:
        log(
            f"tiles of {cfg.model.tile} px (overlap {cfg.model.tile_overlap:g}) resized to "
            f"{cfg.model.image_size}: {len(cache)} training tiles from {len(fit_samples)} images"
        )
    if cfg.train.budget is not None and not resume:  # a resumed run keeps the epochs it chose
        checks = len(test) + 3 * len(calib_samples)  # test images, and the synthetic checks' images
        extract_rate = extract_seconds / max(len(cache), 1)
        cfg = _apply_budget(cfg, model, cache, device, began, extract_rate, checks, run_dir, log)
    optimizer = make_optimizer(model.trainable_parameters(), cfg.train.lr, device)
    state = _load_training_state(run_dir, model, optimizer) if resume else TrainState()

    def on_epoch_end(state: TrainState) -> None:
        if dist.is_main:
            _end_epoch_on_main(state)
        dist.end_of_epoch(state.epoch)  # the others wait until the checkpoint is written

    def _end_epoch_on_main(state: TrainState) -> None:
        entry = state.history[-1]
        if (
            cfg.train.eval_every
            and state.epoch % cfg.train.eval_every == 0
            and state.epoch < total_epochs(cfg.train, state.plateau)
        ):
            # Logged only, never used to pick a checkpoint (B14).
            results = predictor.iter_maps(test, batch_size=cfg.train.batch_size, progress=False)
            entry["test"] = evaluate_stream(test, results, pixel_range=predictor.pixel_range)
            model.train()
        with (run_dir / "train_log.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
        if "plateau_at" in entry:
            log(
                f"held-out NLL plateau after epoch {state.epoch}: the learning rate decays from here, "
                f"training ends after epoch {entry['schedule_epochs']}"
            )
        if state.epoch % cfg.train.checkpoint_every == 0 or state.epoch == total_epochs(
            cfg.train, state.plateau
        ):
            _save_training_state(run_dir, model, optimizer, cfg, state)

    model.train()
    train_flows(
        model,
        cache,
        cfg.train,
        device,
        state,
        optimizer,
        on_epoch_end,
        step_hook,
        progress,
        dist,
        holdout_cache,
    )
    train_seconds = time.perf_counter() - start
    model.eval()
    model.calibrate_global_normalization(
        ([f.to(device) for f in b] for b in cache.batches(cfg.train.batch_size, dist.shard(len(cache)))),
        gather=dist.gather_rows,
    )
    training_rows = len(cache)
    del cache, holdout_cache  # the features are no longer needed (a disk cache deletes its files)
    # The synthetic check, on every run (label-free evidence for the user and for choosing defaults):
    # held-out good images and synthetic defects drawn into them, with exact masks. It chooses the maps,
    # then under them the image score, where they are "auto" (msflow.train.choice). Rank 0 alone.
    synthetic_auroc = None
    if dist.is_main and len(calib_samples) >= 2:  # "auto" with fewer kept its incumbents above
        source = "holdout" if holdout else "train (no hold-out: biased)"
        images = [read_image(s.image) for s in calib_samples]
        which = "held-out" if holdout else "training"
        log(f"synthetic check: synthetic defects drawn into {len(images)} {which} good images")
        settings, synthetic_auroc = choose_settings(
            predictor, images, run_dir, cfg.train.batch_size, cfg.train.seed, source=source, log=log
        )
        cfg = replace(cfg, model=cfg.model.with_maps(settings))
        save_yaml(cfg, run_dir / "config.yaml")
    # Rank 0's choices reach every rank (a no-op in one process); the model uses them from here on.
    chosen_settings = ("score", "normalization", "smoothing")
    cfg = cfg.updated(
        model=dist.result_from_main(
            {k: getattr(cfg.model, k) for k in chosen_settings} if dist.is_main else {}
        )
    )
    # A predictor of the trained model under the decided settings (nothing edited in place).
    predictor = predictor.with_settings(cfg.model.maps)
    predictor.config, model = cfg, predictor.model
    # Every rank calibrates on its shard of the held-out images; rank 0 gets the merged calibration.
    calibrated = _calibrate(predictor, holdout, fit_samples, validation, cfg.train.batch_size, progress, dist)
    if calibrated is not None:
        threshold, calib_info = calibrated
        training = {
            "epochs": state.epoch,
            "stop": cfg.train.stop,
            "synthetic_auroc": synthetic_auroc,
            **({"plateau": state.plateau.to_dict()} if cfg.train.stop == "plateau" else {}),
            "train_seconds": round(train_seconds, 2),
            "feature_extraction_seconds": round(extract_seconds, 2),
            "train_images": len(fit_samples),
            **({"training_tiles": training_rows} if cfg.model.tile else {}),
            **calib_info,
        }
        # Saved before the test evaluation: from here on, nothing trained can be lost.
        save_model(
            model, cfg, run_dir / "model", threshold=threshold.to_dict(), dataset=name, training=training
        )
        report.plot_loss_curve(run_dir / "loss_curve.png", state.history)
        predictor.threshold, predictor.meta = threshold, {"training": training}
    # The other ranks wait for the threshold; then every rank evaluates its shard of the test set.
    if dist.enabled:
        decided = dist.result_from_main(predictor.threshold.to_dict() if predictor.threshold else {})
        predictor.threshold = Threshold.from_dict(decided)
    return _evaluate(predictor, run_dir, progress, name, test, dist)


def _apply_budget(
    cfg: Config,
    model: MSFlow,
    cache: FeatureCache,
    device: torch.device,
    began: float,
    extract_rate: float,
    check_images: int,
    run_dir: Path,
    log: Callable[[str], None],
) -> Config:
    """The config with the epochs that fit ``--budget`` (recorded in ``budget.json``; the budget itself
    is then cleared from ``config.yaml``, so that a resumed run keeps these epochs)."""
    cost = measure_epoch_cost(model, cache, cfg.train, device)
    spent = time.perf_counter() - began  # loading, extraction and this measurement
    decided = plan(cfg.train.budget, spent, cost, len(cache), check_images, extract_rate, cfg.train.epochs)
    (run_dir / "budget.json").write_text(json.dumps(decided, indent=2), encoding="utf-8")
    log(
        f"budget {cfg.train.budget:g} min: {decided['epoch_seconds']:.1f} s per epoch here, "
        f"{decided['spent_seconds'] / 60:.1f} min spent, ~{decided['evaluation_seconds_estimate'] / 60:.1f} "
        f"min for the checks and the test -> {decided['epochs']} epochs "
        f"(expected {decided['expected_total_minutes']:.1f} min"
        + ("" if decided["fits"] else "; even one epoch exceeds the budget")
        + ")"
    )
    log("expected accuracy against 100 epochs, from measured runs (msflow.train.budget):")
    for line in decided["expected_cost"]:
        log(f"  {line}")
    cfg = replace(cfg, train=replace(cfg.train, epochs=decided["epochs"], budget=None))
    save_yaml(cfg, run_dir / "config.yaml")
    return cfg


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
        name, _, test = load_data(cfg.data)
        if test:
            validate_samples(test, f"test set of '{name}'")
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
    predictor: Predictor,
    folder: str,
    batch_size: int,
    fallback: Threshold,
    progress: bool = True,
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
