"""Checkpoints of the training state, and whether a run folder starts afresh or continues.

``checkpoint/last.{safetensors,json}`` holds the flows, the optimizer, the :class:`TrainState` (a run
stopped by SIGTERM inside an epoch also its step) and two configurations: the one the run trains with
(image size and fallbacks resolved) and the one it was asked for. A run continues its folder when

- the user says so (``--resume``): with the checkpoint's own configuration, whatever today's flags say;
- the job was restarted (``torchrun --max-restarts``, a requeued Slurm job: the same command again) or
  a Ray task is retried (``resume="auto"``), and the checkpoint was asked for with the same
  configuration. A checkpoint of another configuration is never continued silently: the run stops with
  a line saying so.

A plain ``msflow train`` into a folder that holds a run refuses, as before: starting afresh would throw
the run away, continuing it is the user's call.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import torch
from torch.optim import Optimizer

from msflow.config import Config
from msflow.errors import MSFlowError
from msflow.model.checkpoint import load_tensors, migrate_state_dict, save_tensors
from msflow.model.msflow import MSFlow
from msflow.train.loop import TrainState
from msflow.train.schedule import Plateau

CHECKPOINT = Path("checkpoint") / "last"
Resume = bool | Literal["auto"]


@dataclass
class Opening:
    """How a run begins: with which configuration, and whether it continues its folder's checkpoint."""

    cfg: Config
    requested: dict  # the configuration as asked for (before "auto" sizes and fallbacks were resolved)
    resume: bool
    finished: bool = False  # the folder holds a finished model: only its evaluation is left


def open_run(
    cfg: Config, run_dir: Path, resume: Resume, restarts: int, log: Callable[[str], None]
) -> Opening:
    """Decide how the run in ``run_dir`` begins (see the module's rules); reads, never writes."""
    requested = json.loads(json.dumps(cfg.to_dict()))  # tuples as lists, comparable with the checkpoint
    last = run_dir / CHECKPOINT
    has_checkpoint = last.with_suffix(".json").is_file()
    if resume == "auto" or (resume is False and restarts > 0):
        if not has_checkpoint:
            resume = False
        elif _checkpoint_meta(last).get("requested") == requested:
            why = f"restart {restarts}" if restarts else "an earlier attempt"
            log(f"'{run_dir}' holds a checkpoint of this configuration ({why}): continuing it")
            resume = True
        else:
            raise MSFlowError(
                f"run folder '{run_dir}' holds a checkpoint of another configuration; use --resume to "
                "continue it as it was, or another --output"
            )
    if resume:
        if (run_dir / "model.json").is_file():
            return Opening(cfg, requested, True, finished=True)
        if not has_checkpoint:
            raise MSFlowError(f"nothing to resume: '{last.with_suffix('.json')}' does not exist")
        meta = _checkpoint_meta(last)
        # the run's own config, not today's flags
        return Opening(Config.from_dict(meta["config"]), meta.get("requested", requested), True)
    if has_checkpoint or (run_dir / "model.json").exists():
        raise MSFlowError(f"run folder '{run_dir}' already holds a run; use --resume or another --output")
    return Opening(cfg, requested, False)


def save_training_state(
    run_dir: Path, model: MSFlow, optimizer: Optimizer, cfg: Config, state: TrainState, requested: dict
) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    opt = optimizer.state_dict()
    for i, s in opt["state"].items():
        for key, value in s.items():
            tensors[f"optim.{i}.{key}"] = torch.as_tensor(value)
    meta = {"config": cfg.to_dict(), "requested": requested, "param_groups": opt["param_groups"]}
    meta.update(asdict(state))  # the TrainState's fields by name ("plateau" as its dict)
    if not all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point()):
        raise MSFlowError("refusing to write a checkpoint that holds NaN or inf")
    save_tensors(tensors, meta, run_dir / CHECKPOINT)


def load_training_state(run_dir: Path, model: MSFlow, optimizer: Optimizer) -> TrainState:
    tensors, meta = load_tensors(run_dir / CHECKPOINT)
    model_state = migrate_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    model.load_state_dict(model_state, strict=False)
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    kept = {f.name: meta[f.name] for f in fields(TrainState) if f.name in meta}  # older ones lack some
    return TrainState(**{**kept, "plateau": Plateau(**(meta.get("plateau") or {}))})


def trim_train_log(run_dir: Path, epochs: int) -> None:
    """Keep the log lines of the first ``epochs`` epochs: those after the checkpoint are trained again."""
    path = run_dir / "train_log.jsonl"
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("epoch", 0) <= epochs]
    if len(kept) != len(lines):
        path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")


def _checkpoint_meta(last: Path) -> dict:
    try:
        return json.loads(last.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise MSFlowError(f"cannot read the checkpoint '{last.with_suffix('.json')}': {err}") from None
