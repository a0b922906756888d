"""Coefficient models: where the composition coefficients ``z`` (``[N, K, P]``) come from.

- ``task-arithmetic``: one ``lam`` for every direction and block, chosen by grid search;
- ``atlas``: learned ``[K, P]`` coefficients shared by all inputs (aTLAS);
- ``per-sample``: an amortised network maps the frozen base's features ``f(x)`` to ``z``;
- ``variational``: the same network gives a spike-and-slab posterior per coefficient (SPEC
  section 6): a Gaussian slab ``N(mu, sigma^2)`` times a Bernoulli inclusion with probability
  ``pi = sigmoid(gamma)``; training samples it with a relaxed (concrete) gate and pays
  ``beta * KL(q || p)`` against the prior ``pi_0 N(0, s_0^2) + (1 - pi_0) delta_0``; inference keeps a
  coefficient only when ``pi >= min_inclusion`` and ``sigma / |mu| <= max_uncertainty``, at its mean,
  so it is deterministic and sparse. ``prior=False`` drops the KL (``beta = 0``); ``gate=False``
  drops the inclusion variables (a Gaussian posterior, inference at the mean).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tvbasis.errors import TvbasisError

KINDS = ("task-arithmetic", "atlas", "per-sample", "variational")


@dataclass
class ComposerConfig:
    """Hyperparameters of a coefficient model (saved with it)."""

    kind: str = "variational"
    init: float = 0.3  # starting coefficient (the usual task-arithmetic lam)
    hidden: int = 128
    prior: bool = True
    gate: bool = True
    beta: float = 0.01  # weight of the KL, per coefficient, against the per-sample task loss
    prior_inclusion: float = 0.5
    prior_scale: float = 1.0
    init_inclusion: float = 0.9
    init_sigma: float = 0.05
    temperature: tuple[float, float] = (1.0, 0.2)  # relaxed gate: annealed from first to second
    min_inclusion: float = 0.5
    max_uncertainty: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TvbasisError(f"--kind {self.kind!r}: choose one of {', '.join(KINDS)}")
        self.temperature = tuple(float(t) for t in self.temperature)  # type: ignore[assignment]
        if not (0 < self.prior_inclusion < 1 and 0 < self.init_inclusion < 1):
            raise TvbasisError("prior_inclusion and init_inclusion must lie strictly between 0 and 1")
        if self.prior_scale <= 0 or self.init_sigma <= 0 or min(self.temperature) <= 0 or self.beta < 0:
            raise TvbasisError("prior_scale, init_sigma and temperature must be > 0 and beta >= 0")

    def to_json(self) -> dict:
        d = asdict(self)
        d["temperature"] = list(self.temperature)
        return d

    @property
    def stochastic(self) -> bool:
        return self.kind == "variational"


@dataclass
class Coefficients:
    """One batch's coefficients, the per-sample KL (0 when there is none) and, at inference, which were kept."""

    z: torch.Tensor  # [N, K, P] or [1, K, P]
    kl: torch.Tensor  # [N] or scalar 0
    kept: torch.Tensor | None = None  # bool, like z


def bernoulli_kl(pi: torch.Tensor, pi0: float) -> torch.Tensor:
    """``KL(Bern(pi) || Bern(pi0))``, elementwise."""
    eps = 1e-6
    pi = pi.clamp(eps, 1 - eps)
    return pi * (torch.log(pi) - math.log(pi0)) + (1 - pi) * (torch.log1p(-pi) - math.log1p(-pi0))


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, s0: float) -> torch.Tensor:
    """``KL(N(mu, sigma^2) || N(0, s0^2))``, elementwise."""
    return 0.5 * ((logvar.exp() + mu**2) / s0**2 - 1.0 - logvar + 2 * math.log(s0))


def spike_slab_kl(mu: torch.Tensor, logvar: torch.Tensor, pi: torch.Tensor, pi0: float, s0: float) -> torch.Tensor:
    """Bernoulli KL plus the inclusion-weighted Gaussian KL (the slab's KL counts only when included)."""
    return bernoulli_kl(pi, pi0) + pi * gaussian_kl(mu, logvar, s0)


def relaxed_bernoulli(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """A concrete (Gumbel-sigmoid) sample in (0, 1) that carries gradient to ``logits``."""
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)


