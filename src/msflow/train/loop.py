"""The training loop of the flows, from cached features.

The backbone is frozen and there is no augmentation, so each training image's features are extracted
once into a :class:`~msflow.features.FeatureCache` and the flows train from it; the official code ran
(and back-propagated through) the backbone at every step (docs/official-code-differences.md, B8).
The schedule (``msflow.train.schedule``) is a pure function of the epoch and the plateau state, both
saved in checkpoints, so ``--resume`` lands exactly where it left off (B7). Non-finite losses roll back
to the last good state and lower the learning rate.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from msflow.config import TrainConfig
from msflow.errors import TrainingError
from msflow.logs import Progress, duration, log
from msflow.model.loss import nll
from msflow.model.msflow import MSFlow
from msflow.train.distributed import Distributed
from msflow.train.features import FeatureCache
from msflow.train.schedule import Plateau, lr_factor, total_epochs


def make_optimizer(params: list[torch.nn.Parameter], lr: float, device: torch.device) -> torch.optim.Adam:
    """The flows' optimizer: Adam (no weight decay, as official) with torch's multi-tensor (foreach) kernels.

    They update all parameters with a few batched ops instead of a dozen element-wise ops per tensor:
    on the 2-core CPU foreach Adam made an EfficientNet-Lite0 training step ~12-20 % faster than the
    per-tensor loop (``benchmarks/train_profile.py``), with Adam's arithmetic. torch's fused kernel was
    as fast but a run resumed from a checkpoint then drifted from the uninterrupted one (the global
    references differed beyond 1e-5 in tests/test_distributed.py), so it is not used.
    """
    return torch.optim.Adam(params, lr=lr, foreach=True)


@dataclass
class TrainState:
    """What a resumed run needs besides the weights: where it is and what happened so far."""

    epoch: int = 0  # epochs completed
    lr_scale: float = 1.0  # lowered after each non-finite event
    bad_events: int = 0
    history: list[dict] = field(default_factory=list)  # one entry per epoch: loss, lr, seconds
    plateau: Plateau = field(default_factory=Plateau)  # the plateau rule's state (stop="plateau")


StepHook = Callable[[int, int, list[torch.Tensor]], list[torch.Tensor]]


def train_flows(
    model: MSFlow,
    cache: FeatureCache,
    cfg: TrainConfig,
    device: torch.device,
    state: TrainState,
    optimizer: torch.optim.Optimizer,
    on_epoch_end: Callable[[TrainState], None] | None = None,
    step_hook: StepHook | None = None,
    progress: bool = True,
    dist: Distributed | None = None,
    holdout: FeatureCache | None = None,
) -> TrainState:
    """Train the flows from cached features for epochs ``state.epoch`` to the end of the schedule.

    Arguments:
        on_epoch_end: called after every epoch (checkpointing, optional evaluation).
        step_hook: ``(epoch, step, feats) -> feats``, a seam for fault-injection tests.
        dist: data-parallel training (torchrun): each global batch is split across ranks and the
            gradients averaged by DDP, so the steps are those of one process (see ``distributed.py``).
        holdout: features of the good images held out from training; with ``stop="plateau"`` their
            NLL after each epoch decides the schedule's length (without them, the training loss does).
    """
    dist = dist or Distributed()
    flow = dist.wrap_flows(model)
    use_amp = cfg.amp and device.type == "cuda"  # float16 + loss scaling
    use_bf16 = cfg.cpu_bf16 and device.type == "cpu"  # bfloat16 needs no loss scaling
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    params = model.trainable_parameters()
    good = _snapshot(model, optimizer)
    while state.epoch < total_epochs(cfg, state.plateau):
        epoch = state.epoch
        lr = cfg.lr * lr_factor(epoch, cfg, state.plateau) * state.lr_scale
        for group in optimizer.param_groups:
            group["lr"] = lr
        # A generator per epoch: the order depends only on (seed, epoch), so a resumed run is identical.
        order = torch.randperm(len(cache), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        batches = order.split(cfg.batch_size)
        # A bar within the epoch on a terminal; the epoch's own line below, wherever the output goes.
        bar = Progress(batches, f"epoch {epoch + 1}/{total_epochs(cfg, state.plateau)}", unit="batches",
                       enabled=progress, summary=False)  # fmt: skip
        total, count, start, rolled_back = 0.0, 0, time.perf_counter(), False
        for step, idx in enumerate(bar):
            feats = [f.to(device, non_blocking=True) for f in cache.batch(dist.split_batch(idx))]
            if step_hook is not None:
                feats = step_hook(epoch, step, feats)
            with torch.autocast(
                device.type, dtype=torch.bfloat16 if use_bf16 else None, enabled=use_amp or use_bf16
            ):
                out = flow(feats)
            # The loss is summed over ~10^5-10^6 dims: compute it in float32 even under AMP.
            losses = nll([z.float() for z in out.zs], out.log_det.float())
            batch_sum = dist.batch_sum(losses)  # whole global batch: every rank decides the same
            loss = dist.batch_loss(losses, len(idx))
            if not torch.isfinite(batch_sum):
                _bad_event(
                    model, optimizer, good, state, cfg, f"non-finite loss at epoch {epoch + 1}, step {step}"
                )
                rolled_back = True
                break
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if not torch.isfinite(grad_norm) and not use_amp:  # under AMP the scaler skips the step itself
                _bad_event(
                    model,
                    optimizer,
                    good,
                    state,
                    cfg,
                    f"non-finite gradient at epoch {epoch + 1}, step {step}",
                )
                rolled_back = True
                break
            scaler.step(optimizer)
            scaler.update()
            total += batch_sum.item()
            count += len(idx)
            bar.set_postfix(loss=f"{total / count:.4g}", img_s=f"{count / (time.perf_counter() - start):.1f}")
        if rolled_back:
            continue  # redo this epoch from the restored state with the lowered learning rate
        entry = {"epoch": epoch + 1, "loss": total / max(count, 1), "lr": lr}
        if cfg.stop == "plateau":
            entry.update(_plateau_step(model, holdout, entry["loss"], epoch + 1, cfg, state, device))
        entry["seconds"] = time.perf_counter() - start
        state.history.append(entry)
        state.epoch += 1
        if progress:
            _log_epoch(entry, count, total_epochs(cfg, state.plateau), state.history)
        good = _snapshot(model, optimizer)
        if on_epoch_end is not None:
            on_epoch_end(state)
    return state


def _log_epoch(entry: dict, images: int, epochs: int, history: list[dict]) -> None:
    """One line per epoch: loss, speed and the time left at the mean pace of the last epochs."""
    recent = [e["seconds"] for e in history[-5:]]
    left = (epochs - entry["epoch"]) * sum(recent) / len(recent)
    held_out = f", held-out NLL {entry['holdout_nll']:.4g}" if "holdout_nll" in entry else ""
    log.info(
        f"epoch {entry['epoch']}/{epochs}: loss {entry['loss']:.4g}{held_out}, "
        f"{images / max(entry['seconds'], 1e-9):.1f} images/s, {duration(left)} left"
    )


@torch.no_grad()
def holdout_nll(model: MSFlow, holdout: FeatureCache, device: torch.device, batch_size: int = 32) -> float:
    """Mean negative log-likelihood of the held-out features, in nats per latent dimension."""
    total, dims, count = 0.0, 0, 0
    for feats in holdout.batches(batch_size):
        out = model.flow([f.to(device) for f in feats])
        total += nll([z.float() for z in out.zs], out.log_det.float()).sum().item()
        dims = sum(z[0].numel() for z in out.zs)
        count += len(feats[0])
    return total / (count * dims)


def _plateau_step(
    model: MSFlow,
    holdout: FeatureCache | None,
    train_loss: float,
    epoch: int,
    cfg: TrainConfig,
    state: TrainState,
    device: torch.device,
) -> dict:
    """Measure the held-out NLL after ``epoch`` and feed the plateau rule (which reads the values of every
    epoch so far, kept in the history: a resumed run decides the same); the log entry's fields."""
    if holdout is not None and len(holdout):
        value, key = holdout_nll(model, holdout, device), "holdout_nll"
    else:  # no held-out images: the training loss per dimension stands in (it cannot show overfitting)
        value, key = train_loss / sum(c * h * w for c, h, w in model.feature_shapes), "train_nll_per_dim"
    fields: dict = {key: value}
    values = [e[key] for e in state.history if key in e] + [value]  # this epoch is not in the history yet
    if state.plateau.update(values, cfg):
        fields["plateau_at"] = epoch
        fields["schedule_epochs"] = total_epochs(cfg, state.plateau)
    return fields


def _snapshot(model: MSFlow, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    trainable = {
        k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")
    }
    return trainable, copy.deepcopy(optimizer.state_dict())


def _bad_event(
    model: MSFlow,
    optimizer: torch.optim.Optimizer,
    good: tuple[dict, dict],
    state: TrainState,
    cfg: TrainConfig,
    what: str,
) -> None:
    """Restore the last good state and halve the learning rate; give up after ``max_bad_steps``."""
    state.bad_events += 1
    if state.bad_events > cfg.max_bad_steps:
        raise TrainingError(f"{what}: {state.bad_events} non-finite events, giving up (lower --lr?)")
    model.load_state_dict(good[0], strict=False)
    optimizer.load_state_dict(good[1])
    state.lr_scale *= 0.5
    log.warning(f"{what}; restored the last good state, learning rate x{state.lr_scale:g}")
