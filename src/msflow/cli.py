"""The ``msflow`` command line: thin argparse front-ends over the library; no logic of its own.

Every user-fixable problem ends as one line on stderr (``error: ...``) and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import Field, replace
from functools import cache
from pathlib import Path
from typing import Any, get_args

from msflow.config import (
    PRO_MODES,
    SECTIONS,
    Config,
    RuntimeName,
    add_option_argument,
    load_yaml,
    option_fields,
)
from msflow.errors import MSFlowError
from msflow.logs import LEVELS, configure, log


@cache
def _config_options() -> dict[str, tuple[Field, Any]]:
    """``section.name`` -> (field, type) of every config option offered as a flag (``msflow.config``)."""
    return {f"{s}.{f.name}": (f, hint) for s, klass in SECTIONS.items() for f, hint in option_fields(klass)}


def _train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file; flags override it")
    for key in _config_options():
        _config_option(p, key)


def _config_option(p: argparse.ArgumentParser, key: str, **kwargs: Any) -> None:
    """The config option ``key`` ("section.name") as a flag with dest ``key``, from its one declaration in
    ``msflow.config``; ``kwargs`` (``default``, ``help``, ``shown``) adapt it to a command, e.g. ``demo``."""
    add_option_argument(p, *_config_options()[key], dest=key, **kwargs)


def config_from_args(args: argparse.Namespace, dataset: str | None = None) -> Config:
    """The YAML file (if any), then every flag that was given, then ``dataset``; validated once."""
    cfg = load_yaml(args.config) if getattr(args, "config", None) else Config()
    sections: dict[str, dict[str, Any]] = {"data": {"dataset": dataset}}
    for key in _config_options():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = getattr(args, key, None)
    return cfg.updated(**sections)


def _result(args: argparse.Namespace, text: str, summary: dict[str, Any]) -> None:
    """A command's result: ``text`` for people on stdout, or with ``--json`` one JSON line instead."""
    if getattr(args, "json", False):
        print(json.dumps({"command": args.command, **summary}, default=str, allow_nan=False))
    else:
        print(text)


