"""The ``msflow`` command line: thin argparse front-ends over the library; no logic of its own.

Every user-fixable problem ends as one line on stderr (``error: ...``) and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import Field
from pathlib import Path
from typing import Any, get_args, get_type_hints

from msflow.config import (
    PRO_MODES,
    SECTIONS,
    BackboneName,
    Config,
    ModelConfig,
    RuntimeName,
    TrainConfig,
    add_option_argument,
    load_yaml,
    option_fields,
)
from msflow.errors import MSFlowError


def _config_flags() -> Iterator[tuple[str, Field, Any]]:
    """(section, field, type) of every config option offered as a flag (declared in ``msflow.config``)."""
    for section, klass in SECTIONS.items():
        for f, hint in option_fields(klass):
            yield section, f, hint


def _train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file; flags override it")
    for section, f, hint in _config_flags():
        add_option_argument(p, f, hint, dest=f"{section}.{f.name}")


def config_from_args(args: argparse.Namespace, dataset: str | None = None) -> Config:
    """The YAML file (if any), then every flag that was given, then ``dataset``; validated once."""
    cfg = load_yaml(args.config) if getattr(args, "config", None) else Config()
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for section, f, _ in _config_flags():
        sections[section][f.name] = getattr(args, f"{section}.{f.name}", None)
    sections["data"]["dataset"] = dataset
    return cfg.updated(**sections)


def cmd_summary(args: argparse.Namespace) -> None:
    from msflow.config import ModelConfig
    from msflow.model.msflow import MSFlow

    config = ModelConfig(backbone=args.backbone, image_size=args.image_size, pretrained=False)
    model = MSFlow(config)
    height, width = config.size
    info = {
        "backbone": args.backbone,
        "image_size": config.image_size,
        "feature_shapes": [list(s) for s in model.feature_shapes],
        "num_blocks": list(model.config.num_blocks),
        "trainable_parameters": model.parameter_counts(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"MSFlow with {args.backbone} at {height}x{width}")
    for level, ((c, h, w), n) in enumerate(zip(model.feature_shapes, model.config.num_blocks, strict=True)):
        print(f"  scale {level + 1}: features {c} x {h} x {w}, {n} coupling blocks")
    for part, count in info["trainable_parameters"].items():
        print(f"  {part:<16} {count:>13,d} trainable parameters")


def cmd_train(args: argparse.Namespace) -> None:
    from msflow.evaluate.report import format_metrics
    from msflow.train.distributed import Distributed
    from msflow.train.fit import fit

    cfg = config_from_args(args, args.data)
    metrics = fit(cfg, args.output, resume=args.resume, validation=args.validation, progress=not args.quiet)
    if not Distributed.from_environment().is_main:  # torchrun: rank 0 reports
        return
    print(format_metrics(metrics))
    print(f"run folder: {args.output} (overlays in {Path(args.output) / 'overlays'})")


def cmd_demo(args: argparse.Namespace) -> None:
    from msflow.evaluate.report import format_metrics
    from msflow.train.fit import fit

    cfg = Config().updated(
        model={"backbone": "efficientnet_lite0", "image_size": args.image_size},
        data={"dataset": "elpv:mono"},
        train={"epochs": args.epochs, "device": "cpu"},
    )
    print(
        f"demo: efficientnet_lite0 on the built-in ELPV solar cells (mono), {args.image_size} px, "
        f"{args.epochs} epochs, on the CPU"
    )
    metrics = fit(cfg, args.output, progress=not args.quiet)
    print(format_metrics(metrics))
    print(f"overlays: {Path(args.output) / 'overlays'}   model: {args.output}")


def cmd_test(args: argparse.Namespace) -> None:
    from msflow.data.datasets import load_dataset, validate_samples
    from msflow.evaluate.report import format_metrics
    from msflow.infer.evaluate_run import evaluate_run
    from msflow.infer.predictor import Predictor

    predictor = Predictor.load(args.model, args.device)
    cfg, run = predictor.config, Path(args.model)
    name, _, test = load_dataset(args.data or cfg.data.dataset)
    if test:
        validate_samples(test, f"test set of '{name}'")
    # A run whose evaluation never finished (no metrics.json) is finished in place; otherwise the
    # report goes next to it, so the training-time report (and its choices' evidence) is never overwritten.
    unfinished = run.is_dir() and not (run / "metrics.json").is_file() and not (args.data or args.choose)
    folder = f"choose-{name}" if args.choose else f"test-{name}"
    out = Path(args.output) if args.output else run if unfinished else run / folder
    settings = cfg.model.maps
    if args.choose:  # today's label-free choices, re-made on the run's held-out images (no test label)
        from msflow.train.choice import remake_choices

        settings = remake_choices(predictor, out, batch_size=args.batch_size)
    # Both references are calibrated at training time and every score reads the same latents, so any
    # setting re-scores the run: a predictor with the new settings, the run itself left as it is.
    settings = settings.with_changes(
        normalization=args.normalization, smoothing=args.smoothing, score=args.score
    )
    if args.score and settings.score == "auto":
        raise MSFlowError("--score auto is decided at training time; name a score, or use --choose")
    if settings != cfg.model.maps:
        predictor = predictor.with_settings(settings)
    metrics = evaluate_run(
        predictor,
        test,
        out,
        name,
        pro_mode=args.pro_mode,
        resolution=args.eval_resolution or cfg.train.eval_resolution,
        batch_size=args.batch_size,
        progress=not args.quiet,
        run_dir=run if run.is_dir() else None,
    )
    print(format_metrics(metrics))
    if args.all_scores:  # report only: every candidate score's test AUROC under these maps
        from msflow.train.score_selection import candidate_report

        scores = candidate_report(predictor, test, args.batch_size)
        (out / "score_report.json").write_text(json.dumps(scores, indent=2), encoding="utf-8")
        for name, (point, low, high) in scores["difference_to_used_95"].items():
            auroc = scores["image_auroc"][name]
            print(f"  {name:<14} test image AUROC {auroc:6.2f}  {point:+.2f} [{low:+.2f}, {high:+.2f}]")
    print(f"report: {out}")


def cmd_predict(args: argparse.Namespace) -> int:
    from msflow.infer.predict import run_predict, run_predict_on_ray
    from msflow.infer.predictor import Predictor

    if _ray_executor(args):
        summary = run_predict_on_ray(
            args.model,
            args.input,
            args.output,
            args.batch_size,
            progress=not args.quiet,
            device=args.device,
            runtime=args.runtime,
            threshold=args.threshold,
            address=args.address,
            cpus_per_task=args.cpus_per_task or 1,
            gpus_per_task=args.gpus_per_task or 0.0,
        )
    else:
        predictor = Predictor.load(args.model, args.device, args.runtime, args.batch_size)
        if args.threshold is not None:
            predictor.threshold = predictor.threshold.with_image_threshold(args.threshold)
        summary = run_predict(
            predictor, args.input, args.output, args.batch_size, progress=not args.quiet, resume=args.resume
        )
    skipped = f", {summary['skipped']} already done" if summary.get("skipped") else ""
    print(
        f"{summary['predicted']} images judged: {summary['defective']} defective, "
        f"{summary['predicted'] - summary['defective']} good; {summary['failed']} failed{skipped}; "
        f"{summary['images_per_second']} img/s. Results in {args.output}"
    )
    for failure in summary["failures"]:
        print(f"failed: {failure['error']}", file=sys.stderr)
    return 1 if summary["failed"] else 0


def cmd_export(args: argparse.Namespace) -> None:
    from msflow.infer.export import export_onnx
    from msflow.model.checkpoint import load_model

    exporters = {"onnx": export_onnx}  # --format picks one; ONNX is the only format so far
    model, cfg, meta = load_model(args.model)
    out = Path(args.output) if args.output else Path(args.model) / f"model.{args.format}"
    if out.suffix != f".{args.format}":
        raise MSFlowError(f"--output '{out}' must end in '.{args.format}' for --format {args.format}")
    # The checkpoint's digest lets `--runtime onnx` refuse an export of another (older) model.
    exporters[args.format](model, out, metadata={"checkpoint_sha256": meta["sha256"]})
    print(f"exported {out}")


def cmd_serve(args: argparse.Namespace) -> None:
    from msflow.infer.serve import serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        runtime=args.runtime,
        max_upload_mb=args.max_upload_mb,
        device=args.device,
    )


def cmd_benchmark(args: argparse.Namespace) -> None:
    from msflow.train.benchmark import run_benchmark

    _ray_executor(args)
    run_benchmark(
        args.data,
        args.output,
        config_from_args(args),
        args.categories,
        progress=not args.quiet,
        executor=args.executor,
        address=args.address,
        cpus_per_task=args.cpus_per_task or 1,
        gpus_per_task=args.gpus_per_task or 0.0,
    )


def _ray_flags(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--executor",
        default="local",
        choices=["local", "ray"],
        help=f"local: in this process; ray: {what} as Ray tasks (pip install 'msflow[cluster]')",
    )
    p.add_argument("--address", help="Ray cluster to join (default: start a local Ray instance)")
    p.add_argument("--cpus-per-task", type=int, help="CPUs each Ray task reserves (default 1)")
    p.add_argument("--gpus-per-task", type=float, help="GPUs each Ray task reserves (default 0)")


def _ray_executor(args: argparse.Namespace) -> bool:
    """True for ``--executor ray``; the Ray-only flags without it are an error, not silently ignored."""
    if args.executor == "local" and (args.address or args.cpus_per_task or args.gpus_per_task):
        raise MSFlowError("--address, --cpus-per-task and --gpus-per-task need --executor ray")
    return args.executor == "ray"


# The speed harness lives in the source checkout's benchmarks/ folder, not in the installed package.
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def cmd_bench(args: argparse.Namespace) -> int:
    if not (BENCHMARKS / "speed.py").is_file():
        raise MSFlowError(
            f"'msflow bench' runs benchmarks/speed.py of a source checkout, and there is none at "
            f"'{BENCHMARKS}' (the harness is not installed with the package): run it in a git clone of msflow"
        )
    if str(BENCHMARKS.parent) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS.parent))
    from benchmarks.speed import main as bench_main

    return bench_main(args.bench_args)


def _inference_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by the commands that run a trained model over many images."""
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")


