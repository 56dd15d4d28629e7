"""Data-parallel training with torchrun (gloo on the CPU): 2 ranks reproduce 1 process.

Tolerances (``run_checks.py``): the per-epoch loss within 1e-6 relative; standardisation statistics,
global-normalisation references and thresholds within 1e-5 relative; final weights within rtol 1e-3 /
atol 1e-4. The two runs differ only in float32 summation order (two half-batch gradient sums
all-reduced instead of one batch sum), and Adam's per-parameter normalisation amplifies those last-bit
differences in the weights whose gradients are tiny, so the weights get the looser bound.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_data import make_fake_category
from run_checks import assert_same_model, free_port, losses

from msflow.config import Config
from msflow.errors import MSFlowError
from msflow.model.checkpoint import load_tensors
from msflow.train.distributed import KILL_SEAM_ENV, Distributed
from msflow.train.fit import fit
from msflow.train.loop import StepHook

EPOCHS = 2
FLAGS = {
    "backbone": "resnet18",
    "pretrained": False,
    "image_size": 64,
    "feature_norm": "channel",  # standardisation statistics are all-reduced: test them too
    "normalization": "global",  # so are the global-normalisation references
    "score": "auto",  # rank 0 picks it; the other ranks must score their shards with its choice
}
CLI_FLAGS = [
    "--backbone", "resnet18", "--no-pretrained", "--image-size", "64", "--feature-norm", "channel",
    "--normalization", "global", "--score", "auto", "--holdout-fraction", "0.15", "--epochs", str(EPOCHS),
    "--batch-size", "4", "--quiet",
]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 13 images, 2 held out (auto score selection needs two; each rank calibrates on one): 11 to fit,
    # batches of 4, 4, 3; the last one splits 2 + 1 over two ranks.
    return make_fake_category(tmp_path_factory.mktemp("dist") / "fake", n_train=13)


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("one") / "run"
    cfg = Config().updated(
        model=FLAGS,
        data={"dataset": str(data), "holdout_fraction": 0.15},
        train={"epochs": EPOCHS, "batch_size": 4},
    )
    fit(cfg, run, progress=False, log=lambda _: None)
    return run


def torchrun(data: Path, run: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "msflow", "train", "--data", str(data), "--output", str(run), *CLI_FLAGS, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def test_two_ranks_reproduce_one_process(data: Path, reference: Path, tmp_path: Path) -> None:
    run = tmp_path / "two"
    done = torchrun(data, run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(run) == pytest.approx(losses(reference), rel=1e-6)
    assert_same_model(run, reference)
    assert done.stdout.count("run folder:") == 1  # rank 0 alone reports (and writes the run folder)
    assert_same_evaluation(run, reference)
    chosen = [json.loads((r / "score_selection.json").read_text())["chosen"] for r in (run, reference)]
    assert chosen[0] == chosen[1] != "auto"


def test_two_nodes_meeting_by_rendezvous_reproduce_one_process(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    """Two torchrun "nodes" of one process each, joined by the c10d rendezvous as on a cluster (here
    both on localhost): the job trains the model one process trains."""
    run, port = tmp_path / "nodes", free_port()
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
    launch += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "msflow-test"]
    train = ["-m", "msflow", "train", "--data", str(data), "--output", str(run), *CLI_FLAGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [*launch, "--node-rank", str(r), *train],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        outputs = [node.communicate(timeout=600) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert losses(run) == pytest.approx(losses(reference), rel=1e-6)
    assert_same_model(run, reference)
    assert sum(out.count("run folder:") for out, _ in outputs) == 1  # one rank 0 over both nodes


TIMINGS = {"test_images_per_second", "train_seconds", "feature_extraction_seconds", "model_build_seconds"}


def assert_same_value(got: object, want: object, where: str) -> None:
    """Numbers equal within the model's tolerance, everything else (names, flags, lists) exactly.

    pytest.approx takes numbers only (pytest >= 9.2 raises TypeError on a string with ``rel``), so the
    report's text fields and nested tables are walked here and only their numbers meet approx.
    """
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            assert_same_value(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_same_value(a, b, f"{where}[{i}]")
    elif isinstance(want, (int, float)) and not isinstance(want, bool):
        assert not isinstance(got, (bool, str)) and got == pytest.approx(want, rel=1e-3, abs=1e-4), where
    else:
        assert got == want, where


def assert_same_evaluation(run: Path, reference: Path) -> None:
    """The sharded evaluation's report equals one process's, within the model's tolerance."""
    got = json.loads((run / "metrics.json").read_text())
    want = json.loads((reference / "metrics.json").read_text())
    # sharded: each rank predicted only its contiguous half of the 6 test images
    assert got.pop("test_images_per_rank") == [3, 3]
    assert "test_images_per_rank" not in want
    # one process only (evaluate_stream): the pixel metrics at model resolution too, and the passes in
    # finer bins that bring every error bound under 0.1; sharded, the pixel metrics are within theirs
    assert "model_resolution" in want and "model_resolution" not in got
    want.pop("model_resolution")
    assert {"pixel_auroc", "aupro", "image_auroc", "false_positive_rate"} <= want.keys()
    assert got.keys() == want.keys()
    bounded = {"pixel_auroc": "pixel_auroc", "pixel_f1_max": "pixel_f1", "aupro": "aupro"}
    refined = {"metric_passes", "pixel_f1_threshold", *(f"{b}_error_bound" for b in bounded.values())}
    for key, bound in bounded.items():
        slack = got[f"{bound}_error_bound"] + want[f"{bound}_error_bound"] + 1e-3 * abs(want[key])
        assert abs(got[key] - want[key]) <= slack, key
    for key in want.keys() - TIMINGS - refined - bounded.keys():
        assert_same_value(got[key], want[key], key)
    rows = [list(csv.DictReader((r / "predictions.csv").open())) for r in (run, reference)]
    assert len(rows[0]) == len(rows[1]) == want["test_images"]
    for a, b in zip(*rows, strict=True):
        assert [a[k] for k in ("image", "label", "defect_type", "decision")] == [
            b[k] for k in ("image", "label", "defect_type", "decision")
        ]
        for k in ("score", "normalized_score"):
            assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-3, abs=1e-4), k
    overlays = [sorted(p.name for p in (r / "overlays").iterdir()) for r in (run, reference)]
    assert overlays[0] == overlays[1] and len(overlays[0]) == want["test_images"]