def _run_decisions(run: Path) -> dict[str, Any]:
    """What training decided (size, score, maps, threshold), read from the run folder's model.json."""
    try:
        meta = json.loads((run / "model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    model = meta.get("config", {}).get("model", {})
    keys = ("image_size", "score", "normalization", "smoothing")
    return {**{k: model.get(k) for k in keys}, "threshold": meta.get("threshold")}


def cmd_summary(args: argparse.Namespace) -> None:
    from msflow.model.msflow import MSFlow

    config = config_from_args(args).model
    if isinstance(config.image_size, str):  # "auto:N" depends on the images; square ones give N x N
        config = replace(config, image_size=int(config.image_size.partition(":")[2]))
    model = MSFlow(replace(config, pretrained=False, weights=None))
    height, width = config.size
    info = {
        "backbone": config.backbone,
        "image_size": config.image_size,
        "feature_shapes": [list(s) for s in model.feature_shapes],
        "num_blocks": list(model.config.num_blocks),
        "trainable_parameters": model.parameter_counts(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"MSFlow with {config.backbone} at {height}x{width}")
    for level, ((c, h, w), n) in enumerate(zip(model.feature_shapes, model.config.num_blocks, strict=True)):
        print(f"  scale {level + 1}: features {c} x {h} x {w}, {n} coupling blocks")
    for part, count in info["trainable_parameters"].items():
        print(f"  {part:<16} {count:>13,d} trainable parameters")


def cmd_train(args: argparse.Namespace) -> None:
    from msflow.evaluate.report import format_metrics
    from msflow.train.distributed import Distributed
    from msflow.train.fit import fit

    cfg = config_from_args(args, args.data)
    if args.data and cfg.data.normal_dir:
        raise MSFlowError("give --data or --normal-dir, not both")
    if not (args.data or cfg.data.normal_dir or args.config or args.resume):
        raise MSFlowError("--data (a folder, or elpv:mono / elpv:poly) or --normal-dir is required")
    metrics = fit(cfg, args.output, resume=args.resume, validation=args.validation)
    if not Distributed.from_environment().is_main:  # torchrun: rank 0 reports
        return
    run = Path(args.output)
    text = f"{format_metrics(metrics)}\nrun folder: {run} (overlays in {run / 'overlays'})"
    _result(args, text, {"run_dir": str(run), "metrics": metrics, "decisions": _run_decisions(run)})


def cmd_demo(args: argparse.Namespace) -> None:
    from msflow.evaluate.report import format_metrics
    from msflow.train.fit import fit

    cfg = config_from_args(args, "elpv:mono").updated(train={"device": "cpu"})
    log.info(
        f"demo: {cfg.model.backbone} on the built-in ELPV solar cells (mono), {cfg.model.image_size} px, "
        f"{cfg.train.epochs} epochs, on the CPU"
    )
    metrics = fit(cfg, args.output)
    print(format_metrics(metrics))
    print(f"overlays: {Path(args.output) / 'overlays'}   model: {args.output}")


def _test_settings(predictor: Any, args: argparse.Namespace, out: Path, batch_size: int) -> Any:
    """``msflow test``'s maps and score: the run's, re-made (``--choose``) and/or overridden by flags."""
    run_settings = predictor.config.model.maps
    settings = run_settings
    if args.choose:  # today's label-free choices, re-made on the run's held-out images (no test label)
        from msflow.train.choice import remake_choices

        settings = remake_choices(predictor, out, batch_size=batch_size)
    # Both references are calibrated at training time and every score reads the same latents, so any
    # setting re-scores the run: a predictor with the new settings, the run itself left as it is.
    given = {name: getattr(args, f"model.{name}") for name in ("normalization", "smoothing", "score")}
    settings = settings.with_changes(**given)
    if given["score"] and settings.score == "auto":
        raise MSFlowError("--score auto is decided at training time; name a score, or use --choose")
    if settings == run_settings:
        return predictor
    from msflow.train.fit import recalibrate_threshold

    rescored = predictor.with_settings(settings)
    try:  # a threshold is a quantile of one score's values: another score needs its own
        return recalibrate_threshold(rescored, batch_size=batch_size, log=log.info)
    except MSFlowError as error:  # e.g. the training images have moved
        log.warning(f"{error}; the decisions use the run's threshold, calibrated for {run_settings.score}")
        return rescored


def _print_all_scores(predictor: Any, test: list, out: Path, batch_size: int) -> None:
    """``--all-scores`` (report only): every candidate score's test AUROC under these maps."""
    from msflow.train.score_selection import candidate_report

    scores = candidate_report(predictor, test, batch_size)
    (out / "score_report.json").write_text(json.dumps(scores, indent=2), encoding="utf-8")
    for name, (point, low, high) in scores["difference_to_used_95"].items():
        auroc = scores["image_auroc"][name]
        print(f"  {name:<14} test image AUROC {auroc:6.2f}  {point:+.2f} [{low:+.2f}, {high:+.2f}]")


def cmd_test(args: argparse.Namespace) -> None:
    from msflow.data.datasets import load_test_set
    from msflow.evaluate.report import format_metrics
    from msflow.infer.evaluate_run import evaluate_run
    from msflow.infer.predictor import Predictor

    predictor = Predictor.load(args.model, getattr(args, "train.device"))
    cfg, run = predictor.config, Path(args.model)
    name, test = load_test_set(args.data or cfg.data)
    # A run whose evaluation never finished (no metrics.json) is finished in place; otherwise the
    # report goes next to it, so the training-time report (and its choices' evidence) is never overwritten.
    unfinished = run.is_dir() and not (run / "metrics.json").is_file() and not (args.data or args.choose)
    folder = f"choose-{name}" if args.choose else f"test-{name}"
    out = Path(args.output) if args.output else run if unfinished else run / folder
    batch_size = getattr(args, "train.batch_size")
    predictor = _test_settings(predictor, args, out, batch_size)
    metrics = evaluate_run(
        predictor,
        test,
        out,
        name,
        pro_mode=args.pro_mode,
        resolution=getattr(args, "train.eval_resolution") or cfg.train.eval_resolution,
        batch_size=batch_size,
        run_dir=run if run.is_dir() else None,
    )
    if args.json:
        _result(args, "", {"report_dir": str(out), "metrics": metrics})
        return
    print(format_metrics(metrics))
    if args.all_scores:
        _print_all_scores(predictor, test, out, batch_size)
    print(f"report: {out}")


def cmd_predict(args: argparse.Namespace) -> int:
    from msflow.infer.predict import run_predict, run_predict_on_ray
    from msflow.infer.predictor import Predictor

    device, batch_size = getattr(args, "train.device"), getattr(args, "train.batch_size")
    if ray := _ray_options(args):
        options = {"images": args.images, "runtime": args.runtime, "threshold": args.threshold, **ray}
        summary = run_predict_on_ray(
            args.model, args.input, args.output, batch_size, device=device, **options
        )
    else:
        predictor = Predictor.load(args.model, device, args.runtime, batch_size, args.threshold)
        summary = run_predict(
            predictor, args.input, args.output, batch_size, images=args.images, resume=args.resume
        )
    for failure in summary["failures"]:
        log.error(f"failed: {failure['error']}")
    skipped = f", {summary['skipped']} already done" if summary.get("skipped") else ""
    text = (
        f"{summary['predicted']} images judged: {summary['defective']} defective, "
        f"{summary['predicted'] - summary['defective']} good; {summary['failed']} failed{skipped}; "
        f"{summary['images_per_second']} img/s. Results in {args.output}"
    )
    _result(args, text, {"output_dir": str(args.output), **summary})
    return 1 if summary["failed"] else 0


def cmd_export(args: argparse.Namespace) -> None:
    from msflow.evaluate.threshold import Threshold
    from msflow.infer.export import export_onnx
    from msflow.model.checkpoint import load_model

    model, cfg, meta = load_model(args.model)
    out = Path(args.output) if args.output else Path(args.model) / f"model.{args.format}"
    if out.suffix != f".{args.format}":
        raise MSFlowError(f"--output '{out}' must end in '.{args.format}' for --format {args.format}")
    # The checkpoint's digest lets `--runtime onnx` refuse an export of another (older) model.
    # The run's decision goes with the file, so that it can be deployed without msflow.
    threshold = Threshold.from_dict(meta["threshold"]) if meta.get("threshold") else None
    export_onnx(model, out, metadata={"checkpoint_sha256": meta["sha256"]}, threshold=threshold)
    decided = f" with its threshold {threshold.image:.6g} (normalized_score: 0.5)" if threshold else ""
    print(f"exported {out}{decided}")


def cmd_serve(args: argparse.Namespace) -> None:
    if args.api_key is not None:  # refused: every user of the machine can read it in the process list
        raise MSFlowError(
            "--api-key is no longer read from the command line, where every user of the machine can see it: "
            "set $MSFLOW_API_KEY or use --api-key-file FILE"
        )
    from msflow.infer.serve import serve

    serve(
        args.model,
        host=args.host,
        port=args.port,
        runtime=args.runtime,
        max_upload_mb=args.max_upload_mb,
        device=getattr(args, "train.device"),
        api_key_file=args.api_key_file,
        max_concurrent=args.max_concurrent or None,
        rate=args.rate_limit or None,
        burst=args.burst,
    )


def cmd_benchmark(args: argparse.Namespace) -> None:
    from msflow.train.benchmark import run_benchmark

    ray = _ray_options(args)
    if getattr(args, "data.normal_dir"):
        raise MSFlowError("msflow benchmark reads category folders from --data; --normal-dir is for train")
    run_benchmark(
        args.data, args.output, config_from_args(args), args.categories, executor=args.executor, **ray
    )


# The speed harness lives in the source checkout's benchmarks/ folder, not in the installed package.
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def cmd_speed(args: argparse.Namespace) -> int:
    if args.command == "bench":
        log.warning("'msflow bench' is now 'msflow speed' (the old name goes in a later release)")
    if not (BENCHMARKS / "speed" / "__init__.py").is_file():
        raise MSFlowError(
            f"'msflow speed' runs benchmarks/speed/ of a source checkout, and there is none at "
            f"'{BENCHMARKS}' (the harness is not installed with the package): run it in a git clone of msflow"
        )
    if str(BENCHMARKS.parent) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS.parent))
    from benchmarks.speed import main as speed_main

    return speed_main(args.speed_args)


# ----------------------------------------------------------------------------- the parser
# One function per command declares its flags; the flags of several commands are declared once below.


def _json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="the result as one JSON line on stdout, for scripts")


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


