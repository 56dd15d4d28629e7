"""How msflow reports: through ``logging``, one line per epoch and per phase when stderr is not a
terminal (no carriage returns), ``--log-file`` and ``--log-level``, ``--json`` results on stdout."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_data import make_fake_category

from msflow import logs
from msflow.cli import main

EPOCH = re.compile(r"epoch (\d)/2: loss -?[\d.e+-]+, [\d.]+ images/s, \d+:\d\d left$")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    yield
    logs.configure()  # the next test starts from the defaults (main() configures the 'msflow' logger)


def test_progress_off_a_terminal_is_one_line_per_phase(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="msflow"):
        assert list(logs.Progress(range(5), "extract features", unit="images")) == list(range(5))
        bar = logs.Progress(desc="predict", total=4, unit="images", summary=True)
        bar.update(3)
        bar.close()
        bar.close()  # once only
        list(logs.Progress(range(5), "quiet phase", enabled=False))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("extract features: 5 images in ") and "images/s" in lines[0]
    assert lines[1].startswith("predict: 3 images in ")


def test_duration() -> None:
    assert [logs.duration(s) for s in (0, 42.4, 725, 11232)] == ["0:00", "0:42", "12:05", "3:07:12"]


def test_train_off_a_terminal_logs_epochs_json_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, run, log_file = make_fake_category(tmp_path / "fake"), tmp_path / "run", tmp_path / "logs" / "t.log"
    flags = ["--backbone", "resnet18", "--no-pretrained", "--image-size", "64", "--epochs", "2"]
    argv = ["train", "--data", str(data), "--output", str(run), *flags, "--log-file", str(log_file), "--json"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "\r" not in err and "\r" not in log_file.read_text()  # capsys is not a terminal: no bars
    assert [int(EPOCH.match(x).group(1)) for x in err.splitlines() if x.startswith("epoch ")] == [1, 2]
    assert any(x.startswith("extract features: 7 images in ") for x in err.splitlines())  # 8 less 1 held out
    (line,) = out.splitlines()
    result = json.loads(line)
    assert result["command"] == "train" and result["run_dir"] == str(run)
    assert result["metrics"]["image_auroc"] == json.loads((run / "metrics.json").read_text())["image_auroc"]
    assert result["decisions"]["score"] and result["decisions"]["threshold"]["image"] is not None
    written = log_file.read_text().splitlines()
    stamped = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO (.*)$")
    assert [stamped.match(x).group(1) for x in written] == err.splitlines()

    # --quiet: nothing but warnings on stderr; the log file still gets every line, at --log-level.
    quiet = tmp_path / "quiet.log"
    argv = ["test", "--model", str(run), "--output", str(tmp_path / "t"), "--quiet", "--log-file", str(quiet)]
    assert main([*argv, "--log-level", "debug"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "image AUROC" in out
    assert "INFO test: 6 images in " in quiet.read_text()


def test_bad_log_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("x")
    argv = ["summary", "--backbone", "resnet18", "--log-file", str(tmp_path / "file" / "x.log")]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: cannot write the log file") and "x.log" in line
