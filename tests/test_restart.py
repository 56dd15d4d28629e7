"""Stopping and restarting a training run: SIGTERM writes a checkpoint of the current step and ends
the run with exit code 143; a restarted job (``torchrun --max-restarts``) continues from its checkpoint
without being told; the result equals an uninterrupted run (tolerances in ``run_checks.py``).

The faults are injected by the seam of :mod:`msflow.train.distributed` (a rank sends itself SIGKILL or
SIGTERM at a given step, once per job), so they land at the same step on every machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_data import make_fake_category
from run_checks import assert_same_model, losses

from msflow.config import Config
from msflow.errors import MSFlowError
from msflow.model.checkpoint import load_tensors
from msflow.train.distributed import KILL_SEAM_ENV, KILL_SEAM_ONCE_ENV, Distributed
from msflow.train.fit import fit
from msflow.train.resume import open_run

EPOCHS = 2
FLAGS = {"backbone": "resnet18", "pretrained": False, "image_size": 64, "feature_norm": "channel"}
CLI_FLAGS = [
    "--backbone", "resnet18", "--no-pretrained", "--image-size", "64", "--feature-norm", "channel",
    "--holdout-fraction", "0.15", "--epochs", str(EPOCHS), "--batch-size", "4", "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 13 images, 2 held out: 11 to fit in batches of 4, 4, 3 (3 steps per epoch)
    return make_fake_category(tmp_path_factory.mktemp("restart") / "fake", n_train=13)


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run, in one process."""
    run = tmp_path_factory.mktemp("one") / "run"
    cfg = Config().updated(
        model=FLAGS,
        data={"dataset": str(data), "holdout_fraction": 0.15},
        train={"epochs": EPOCHS, "batch_size": 4},
    )
    fit(cfg, run, progress=False, log=lambda _: None)
    return run


def train(data: Path, run: Path, *extra: str, launcher: list[str] | None = None, env: dict | None = None):
    """``msflow train`` in a subprocess, under ``torchrun LAUNCHER`` when given."""
    cmd = [sys.executable, "-m", "msflow"]
    if launcher is not None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", *launcher, "-m", "msflow"]
    cmd += ["train", "--data", str(data), "--output", str(run), *CLI_FLAGS, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def test_sigterm_checkpoints_the_step_exits_143_and_resume_finishes_the_same_model(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    run = tmp_path / "stopped"
    stopped = train(data, run, env={KILL_SEAM_ENV: "0:1:1:TERM"})  # SIGTERM before epoch 2's step 2
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    errors = [line for line in stopped.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stopped.stderr, stopped.stderr[-3000:]
    assert "stopped by SIGTERM at epoch 2, step 2 of 3" in errors[0] and "--resume" in errors[0]
    _, meta = load_tensors(run / "checkpoint" / "last")  # the step it was on finished, then was saved
    assert meta["epoch"] == 1 and meta["in_epoch"]["step"] == 2 and meta["in_epoch"]["images"] == 8
    assert not (run / "model.json").exists() and len(losses(run)) == 1

    refused = train(data, run)  # a plain rerun never overwrites the run, nor continues it unasked
    assert refused.returncode == 2 and "already holds a run; use --resume" in refused.stderr
    resumed = train(data, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(run) == pytest.approx(losses(reference), rel=1e-6)
    assert_same_model(run, reference)


def test_a_worker_killed_mid_epoch_is_restarted_and_continues_from_the_checkpoint(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    run = tmp_path / "killed"
    seam = {KILL_SEAM_ENV: "1:1:1:KILL", KILL_SEAM_ONCE_ENV: str(tmp_path / "fired")}
    done = train(data, run, launcher=["--nproc-per-node", "2", "--max-restarts", "1"], env=seam)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "fired").exists() and done.stderr.count("test seam") == 1  # killed once
    assert "(restart 1): continuing it" in done.stderr  # no --resume was typed (a warning, on stderr)
    assert losses(run) == pytest.approx(losses(reference), rel=1e-6)  # epoch 1 kept, epoch 2 redone once
    assert_same_model(run, reference)


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_and_the_restart_continues_it(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    run = tmp_path / "terminated"
    seam = {KILL_SEAM_ENV: "1:1:1:TERM", KILL_SEAM_ONCE_ENV: str(tmp_path / "fired")}
    done = train(data, run, launcher=["--nproc-per-node", "2", "--max-restarts", "1"], env=seam)
    assert done.returncode == 0, done.stderr[-3000:]
    # both ranks, after the same step (their lines may interleave on the shared stderr)
    assert done.stderr.count("stopped by SIGTERM at epoch 2, step 2 of 3") == 2, done.stderr[-3000:]
    assert "(restart 1): continuing it" in done.stderr
    assert losses(run) == pytest.approx(losses(reference), rel=1e-6)  # resumed inside epoch 2
    assert_same_model(run, reference)


def test_a_restart_continues_only_a_checkpoint_of_the_same_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = Config().updated(model=FLAGS, data={"dataset": str(tmp_path)})
    run, said = tmp_path / "run", []
    assert not open_run(cfg, run, False, restarts=1, log=said.append).resume  # nothing there: afresh
    (run / "checkpoint").mkdir(parents=True)
    plain = json.loads(json.dumps(cfg.to_dict()))
    (run / "checkpoint" / "last.json").write_text(json.dumps({"config": plain, "requested": plain}))
    assert open_run(cfg, run, False, restarts=1, log=said.append).resume and "restart 1" in said[-1]
    assert open_run(cfg, run, "auto", restarts=0, log=said.append).resume  # a retried Ray task
    with pytest.raises(MSFlowError, match="already holds a run; use --resume"):
        open_run(cfg, run, False, restarts=0, log=said.append)  # a plain rerun: the user decides
    other = cfg.updated(train={"epochs": 7})
    with pytest.raises(MSFlowError, match="checkpoint of another configuration"):
        open_run(other, run, False, restarts=2, log=said.append)
    assert open_run(other, run, True, restarts=0, log=said.append).cfg.train.epochs == cfg.train.epochs

    for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):
        monkeypatch.setenv(name, "2")
        assert Distributed.from_environment().restarts == 2
        monkeypatch.delenv(name)
    assert Distributed.from_environment().restarts == 0