def _ray_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Ray flags as keyword arguments for ``--executor ray``, else none (``{}``): there the Ray-only
    flags are an error, not silently ignored."""
    if args.executor == "local":
        if args.address or args.cpus_per_task or args.gpus_per_task:
            raise MSFlowError("--address, --cpus-per-task and --gpus-per-task need --executor ray")
        return {}
    return {
        "address": args.address,
        "cpus_per_task": args.cpus_per_task or 1,
        "gpus_per_task": args.gpus_per_task or 0.0,
    }


def _inference_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by the commands that run a trained model over many images."""
    _config_option(p, "train.batch_size", default=8, help="images per inference batch")
    _config_option(p, "train.device", default="auto", help="where the model runs")


def _runtime_flag(p: argparse.ArgumentParser, batch: str) -> None:
    p.add_argument(
        "--runtime",
        default="auto",
        choices=get_args(RuntimeName),
        help=f"auto (default): time each runtime this machine offers at {batch} on a synthetic batch, "
        "check it against float32 torch, use the fastest (decision cached in the run folder)",
    )


def _summary_parser(p: argparse.ArgumentParser) -> None:
    _config_option(p, "model.backbone")
    _config_option(p, "model.image_size", help="input size: N or HxW (auto: N x N pixels, N=256)")
    p.add_argument("--json", action="store_true")


