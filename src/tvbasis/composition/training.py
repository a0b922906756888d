"""Fitting a coefficient model: the ELBO (or plain task loss) by Adam, back-propagated through the frozen model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from tvbasis.composition.coefficients import Composer
from tvbasis.progress import progress

#: ``nll(batch, z)`` -> per-example negative log-likelihood ``[N]`` of the model run with ``z``.
NLL = Callable[[Any, torch.Tensor], torch.Tensor]


def train_composer(
    composer: Composer,
    batches: Iterator[tuple[torch.Tensor, Any]],
    nll: NLL,
    *,
    steps: int,
    lr: float,
    description: str = "Composing",
) -> list[dict[str, float]]:
    """Minimise ``mean(nll) + beta * mean(KL)`` over ``steps`` batches of ``(features, batch)``.

    The relaxed gate's temperature is annealed over the run and kept in the composer's state,
    so a saved composer carries the temperature it finished with. Returns the per-step history.
    """
    params = [p for p in composer.parameters() if p.requires_grad]
    if not params or steps < 1:
        return []
    opt = torch.optim.Adam(params, lr=lr)
    beta = composer.config.beta if composer.config.prior else 0.0
    history: list[dict[str, float]] = []
    composer.train()
    with progress(steps, description, unit="step") as bar:
        for step in range(steps):
            composer.anneal(step / max(steps - 1, 1))
            features, batch = next(batches)
            coef = composer(features)
            task = nll(batch, coef.z).mean()
            kl = coef.kl.mean()
            loss = task + beta * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append({"step": step, "loss": loss.item(), "nll": task.item(), "kl": kl.item()})
            bar.update(1)
    composer.eval()
    return history
