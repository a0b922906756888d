"""The Task Vector Bases autoencoder: a softmax-activated linear autoencoder trained on ``G``.

Parameters ``A`` (T x M) and ``W`` (M x T). The encoder ``B = softmax(A / temp)`` is taken
over the T tasks for each atom, so every atom ``V B[:, m]`` is a convex combination of task
vectors. The loss ``trace(E^T G E) / T^2`` with ``E = B W - I`` equals
``||V B W - V||_F^2 / T^2``, so training touches only T x T matrices.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tvbasis.errors import TvbasisError
from tvbasis.methods.base import BasisMethod, spectral_floor
from tvbasis.threads import single_torch_thread


def autoencoder_loss(gram: torch.Tensor, encoder: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
    """``trace(E^T G E) / T^2`` with ``E = encoder @ decoder - I``."""
    T = gram.shape[0]
    E = encoder @ decoder - torch.eye(T, dtype=gram.dtype)
    return torch.trace(E.T @ gram @ E) / T**2


class Autoencoder(BasisMethod):
    name = "autoencoder"

    def __init__(
        self,
        n_atoms: int,
        steps: int = 6000,
        lr: float = 1e-2,
        temperature: float = 5.0,
        weight_decay: float = 1e-6,
        anneal_factor: float = 1.0,
        anneal_every: int = 0,
        min_temperature: float = 0.1,
        linear: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(n_atoms, seed)
        if steps < 0:
            raise TvbasisError(f"--steps {steps}: must be >= 0")
        if temperature <= 0:
            raise TvbasisError(f"--temperature {temperature}: must be > 0")
        if lr <= 0:
            raise TvbasisError(f"--lr {lr}: must be > 0")
        if not 0 < anneal_factor <= 1:
            raise TvbasisError(f"--anneal-factor {anneal_factor}: must be in (0, 1]")
        self.steps = int(steps)
        self.lr = float(lr)
        self.temperature = float(temperature)
        self.weight_decay = float(weight_decay)
        self.anneal_factor = float(anneal_factor)
        self.anneal_every = int(anneal_every)
        self.min_temperature = float(min_temperature)
        self.linear = bool(linear)

    def get_params(self) -> dict[str, Any]:
        return {
            **super().get_params(),
            "steps": self.steps,
            "lr": self.lr,
            "temperature": self.temperature,
            "weight_decay": self.weight_decay,
            "anneal_factor": self.anneal_factor,
            "anneal_every": self.anneal_every,
            "min_temperature": self.min_temperature,
            "linear": self.linear,
        }

    def encode(self, A: torch.Tensor, temperature: float) -> torch.Tensor:
        """The encoder B from the raw parameters: softmax over tasks, or A itself if linear."""
        return A if self.linear else torch.softmax(A / temperature, dim=0)

    def fit(self, gram: np.ndarray) -> Autoencoder:
        T = gram.shape[0]
        self.check_n_tasks(T)
        G = torch.from_numpy(np.ascontiguousarray(gram, dtype=np.float64))
        gen = torch.Generator().manual_seed(self.seed)
        A = torch.randn((T, self.n_atoms), generator=gen, dtype=torch.float64).requires_grad_()
        W = torch.zeros((self.n_atoms, T), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([A, W], lr=self.lr, weight_decay=self.weight_decay)
        temp = self.temperature
        history: list[tuple[int, float]] = []
        with single_torch_thread():  # T x T steps: a thread pool only adds wake-up latency
            for step in range(self.steps):
                opt.zero_grad(set_to_none=True)
                loss = autoencoder_loss(G, self.encode(A, temp), W)
                loss.backward()
                opt.step()
                if step % max(1, self.steps // 100) == 0:
                    history.append((step, float(loss.detach())))
                if self.anneal_every > 0 and (step + 1) % self.anneal_every == 0:
                    temp = max(temp * self.anneal_factor, self.min_temperature)
        with torch.no_grad():
            B = self.encode(A, temp)
            self.loss_ = float(autoencoder_loss(G, B, W))
        self.A_ = A.detach().numpy().copy()
        self.encoder_ = B.detach().numpy().copy()
        self.decoder_ = W.detach().numpy().copy()
        self.final_temperature_ = temp
        self.loss_history_ = history
        self.spectral_floor_ = spectral_floor(gram, self.n_atoms)
        return self

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {**super().state_arrays(), "A": self.A_}

    def state_scalars(self) -> dict[str, Any]:
        return {
            **super().state_scalars(),
            "final_temperature": self.final_temperature_,
            "loss": self.loss_,
            "spectral_floor": self.spectral_floor_,
        }

    def load_state(self, arrays: dict[str, np.ndarray], scalars: dict[str, Any], decoder: np.ndarray) -> None:
        super().load_state(arrays, scalars, decoder)
        self.A_ = arrays.get("A")
        self.final_temperature_ = scalars.get("final_temperature")
        self.loss_ = scalars.get("loss")
        self.spectral_floor_ = scalars.get("spectral_floor")

    def report(self) -> dict[str, Any]:
        return {
            "loss": self.loss_,
            "spectral_floor": self.spectral_floor_,
            "final_temperature": self.final_temperature_,
        }