def _train_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        help="category folder (MVTec/VisA layout), plain folder of good images, or elpv:mono / elpv:poly",
    )
    p.add_argument("--output", required=True, help="run folder")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --output from its last checkpoint"
    )
    p.add_argument("--validation", help="labelled folder (MVTec layout) for F1-optimal thresholds")
    _json_flag(p)
    _train_flags(p)


def _demo_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="runs/demo", help="run folder (default: runs/demo)")
    _config_option(p, "train.epochs", default=20)
    _config_option(p, "model.image_size", default=256)


def _test_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="run folder (or model file) to evaluate")
    p.add_argument("--data", help="category or plain folder (default: the run's own data)")
    p.add_argument("--output", help="report folder (default: <run>/test-<dataset>)")
    p.add_argument("--pro-mode", default="standard", choices=PRO_MODES)
    the_runs = "the run's"
    _config_option(p, "model.normalization", help="override the run's map normalisation", shown=the_runs)
    _config_option(p, "model.smoothing", help="override the run's map smoothing (0 = off)", shown=the_runs)
    _config_option(
        p, "model.score", help="override the run's image score (e.g. official, logp:max@4)", shown=the_runs
    )
    _config_option(p, "train.eval_resolution", help="where maps meet masks", shown=the_runs)
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
    _json_flag(p)


def _predict_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="run folder (or model file)")
    p.add_argument("--input", required=True, nargs="+", help="image files and/or folders (recursive)")
    p.add_argument("--output", required=True, help="results folder")
    p.add_argument("--threshold", type=float, help="raw image-score threshold (overrides the calibrated one)")
    _runtime_flag(p, "--batch-size")
    p.add_argument("--resume", action="store_true", help="skip images already in --output/predictions.csv")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument(
        "--images",
        choices=["all", "overlay"],
        default="all",
        help="per image: overlay, 16-bit map and mask PNGs (all, the default) or the overlay only",
    )
    shown.add_argument(
        "--no-images", dest="images", action="store_const", const="none", help="no PNGs: predictions.csv only"
    )
    _inference_flags(p)
    _ray_flags(p, "chunks of files")
    _json_flag(p)


