"""Comparing two run folders (a restarted, resumed or data-parallel run against one uninterrupted
process), and a free local port for launchers. Helpers, not fixtures (see conftest.py).

Tolerances (tests/test_distributed.py explains them): the per-epoch loss within 1e-6 relative;
standardisation statistics, global-normalisation references and thresholds within 1e-5 relative;
final weights within rtol 1e-3 / atol 1e-4.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

from msflow.model.checkpoint import load_tensors


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]


def assert_same_model(run: Path, reference: Path) -> None:
    got, meta = load_tensors(run / "model")
    want, ref_meta = load_tensors(reference / "model")
    assert got.keys() == want.keys()
    exact_ish = ("standardizers.", "anomaly.ref_")
    for key in want:
        if any(tag in key for tag in exact_ish):
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
        elif want[key].is_floating_point():
            torch.testing.assert_close(got[key], want[key], rtol=1e-3, atol=1e-4, msg=key)
        else:
            assert torch.equal(got[key], want[key]), key
    assert got["standardizers.1.std"].flatten().std() > 0  # the statistics really were fitted
    for name in ("image", "pixel", "score_min", "score_max"):
        assert meta["threshold"][name] == pytest.approx(ref_meta["threshold"][name], rel=1e-5)


def free_port() -> int:
    """A port nothing listens on now (the OS picks it; a launcher binds it right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
