"""Pieces of the suites' fine-tuning loops that do not depend on the model (text or vision)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch


def optimizer_step(
    loss: torch.Tensor,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    params: Sequence[torch.nn.Parameter],
    grad_clip: float | None,
) -> float:
    """One step on ``loss``: clear the gradients, backpropagate, clip (when asked), step both; the loss value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    sched.step()
    return loss.item()


def training_stats(losses: Sequence[float], train_s: float, t0: float) -> dict[str, Any]:
    """What a fine-tune's marker records of its run: steps, seconds, and the mean of the first / last 5 losses."""
    k = max(1, min(5, len(losses)))
    return {
        "steps": len(losses),
        "train_seconds": round(train_s, 3),
        "total_seconds": round(time.perf_counter() - t0, 3),
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
    }
