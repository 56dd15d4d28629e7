"""End to end through the command line: train -> test -> predict -> export -> predict (onnx), on a tiny
fake category with a random-weight ResNet-18 (nothing downloads), plus the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fake_data import make_fake_category
from PIL import Image

try:
    from aupro_reference import aupro_official_reference
except ImportError:  # tests/ became a package
    from .aupro_reference import aupro_official_reference

from msflow.cli import build_parser, main
from msflow.config import SECTIONS, Config, option_fields
from msflow.evaluate import report
from msflow.infer.runtime import SCORE_TOLERANCE


def read_rows(path: Path) -> list[dict[str, str]]:
    return list(report.read_rows(path))


TRAIN_FLAGS = [
    "--backbone",
    "resnet18",
    "--no-pretrained",
    "--image-size",
    "64",
    "--epochs",
    "2",
    "--stop",
    "schedule",
    "--quiet",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    data = make_fake_category(root / "fake")
    run = root / "run"
    assert main(["train", "--data", str(data), "--output", str(run), *TRAIN_FLAGS]) == 0
    return data, run


def test_train_writes_a_readable_run_folder(trained: tuple[Path, Path]) -> None:
    _, run = trained
    for name in (
        "config.yaml",
        "model.safetensors",
        "model.json",
        "metrics.json",
        "predictions.csv",
        "score_histogram.png",
        "loss_curve.png",
        "checkpoint/last.json",
    ):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "per_defect_type", "train_seconds"):
        assert key in metrics
    assert metrics["epochs"] == 2
    assert len(list((run / "overlays").glob("*.png"))) == 6
    meta = json.loads((run / "model.json").read_text())
    assert meta["config"]["model"]["backbone"] == "resnet18" and "threshold" in meta
    assert not list(run.rglob("*.pt")) and not list(run.rglob("*.pth"))  # no pickle anywhere


def test_test_command_reproduces_training_metrics(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, run = trained
    assert main(["test", "--model", str(run), "--data", str(data), "--output", str(tmp_path), "--quiet"]) == 0
    again = json.loads((tmp_path / "metrics.json").read_text())
    first = json.loads((run / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert again[key] == pytest.approx(first[key], abs=1e-9)
    assert "image AUROC" in capsys.readouterr().out


def test_test_command_smoothing_override_changes_the_maps_and_bad_values_are_one_line(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, run = trained
    first = json.loads((run / "metrics.json").read_text())
    own = json.loads((run / "model.json").read_text())["config"]["model"]["smoothing"]
    assert own in (0, 2, 4, 8)  # resolved at training time, never left "auto"
    args = ["test", "--model", str(run), "--data", str(data), "--quiet"]
    assert main([*args, "--output", str(tmp_path / "s8"), "--smoothing", "0" if own else "8"]) == 0
    blurred = json.loads((tmp_path / "s8" / "metrics.json").read_text())
    assert blurred["pixel_auroc"] != pytest.approx(first["pixel_auroc"], abs=1e-6)
    code = main([*args, "--output", str(tmp_path / "bad"), "--smoothing", "-1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "smoothing" in err[0] and "-1" in err[0]


def test_test_command_choose_without_two_held_out_images_is_one_line(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, run = trained  # 8 training images, 1 held out: nothing to judge choices on
    args = ["test", "--model", str(run), "--data", str(data), "--quiet", "--choose"]
    assert main([*args, "--output", str(tmp_path / "c")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at least 2" in err[0]


def test_test_command_all_scores_reports_every_candidate_and_the_runs_own_auroc(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    from msflow.scoring import SCORE_CANDIDATES

    data, run = trained
    out = tmp_path / "all"
    assert (
        main(
            [
                "test",
                "--model",
                str(run),
                "--data",
                str(data),
                "--quiet",
                "--all-scores",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "score_report.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(SCORE_CANDIDATES) <= set(report["image_auroc"])
    assert report["image_auroc"][report["used"]] == pytest.approx(metrics["image_auroc"], abs=1e-3)
    assert report["difference_to_used_95"][report["used"]] == [0.0, 0.0, 0.0]


def test_test_command_official_pro_mode(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = trained
    assert (
        main(
            [
                "test",
                "--model",
                str(run),
                "--data",
                str(data),
                "--output",
                str(tmp_path),
                "--pro-mode",
                "official",
                "--quiet",
            ]
        )
        == 0
    )
    official = json.loads((tmp_path / "metrics.json").read_text())["aupro"]
    # The same maps, scored by the slow 800-threshold loop written from the official definition: the
    # Detector runs the 6 test images in one batch, as 'msflow test' does (batch 8), so the maps match.
    from msflow.data.datasets import load_dataset
    from msflow.data.images import read_mask
    from msflow.detector import Detector

    _, _, test = load_dataset(str(data))
    results = Detector.load(run, device="cpu").predict_batch([s.image for s in test])
    maps = np.stack([r.image_map for r in results])  # the official code scores PRO on the "mul" map
    masks = np.stack(
        [read_mask(s.mask) if s.mask else np.zeros(m.shape, bool) for s, m in zip(test, maps, strict=True)]
    )
    # 'msflow test' accumulates the maps in 2^20-bin histograms (evaluate/streaming.py): within 0.01
    # points of the exact number, far closer than the two definitions are to each other.
    assert masks.any() and official == pytest.approx(aupro_official_reference(masks, maps), abs=0.01)
    standard = json.loads((run / "metrics.json").read_text())["aupro"]
    assert official != pytest.approx(standard, abs=1e-3)  # the flag really switched the definition


def test_predict_writes_maps_masks_and_summary(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = trained
    out = tmp_path / "pred"
    assert (
        main(["predict", "--model", str(run), "--input", str(data / "test"), "--output", str(out), "--quiet"])
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == summary["predicted"] == 6 and summary["failed"] == 0
    first = read_rows(out / summary["predictions"])[0]
    assert {"score", "normalized_score", "decision", "threshold"} <= set(first)
    assert 0.0 <= float(first["normalized_score"]) <= 1.0
    assert (first["decision"] == "defective") == (float(first["score"]) >= float(first["threshold"]))
    stem = Path(first["image"]).stem
    size = Image.open(first["image"]).size
    for suffix in ("overlay", "map", "mask"):
        assert Image.open(out / f"{stem}_{suffix}.png").size == size  # original resolution
    assert (out / "predictions.csv").is_file()
    # one schema: the evaluation at the end of training wrote the same columns (label there, not here)
    header = (out / "predictions.csv").read_text().splitlines()[0]
    assert header == (run / "predictions.csv").read_text().splitlines()[0]
    evaluated = read_rows(run / "predictions.csv")[0]
    assert first["label"] == "" and evaluated["label"] in ("0", "1") and float(evaluated["threshold"]) > -1e30


def test_predict_json_is_one_line_for_scripts(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, run = trained
    argv = ["predict", "--model", str(run), "--input", str(data / "test"), "--output", str(tmp_path)]
    assert main([*argv, "--runtime", "torch", "--json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    result = json.loads(line)
    assert result["command"] == "predict" and result["predicted"] == 6
    assert result["output_dir"] == str(tmp_path)
    assert result["defective"] == json.loads((tmp_path / "summary.json").read_text())["defective"]


def test_predict_threshold_override_flips_decisions(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = trained
    assert (
        main(
            [
                "predict",
                "--model",
                str(run),
                "--input",
                str(data / "test"),
                "--output",
                str(tmp_path),
                "--threshold=-1e9",
                "--quiet",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["defective"] == 6


def test_predict_carries_on_past_bad_files_and_exits_nonzero(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, run = trained
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.open(next((data / "test" / "good").glob("*.png"))).save(inputs / "ok image é.png")
    (inputs / "broken.png").write_bytes(b"not an image at all")
    (inputs / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    assert (
        main(["predict", "--model", str(run), "--input", str(inputs), "--output", str(out), "--quiet"]) == 1
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["predicted"] == 1 and summary["failed"] == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "empty.jpg" in err and "Traceback" not in err


def test_export_and_onnx_runtime_agree_with_torch(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = trained
    assert main(["export", "--model", str(run), "--format", "onnx"]) == 0
    assert (run / "model.onnx").is_file()
    outs = {}
    for runtime in ("torch", "onnx"):
        out = tmp_path / runtime
        assert (
            main(
                [
                    "predict",
                    "--model",
                    str(run),
                    "--input",
                    str(data / "test"),
                    "--output",
                    str(out),
                    "--runtime",
                    runtime,
                    "--quiet",
                ]
            )
            == 0
        )
        outs[runtime] = read_rows(out / "predictions.csv")
    torch_scores = np.array([float(p["score"]) for p in outs["torch"]])
    onnx_scores = np.array([float(p["score"]) for p in outs["onnx"]])
    np.testing.assert_allclose(onnx_scores, torch_scores, rtol=1e-4, atol=1e-6)


def test_predict_picks_a_runtime_by_default_with_the_same_verdicts(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, run = trained
    rows = {}
    for runtime in ("torch", None):  # None: the default, auto
        out = tmp_path / (runtime or "auto")
        flags = ["--runtime", runtime] if runtime else []
        argv = ["predict", "--model", str(run), "--input", str(data / "test"), "--output", str(out)]
        assert main([*argv, "--batch-size", "4", *flags]) == 0  # not --quiet: the runtime line is INFO
        rows[runtime or "auto"] = read_rows(out / "predictions.csv")
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("runtime auto -> ")]
    assert "img/s at batch 4" in line and "torch" in line
    entry = next(iter(json.loads((run / "runtime.json").read_text())["decisions"].values()))
    assert line.startswith(f"runtime auto -> {entry['runtime']} ")
    assert [r["decision"] for r in rows["auto"]] == [r["decision"] for r in rows["torch"]]
    scores = {k: np.array([float(r["score"]) for r in v]) for k, v in rows.items()}
    scale = max(1.0, float(np.abs(scores["torch"]).max()))
    np.testing.assert_allclose(scores["auto"], scores["torch"], rtol=0, atol=SCORE_TOLERANCE * scale)


def test_summary_uses_the_train_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    defaults = Config().model  # what 'msflow train' builds without flags
    assert info["backbone"] == defaults.backbone
    assert defaults.image_size == "auto:256" and info["image_size"] == 256  # square images at auto


def test_every_config_option_is_declared_once() -> None:
    """A flag named like a config option is derived from it (its dest is "section.name"), never
    written again by hand in a command."""
    options = {f.name: section for section, klass in SECTIONS.items() for f, _ in option_fields(klass)}
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    checked = 0
    for command, parser in commands.items():
        for action in parser._actions:
            for flag in action.option_strings:
                name = flag.removeprefix("--").removeprefix("no-").replace("-", "_")
                if name in options:
                    assert action.dest == f"{options[name]}.{name}", f"msflow {command} {flag}"
                    checked += 1
    assert checked > 2 * len(options)  # train and benchmark offer every option, other commands a few


def test_speed_is_the_benchmark_of_speed_and_bench_its_old_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    listed = capsys.readouterr().out
    assert "speed" in listed and "benchmark" in listed and " bench " not in listed
    if not (Path(__file__).resolve().parents[1] / "benchmarks" / "speed" / "__init__.py").is_file():
        pytest.skip("no benchmarks/ folder (not a source checkout)")
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "'msflow bench' is now 'msflow speed'" in capsys.readouterr().err


def test_summary_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", "--backbone", "resnet18", "--image-size", "64", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["feature_shapes"] == [[64, 8, 8], [128, 4, 4], [256, 2, 2]]
    assert info["trainable_parameters"]["backbone"] == 0


def test_bad_training_set_is_refused_in_one_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_fake_category(tmp_path / "fake", n_train=4)
    (data / "train" / "good" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--output", str(run), *TRAIN_FLAGS]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "001.png" in err and "Traceback" not in err
    assert not (run / "model.json").exists()


def test_existing_run_is_never_overwritten(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    data, run = trained
    before = (run / "model.safetensors").read_bytes()
    assert main(["train", "--data", str(data), "--output", str(run), *TRAIN_FLAGS]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--data", "/nonexistent/folder", "--output", "x"], "/nonexistent/folder"),
        (["predict", "--model", "/nonexistent/run", "--input", ".", "--output", "x"], "/nonexistent/run"),
        (["train", "--data", "elpv:nope", "--output", "x"], "elpv:nope"),
    ],
)
def test_errors_are_one_line_and_name_the_culprit(
    argv: list[str],
    needle: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_onnx_runtime_refuses_an_export_of_another_model(trained: tuple[Path, Path], tmp_path: Path) -> None:
    from msflow.detector import Detector
    from msflow.errors import MSFlowError
    from msflow.infer.export import export_onnx
    from msflow.model.checkpoint import load_model

    _, run = trained
    model, _, _ = load_model(run)
    export_onnx(model, run / "model.onnx")  # no checkpoint digest: as if exported from another run
    with pytest.raises(MSFlowError, match="not exported from this model"):
        Detector.load(run, device="cpu", runtime="onnx")
    assert main(["export", "--model", str(run)]) == 0
    assert Detector.load(run, device="cpu", runtime="onnx").runtime == "onnx"


def test_export_format_decides_the_file_name(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, run = trained
    assert main(["export", "--model", str(run), "--format", "onnx", "--output", str(tmp_path / "m.pt")]) == 2
    assert "must end in '.onnx'" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()
