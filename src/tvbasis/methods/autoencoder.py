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


def autoencoder_loss(gram: np.ndarray, encoder: np.ndarray, decoder: np.ndarray) -> float:
    """``trace(E^T G E) / T^2`` with ``E = encoder @ decoder - I``."""
    return autoencoder_gradients(gram, encoder, decoder)[0]


def autoencoder_gradients(
    gram: np.ndarray, encoder: np.ndarray, decoder: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """The loss and its gradients with respect to the encoder B and the decoder W.

    With ``E = B W - I`` and G symmetric, ``dL/dE = 2 G E / T^2``, so ``dL/dB = dL/dE W^T``
    and ``dL/dW = B^T dL/dE``.
    """
    T = gram.shape[0]
    E = encoder @ decoder
    E[np.diag_indices(T)] -= 1.0
    GE = gram @ E
    loss = float(np.vdot(E, GE)) / T**2
    grad_E = GE * (2.0 / T**2)
    return loss, grad_E @ decoder.T, encoder.T @ grad_E


def _softmax_columns(Z: np.ndarray) -> np.ndarray:
    e = np.exp(Z - Z.max(axis=0))
    return e / e.sum(axis=0)


def _softmax_columns_backward(B: np.ndarray, grad_B: np.ndarray) -> np.ndarray:
    """Gradient with respect to the softmax's input Z, given ``B = softmax(Z)`` over each column."""
    return B * (grad_B - (grad_B * B).sum(axis=0))


class _Adam:
    """``torch.optim.Adam`` (default betas and eps, L2 weight decay) on one numpy array, in place."""

    def __init__(self, param: np.ndarray, lr: float, weight_decay: float) -> None:
        self.param, self.lr, self.weight_decay = param, lr, weight_decay
        self.beta1, self.beta2, self.eps = 0.9, 0.999, 1e-8
        self.m = np.zeros_like(param)
        self.v = np.zeros_like(param)
        self.t = 0

    def step(self, grad: np.ndarray) -> None:
        self.t += 1
        if self.weight_decay:
            grad = grad + self.weight_decay * self.param
        self.m *= self.beta1
        self.m += (1 - self.beta1) * grad
        self.v *= self.beta2
        self.v += (1 - self.beta2) * grad * grad
        step_size = self.lr / (1 - self.beta1**self.t)
        denom = np.sqrt(self.v) / np.sqrt(1 - self.beta2**self.t) + self.eps
        self.param -= step_size * self.m / denom


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

    def encode(self, A: np.ndarray, temperature: float) -> np.ndarray:
        """The encoder B from the raw parameters: softmax over tasks, or A itself if linear."""
        return A if self.linear else _softmax_columns(A / temperature)

    def fit(self, gram: np.ndarray) -> Autoencoder:
        """Adam on ``(A, W)`` with the loss's closed-form gradient.

        The parameters are T x M, so a step is a dozen tiny matrix operations; numpy does
        them in microseconds where an autograd step costs half a millisecond, and 6000 steps
        would otherwise take longer than streaming a 50M-parameter model twice. The update
        is ``torch.optim.Adam``'s (L2 weight decay added to the gradient, bias-corrected
        moments); the tests check gradient and trajectory against torch autograd and Adam.
        """
        T = gram.shape[0]
        self.check_n_tasks(T)
        G = np.ascontiguousarray(gram, dtype=np.float64)
        gen = torch.Generator().manual_seed(self.seed)
        A = torch.randn((T, self.n_atoms), generator=gen, dtype=torch.float64).numpy()
        W = np.zeros((self.n_atoms, T))
        adam = [_Adam(A, self.lr, self.weight_decay), _Adam(W, self.lr, self.weight_decay)]
        temp = self.temperature
        history: list[tuple[int, float]] = []
        for step in range(self.steps):
            B = self.encode(A, temp)
            loss, grad_B, grad_W = autoencoder_gradients(G, B, W)
            grad_A = grad_B if self.linear else _softmax_columns_backward(B, grad_B) / temp
            adam[0].step(grad_A)
            adam[1].step(grad_W)
            if step % max(1, self.steps // 100) == 0:
                history.append((step, loss))
            if self.anneal_every > 0 and (step + 1) % self.anneal_every == 0:
                temp = max(temp * self.anneal_factor, self.min_temperature)
        B = self.encode(A, temp)
        self.loss_ = autoencoder_loss(G, B, W)
        self.A_ = A.copy()
        self.encoder_ = B.copy()
        self.decoder_ = W.copy()
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
