"""Run folders written by older msflow versions still load (state-dict keys are migrated)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from msflow.config import Config
from msflow.errors import CheckpointError
from msflow.model.checkpoint import load_model, migrate_state_dict, save_model, save_tensors
from msflow.model.msflow import MSFlow


def _old_name(key: str) -> str:
    """The key as the previous version wrote it (string-built buffer names on MSFlow/FusionFlow)."""
    key = re.sub(r"^standardizers\.(\d+)\.(mean|std)$", r"feature_\2\1", key)
    return re.sub(r"^fusion_flow\.permutations\.(\d+)\.(perm|perm_inverse)$", r"fusion_flow.\2\1", key)


@pytest.fixture(scope="module")
def model_and_config() -> tuple[MSFlow, Config]:
    cfg = Config().updated(
        model={"backbone": "resnet18", "pretrained": False, "image_size": 64, "num_blocks": [1, 1, 1]}
    )
    torch.manual_seed(0)
    model = MSFlow(cfg.model).eval()
    with torch.no_grad():  # non-trivial standardisation, so a lost buffer would change the scores
        for standardizer in model.standardizers:
            standardizer.mean.normal_()
            standardizer.std.uniform_(0.5, 2.0)
    return model, cfg


def test_old_run_folder_loads_and_scores_identically(tmp_path: Path, model_and_config) -> None:
    model, cfg = model_and_config
    old_state = {_old_name(k): v for k, v in model.state_dict().items()}
    renamed = {k for k in old_state if k not in model.state_dict()}
    assert renamed == {
        *(f"feature_{s}{i}" for s in ("mean", "std") for i in range(3)),
        *(f"fusion_flow.{p}{i}" for p in ("perm", "perm_inverse") for i in range(3)),
    }
    save_tensors(old_state, {"config": cfg.to_dict()}, tmp_path / "model")
    loaded, _, _ = load_model(tmp_path)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.predict(x).scores, model.predict(x).scores)
    for a, b in zip(loaded.standardizers, model.standardizers, strict=True):
        assert torch.equal(a.std, b.std)


def test_new_run_folder_loads(tmp_path: Path, model_and_config) -> None:
    model, cfg = model_and_config
    save_model(model, cfg, tmp_path / "model")
    loaded, _, _ = load_model(tmp_path)
    assert all(
        torch.equal(a.perm, b.perm)
        for a, b in zip(loaded.fusion_flow.permutations, model.fusion_flow.permutations, strict=True)
    )


def test_old_and_new_names_together_are_refused() -> None:
    t = torch.zeros(1)
    with pytest.raises(CheckpointError, match="both the old and the new name of 'standardizers.0.mean'"):
        migrate_state_dict({"feature_mean0": t, "standardizers.0.mean": t})
    assert migrate_state_dict({"fusion_flow.perm_inverse2": t}).keys() == {
        "fusion_flow.permutations.2.perm_inverse"
    }