def _export_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="run folder (or model file)")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="file format (ONNX is the only one)")
    p.add_argument("--output", help="default: <run>/model.<format>")


def _serve_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="run folder (or model file)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help=argparse.SUPPRESS)  # refused with a pointer to the two ways below
    p.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="require the key in FILE's first line (header X-API-Key); default: $MSFLOW_API_KEY if set",
    )
    _runtime_flag(p, "batch 1 (one image per request)")
    p.add_argument("--max-upload-mb", type=float, default=20.0)
    _config_option(p, "train.device", default="auto", help="where the model runs")
    p.add_argument(
        "--max-concurrent", type=int, default=8, metavar="N", help="requests in progress at once, beyond: 429"
    )
    p.add_argument(
        "--rate-limit",
        type=float,
        default=10.0,
        metavar="R",
        help="requests/s per client, beyond: 429 (0: off)",
    )
    p.add_argument("--burst", type=int, metavar="N", help="requests a client may make at once (default: R)")


def _benchmark_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="root holding category folders, or one category")
    p.add_argument("--output", required=True, help="folder of the runs and the results table")
    p.add_argument("--categories", nargs="+", help="subset of categories (default: all found)")
    _ray_flags(p, "each category")
    _train_flags(p)


# name: (help, its flags, what it runs). "speed" is added apart: its flags are benchmarks/speed's.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[..., Any]]] = {
    "summary": ("feature shapes and parameter counts of a model", _summary_parser, cmd_summary),
    "train": (
        "train on a folder of images (MVTec, VisA, plain, or --normal-dir ...) or elpv:mono|poly",
        _train_parser,
        cmd_train,
    ),
    "demo": ("train the offline default on built-in data (~minutes on a CPU)", _demo_parser, cmd_demo),
    "test": ("evaluate a trained run on a test set", _test_parser, cmd_test),
    "predict": ("judge new images: scores, maps, masks, overlays", _predict_parser, cmd_predict),
    "export": ("export a run to ONNX (backbone, flows and maps in one graph)", _export_parser, cmd_export),
    "serve": ("HTTP service with a web page", _serve_parser, cmd_serve),
    "benchmark": (
        "accuracy over many categories: train and test each; a table with a mean row",
        _benchmark_parser,
        cmd_benchmark,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msflow", description="MSFlow anomaly detection: train, test, predict, serve"
    )
    parser.add_argument("--version", action="version", version=f"msflow {__import__('msflow').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)  # the flags of every command: how it reports
    common.add_argument(
        "--quiet", action="store_true", help="no progress and no messages but warnings on stderr"
    )
    common.add_argument("--log-level", default="INFO", type=str.upper, choices=LEVELS, help="(default: INFO)")
    common.add_argument("--log-file", metavar="PATH", help="also append every message, time-stamped, to PATH")
    for name, (text, add_flags, func) in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text, parents=[common])
        add_flags(p)
        p.set_defaults(func=func)
    # Its flags belong to benchmarks/speed/ ('msflow speed --help'); they are passed through.
    speed = "speed of training and inference against the official-style reference path (source checkout)"
    sub.add_parser("speed", help=speed, add_help=False).set_defaults(func=cmd_speed)
    sub.add_parser("bench", add_help=False).set_defaults(func=cmd_speed)  # the old name; not listed
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in ("speed", "bench"):
        args.speed_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        configure(
            getattr(args, "log_level", "INFO"), getattr(args, "log_file", None), getattr(args, "quiet", False)
        )
        return int(args.func(args) or 0)
    except MSFlowError as err:
        log.error(f"error: {err}")
        if "TORCHELASTIC_ERROR_FILE" in os.environ:  # a torchrun rank: its summary shows this line too
            from msflow.train.distributed import report_to_launcher

            report_to_launcher(f"error: {err}")
        return getattr(err, "exit_code", 2)  # 2, or 143 for a run stopped by SIGTERM (StoppedError)
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