def _runtime_flag(p: argparse.ArgumentParser, batch: str) -> None:
    p.add_argument(
        "--runtime",
        default="auto",
        choices=get_args(RuntimeName),
        help=f"auto (default): time each runtime this machine offers at {batch} on a synthetic batch, "
        "check it against float32 torch, use the fastest (decision cached in the run folder)",
    )


def _test_flags(p: argparse.ArgumentParser) -> None:
    """``msflow test``: the run, the data, and the settings it may be re-scored with (no retraining)."""
    p.add_argument("--model", required=True)
    p.add_argument("--data", help="category folder (default: the run's own dataset)")
    p.add_argument("--output")
    p.add_argument("--pro-mode", default="standard", choices=PRO_MODES)
    normalizations = [n for n in get_args(get_type_hints(ModelConfig)["normalization"]) if n != "auto"]
    p.add_argument("--normalization", choices=normalizations, help="override the run normalisation")
    p.add_argument(
        "--smoothing", type=float, metavar="SIGMA", help="override the run's map smoothing (0 = off)"
    )
    resolutions = get_args(get_type_hints(TrainConfig)["eval_resolution"])
    p.add_argument("--eval-resolution", choices=resolutions, help="default: the run's (original size)")
    p.add_argument("--score", help="override the run's image score (e.g. official, logp:0.01, logp:max@4)")
    p.add_argument(
        "--choose",
        action="store_true",
        help="re-make the run's label-free choices (maps, score) with today's candidates and rule on its "
        "held-out good images (no retraining, no test label), record them with the test report in "
        "RUN/choose-DATASET, and test with them (--score/--normalization/--smoothing still override)",
    )
    p.add_argument(
        "--all-scores",
        action="store_true",
        help="also write score_report.json: every candidate image score's test AUROC under the run's maps "
        "(one pass; report only, never used to choose) and its difference to the run's score",
    )
    _inference_flags(p)
    p.set_defaults(func=cmd_test)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msflow", description="MSFlow anomaly detection: train, test, predict, serve"
    )
    parser.add_argument("--version", action="version", version=f"msflow {__import__('msflow').__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("summary", help="feature shapes and parameter counts of a model")
    p.add_argument("--backbone", default="wide_resnet50_2", choices=get_args(BackboneName))
    p.add_argument("--image-size", default="512", help="N or HxW (e.g. 208x512)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("train", help="train on a category folder (MVTec/VisA layout) or elpv:mono|poly")
    p.add_argument("--data", required=True, help="category folder, or elpv:mono / elpv:poly")
    p.add_argument("--output", required=True, help="run folder")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --output from its last checkpoint"
    )
    p.add_argument("--validation", help="labelled folder (MVTec layout) for F1-optimal thresholds")
    p.add_argument("--quiet", action="store_true")
    _train_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="train the offline default on built-in data (~minutes on a CPU)")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    _test_flags(sub.add_parser("test", help="evaluate a trained run on a test set"))

    p = sub.add_parser("predict", help="judge new images: scores, maps, masks, overlays")
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True, nargs="+", help="image files and/or folders (recursive)")
    p.add_argument("--output", required=True)
    p.add_argument("--threshold", type=float, help="raw image-score threshold (overrides the calibrated one)")
    _runtime_flag(p, "--batch-size")
    p.add_argument("--resume", action="store_true", help="skip images already in --output/predictions.csv")
    _inference_flags(p)
    _ray_flags(p, "chunks of files")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a run to ONNX (backbone, flows and maps in one graph)")
    p.add_argument("--model", required=True)
    p.add_argument("--format", default="onnx", choices=["onnx"], help="file format (ONNX is the only one)")
    p.add_argument("--output", help="default: <run>/model.<format>")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="HTTP service with a web page")
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require this key (header X-API-Key); default: $MSFLOW_API_KEY if set")
    _runtime_flag(p, "batch 1 (one image per request)")
    p.add_argument("--max-upload-mb", type=float, default=20.0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("benchmark", help="train and test many categories; a table with a mean row")
    p.add_argument("--data", required=True, help="root holding category folders, or one category")
    p.add_argument("--output", required=True)
    p.add_argument("--categories", nargs="+", help="subset of categories (default: all found)")
    _ray_flags(p, "each category")
    p.add_argument("--quiet", action="store_true")
    _train_flags(p)
    p.set_defaults(func=cmd_benchmark)

    # Its flags belong to benchmarks/speed.py (see 'msflow bench --help'); they are passed through.
    p = sub.add_parser(
        "bench", help="speed against the official-style reference path (source checkout)", add_help=False
    )
    p.set_defaults(func=cmd_bench)
    return parser


def _log_to_stderr() -> None:
    """msflow's own log lines (e.g. which runtime ``auto`` picked) as plain lines on stderr."""
    import logging

    class ToStderr(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            print(self.format(record), file=sys.stderr)  # whatever sys.stderr is now

    logger = logging.getLogger("msflow")
    if not any(type(h).__name__ == "ToStderr" for h in logger.handlers):
        logger.addHandler(ToStderr())
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    _log_to_stderr()
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.func(args) or 0)
    except MSFlowError as err:
        print(f"error: {err}", file=sys.stderr)
        if "TORCHELASTIC_ERROR_FILE" in os.environ:  # a torchrun rank: its summary shows this line too
            from msflow.train.distributed import report_to_launcher

            report_to_launcher(f"error: {err}")
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