class Composer(nn.Module):
    """Maps features ``[N, F]`` to :class:`Coefficients` for K directions and P blocks."""

    def __init__(self, config: ComposerConfig, n_directions: int, n_blocks: int, n_features: int) -> None:
        super().__init__()
        self.config, self.k, self.p, self.n_features = config, n_directions, n_blocks, n_features
        self.register_buffer("temperature", torch.tensor(config.temperature[0]))
        kp = n_directions * n_blocks
        if config.kind in ("task-arithmetic", "atlas"):
            self.shared = nn.Parameter(torch.full((n_directions, n_blocks), float(config.init)))
            if config.kind == "task-arithmetic":
                self.shared.requires_grad_(False)  # one lam, set by grid search
            return
        self.trunk = nn.Sequential(nn.Linear(n_features, config.hidden), nn.GELU())
        self.mu = nn.Linear(config.hidden, kp)
        nn.init.normal_(self.mu.weight, std=0.01)
        nn.init.constant_(self.mu.bias, config.init)
        if config.stochastic:
            self.logvar = nn.Linear(config.hidden, kp)
            nn.init.normal_(self.logvar.weight, std=0.01)
            nn.init.constant_(self.logvar.bias, 2 * math.log(config.init_sigma))
            if config.gate:
                self.gamma = nn.Linear(config.hidden, kp)
                nn.init.normal_(self.gamma.weight, std=0.01)
                p = config.init_inclusion
                nn.init.constant_(self.gamma.bias, math.log(p / (1 - p)))

    @property
    def per_sample(self) -> bool:
        return self.config.kind in ("per-sample", "variational")

    def set_lambda(self, lam: float) -> None:
        """Task arithmetic's single coefficient."""
        with torch.no_grad():
            self.shared.fill_(lam)

    def posterior(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """``mu`` (and ``logvar``, ``pi``) of every coefficient, each ``[N, K, P]``."""
        if features.dim() != 2 or features.shape[1] != self.n_features:
            raise TvbasisError(f"composer: features must be [N, {self.n_features}], got {list(features.shape)}")
        h = self.trunk(features)
        shape = (features.shape[0], self.k, self.p)
        out = {"mu": self.mu(h).view(shape)}
        if self.config.stochastic:
            out["logvar"] = self.logvar(h).view(shape).clamp(-20.0, 5.0)
            if self.config.gate:
                out["pi"] = torch.sigmoid(self.gamma(h).view(shape))
        return out

    def forward(self, features: torch.Tensor) -> Coefficients:
        """Training mode samples (variational); eval mode gives the deterministic, gated coefficients."""
        cfg = self.config
        zero = features.new_zeros(())
        if not self.per_sample:
            return Coefficients(self.shared[None], zero)
        post = self.posterior(features)
        mu = post["mu"]
        if not cfg.stochastic:
            return Coefficients(mu, zero)
        logvar, pi = post["logvar"], post.get("pi")
        if cfg.prior:
            kl_each = (
                spike_slab_kl(mu, logvar, pi, cfg.prior_inclusion, cfg.prior_scale)
                if pi is not None
                else (gaussian_kl(mu, logvar, cfg.prior_scale))
            )
            kl = kl_each.flatten(1).mean(1)
        else:
            kl = zero
        if self.training:
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
            if pi is not None:
                z = z * relaxed_bernoulli(torch.logit(pi, eps=1e-6), float(self.temperature))
            return Coefficients(z, kl)
        if pi is None:
            return Coefficients(mu, kl, torch.ones_like(mu, dtype=torch.bool))
        sigma = (0.5 * logvar).exp()
        kept = (pi >= cfg.min_inclusion) & (sigma <= cfg.max_uncertainty * mu.abs())
        return Coefficients(torch.where(kept, mu, torch.zeros_like(mu)), kl, kept)

    def anneal(self, fraction: float) -> None:
        """Set the relaxed gate's temperature for training progress ``fraction`` in [0, 1] (geometric)."""
        t0, t1 = self.config.temperature
        self.temperature.fill_(t0 * (t1 / t0) ** min(max(fraction, 0.0), 1.0))


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy."""
    return F.cross_entropy(logits, labels, reduction="none")