def test_a_killed_rank_ends_the_job_cleanly_and_resume_completes_it(
    data: Path, reference: Path, tmp_path: Path
) -> None:
    run = tmp_path / "killed"
    failed = torchrun(data, run, env={KILL_SEAM_ENV: "1:1:0:KILL"})  # rank 1 dies after epoch 1's checkpoint
    assert failed.returncode != 0
    ours = [line for line in failed.stderr.splitlines() if line.startswith(("error: rank", "rank 1/2"))]
    assert any(line.startswith("rank 1/2: test seam") for line in ours), failed.stderr[-3000:]
    survivor = [line for line in ours if line.startswith("error: rank 0/2: ")]
    assert len(survivor) == 1 and "--resume" in survivor[0], failed.stderr[-3000:]
    assert not (run / "model.json").exists() and len(losses(run)) == 1

    resumed = torchrun(data, run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(run) == pytest.approx(losses(reference), rel=1e-6)
    assert_same_model(run, reference)


_poisoned: list[int] = []


def poison_once_on_rank(rank: int) -> StepHook:
    """NaN features once, at epoch 1 (0-based) step 1, on ``rank`` only (-1: the single process)."""

    def hook(epoch: int, step: int, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        me = int(os.environ.get("RANK", "-1"))
        if epoch == 1 and step == 1 and me == rank and not _poisoned:
            _poisoned.append(1)
            return [f.clone().fill_(float("nan")) for f in feats]
        return feats

    return hook


def _spawned_rank(rank: int, port: int, data: str, run: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    cfg = Config().updated(
        model=FLAGS, data={"dataset": data, "holdout_fraction": 0.15}, train={"epochs": 3, "batch_size": 4}
    )
    metrics = fit(cfg, run, progress=False, step_hook=poison_once_on_rank(1), log=lambda _: None)
    Path(f"{run}.rank{rank}.json").write_text(json.dumps(metrics))


def test_a_non_finite_loss_on_one_rank_rolls_back_every_rank(data: Path, tmp_path: Path) -> None:
    """Only rank 1's half of a batch turns NaN; both ranks must roll back together, like one process
    whose whole batch turned NaN (a rank that went on alone would deadlock or diverge)."""
    cfg = Config().updated(
        model=FLAGS,
        data={"dataset": str(data), "holdout_fraction": 0.15},
        train={"epochs": 3, "batch_size": 4},
    )
    _poisoned.clear()
    fit(cfg, tmp_path / "one", progress=False, step_hook=poison_once_on_rank(-1), log=lambda _: None)
    assert _poisoned
    port = free_port()
    torch.multiprocessing.spawn(_spawned_rank, args=(port, str(data), str(tmp_path / "two")), nprocs=2)
    for run in ("one", "two"):
        _, meta = load_tensors(tmp_path / run / "checkpoint" / "last")
        assert meta["bad_events"] == 1 and meta["lr_scale"] == 0.5 and meta["epoch"] == 3
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-6)
    assert_same_model(tmp_path / "two", tmp_path / "one")
    # every rank returns rank 0's metrics, once rank 0 has written the run folder
    returned = [json.loads((tmp_path / f"two.rank{r}.json").read_text()) for r in range(2)]
    assert returned[0] == returned[1] == json.loads((tmp_path / "two" / "metrics.json").read_text())


def test_shards_tile_the_data_and_batches_split_evenly() -> None:
    for n in (0, 1, 5, 11):
        ranks = [Distributed(r, 3) for r in range(3)]
        assert [i for d in ranks for i in d.shard(n)] == list(range(n))
    batch = torch.tensor([7, 3, 9])
    parts = [Distributed(r, 2).split_batch(batch).tolist() for r in range(2)]
    assert parts == [[7, 3], [9]]
    assert Distributed().shard(4) == range(4) and torch.equal(Distributed().split_batch(batch), batch)


def test_weighted_rank_losses_average_to_the_single_process_gradient() -> None:
    """DDP averages gradients over ranks; with uneven parts the scaled sums still give the batch mean's."""
    torch.manual_seed(0)
    w = torch.randn(5, requires_grad=True)
    x = torch.randn(3, 5)
    (torch.tanh(x @ w) ** 2).mean().backward()
    single = w.grad.clone()
    grads = []
    for rank in range(2):
        w.grad = None
        part = Distributed(rank, 2).split_batch(torch.arange(3))
        Distributed(rank, 2).batch_loss(torch.tanh(x[part] @ w) ** 2, 3).backward()
        grads.append(w.grad.clone())
    torch.testing.assert_close((grads[0] + grads[1]) / 2, single)


def test_a_batch_smaller_than_the_ranks_is_refused() -> None:
    with pytest.raises(MSFlowError, match="batch size 1 is smaller than the 2 ranks"):
        Distributed(0, 2).setup(torch.device("cpu"), batch_size=1)
