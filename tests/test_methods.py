"""Every basis method against a dense numpy reference that holds V in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common import read_flat, write_family
from tvbasis.build import build_store
from tvbasis.methods import PCA, Autoencoder, Cluster, RandomBasis, Sample, make_method
from tvbasis.methods.autoencoder import autoencoder_gradients, autoencoder_loss
from tvbasis.methods.random import gaussian_rows
from tvbasis.store.format import Store

EXCLUDE = ["head.*"]


def stored_atoms(store: Store, names: list[str]) -> np.ndarray:
    """The K stored vectors as columns of a D x K matrix."""
    cols = [read_flat(store.path / vec["files"][0], names) for vec in store.manifest["atoms"]["vectors"]]
    return np.stack(cols, axis=1)


def recon_dense(store: Store, names: list[str]) -> np.ndarray:
    return stored_atoms(store, names) @ store.decoder


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory):
    return write_family(tmp_path_factory.mktemp("fam"), T=6, rank=3)


def build(family, method, tmp_path: Path, **kw) -> Store:
    return build_store(family.base, family.tasks, method, tmp_path / "store", exclude=EXCLUDE, **kw)


def test_pca_matches_svd_and_reconstructs_exactly_at_M_equals_T(family, tmp_path: Path) -> None:
    V = family.dense()
    T = V.shape[1]
    store = build(family, PCA(T), tmp_path)
    np.testing.assert_allclose(recon_dense(store, family.names), V, atol=1e-5)
    assert max(t["rel_error"] for t in store.manifest["tasks"]) < 1e-5


@pytest.mark.parametrize("M", [1, 3])
def test_pca_atoms_are_scaled_singular_vectors(family, tmp_path: Path, M: int) -> None:
    V = family.dense()
    U, s, Vt = np.linalg.svd(V, full_matrices=False)
    store = build(family, PCA(M), tmp_path)
    S = stored_atoms(store, family.names)
    for m in range(M):
        ref = U[:, m] * s[m]
        sign = np.sign(Vt[m].sum())  # the sign rule: coefficients sum to >= 0
        np.testing.assert_allclose(S[:, m], sign * ref, atol=1e-4 * s[0])
        assert store.decoder[m].sum() >= 0
    best = U[:, :M] @ np.diag(s[:M]) @ Vt[:M]
    np.testing.assert_allclose(recon_dense(store, family.names), best, atol=1e-4)


def test_centred_pca_stores_the_mean_and_counts_it(family, tmp_path: Path) -> None:
    V = family.dense()
    T = V.shape[1]
    store = build(family, PCA(2, center=True), tmp_path)
    assert store.has_mean and store.manifest["n_vectors"] == 3
    S = stored_atoms(store, family.names)
    np.testing.assert_allclose(S[:, -1], V.mean(axis=1), atol=1e-6)
    mu = V.mean(axis=1, keepdims=True)
    U, s, Vt = np.linalg.svd(V - mu, full_matrices=False)
    ref = mu + U[:, :2] @ np.diag(s[:2]) @ Vt[:2]
    np.testing.assert_allclose(recon_dense(store, family.names), ref, atol=1e-4)
    files = store.manifest["files"]
    assert any(f.startswith("atoms/mean") for f in files)
    assert store.manifest["bytes"]["atoms"] == sum(v for f, v in files.items() if f.startswith("atoms/"))
    full = build_store(family.base, family.tasks, PCA(T - 1, center=True), tmp_path / "full", exclude=EXCLUDE)
    np.testing.assert_allclose(recon_dense(full, family.names), V, atol=1e-5)


def test_autoencoder_loss_is_the_dense_reconstruction_loss_and_above_the_floor(family, tmp_path: Path) -> None:
    V = family.dense()
    T = V.shape[1]
    ae = Autoencoder(3, steps=400, seed=3)
    store = build(family, ae, tmp_path)
    B, W = ae.encoder_, ae.decoder_
    dense = np.linalg.norm(V @ B @ W - V) ** 2 / T**2
    assert ae.loss_ == pytest.approx(dense, rel=1e-8)
    assert ae.loss_ >= ae.spectral_floor_ - 1e-12
    lam = np.linalg.eigvalsh(V.T @ V)[::-1]
    assert ae.spectral_floor_ == pytest.approx(lam[3:].sum() / T**2, rel=1e-8)
    # atoms are convex combinations of task vectors
    np.testing.assert_allclose(B.sum(axis=0), 1.0, atol=1e-12)
    assert (B >= 0).all()
    np.testing.assert_allclose(stored_atoms(store, family.names), V @ B, atol=1e-5)
    assert autoencoder_loss(V.T @ V, B, W) == pytest.approx(dense, rel=1e-8)


def _torch_reference_fit(G: np.ndarray, ae: Autoencoder) -> tuple[np.ndarray, np.ndarray, float]:
    """The reference training loop: autograd on the dense loss, ``torch.optim.Adam``."""
    T = G.shape[0]
    Gt = torch.from_numpy(G)
    gen = torch.Generator().manual_seed(ae.seed)
    A = torch.randn((T, ae.n_atoms), generator=gen, dtype=torch.float64).requires_grad_()
    W = torch.zeros((ae.n_atoms, T), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([A, W], lr=ae.lr, weight_decay=ae.weight_decay)
    temp = ae.temperature
    for step in range(ae.steps):
        opt.zero_grad()
        B = A if ae.linear else torch.softmax(A / temp, dim=0)
        E = B @ W - torch.eye(T, dtype=torch.float64)
        (torch.trace(E.T @ Gt @ E) / T**2).backward()
        opt.step()
        if ae.anneal_every > 0 and (step + 1) % ae.anneal_every == 0:
            temp = max(temp * ae.anneal_factor, ae.min_temperature)
    return A.detach().numpy(), W.detach().numpy(), temp


@pytest.mark.parametrize(
    "kw", [{}, {"linear": True}, {"anneal_factor": 0.7, "anneal_every": 25, "weight_decay": 1e-2, "seed": 3}]
)
def test_autoencoder_training_matches_torch_autograd_and_adam(family, kw: dict) -> None:
    V = family.dense()
    G = V.T @ V
    ae = Autoencoder(3, steps=300, **kw).fit(G)
    A, W, temp = _torch_reference_fit(G, ae)
    assert ae.final_temperature_ == pytest.approx(temp)
    np.testing.assert_allclose(ae.A_, A, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(ae.decoder_, W, rtol=1e-7, atol=1e-9)


def test_autoencoder_gradients_match_autograd(family) -> None:
    V = family.dense()
    G = V.T @ V
    rng = np.random.default_rng(0)
    B, W = rng.random((G.shape[0], 2)), rng.standard_normal((2, G.shape[0]))
    loss, grad_B, grad_W = autoencoder_gradients(G, B, W)
    Bt, Wt = torch.from_numpy(B).requires_grad_(), torch.from_numpy(W).requires_grad_()
    E = Bt @ Wt - torch.eye(G.shape[0], dtype=torch.float64)
    ref = torch.trace(E.T @ torch.from_numpy(G) @ E) / G.shape[0] ** 2
    ref.backward()
    assert loss == pytest.approx(float(ref.detach()), rel=1e-12)
    np.testing.assert_allclose(grad_B, Bt.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(grad_W, Wt.grad.numpy(), rtol=1e-10)


def test_autoencoder_is_deterministic_and_saves_annealed_temperature(family, tmp_path: Path) -> None:
    G = family.dense().T @ family.dense()
    a = Autoencoder(2, steps=50, seed=7, anneal_factor=0.5, anneal_every=10).fit(G)
    b = Autoencoder(2, steps=50, seed=7, anneal_factor=0.5, anneal_every=10).fit(G)
    np.testing.assert_array_equal(a.encoder_, b.encoder_)
    assert a.final_temperature_ == pytest.approx(5.0 * 0.5**5)
    floor = Autoencoder(2, steps=100, anneal_factor=0.1, anneal_every=1).fit(G)
    assert floor.final_temperature_ == pytest.approx(0.1)


def test_linear_autoencoder_approaches_the_spectral_floor(family) -> None:
    G = family.dense().T @ family.dense()
    ae = Autoencoder(2, steps=3000, linear=True, lr=2e-2).fit(G)
    assert ae.loss_ >= ae.spectral_floor_ - 1e-12
    assert ae.loss_ <= ae.spectral_floor_ * 1.05 + 1e-9


def test_random_basis_matches_dense_reference_and_stores_no_atoms(family, tmp_path: Path) -> None:
    V = family.dense()
    store = build(family, RandomBasis(3, seed=11), tmp_path)
    assert not store.manifest["atoms"]["stored"]
    assert not any(f.startswith("atoms/") for f in store.manifest["files"])
    shapes = dict(zip(family.names, [tuple(family.base_state[n].shape) for n in family.names], strict=True))
    R = np.concatenate([gaussian_rows(11, n, 0, max(int(np.prod(shapes[n])), 1), 3).numpy() for n in family.names])
    evals, U = np.linalg.eigh(R.T @ R)
    Q = R @ (U / np.sqrt(evals)) @ U.T
    np.testing.assert_allclose(Q.T @ Q, np.eye(3), atol=1e-10)
    np.testing.assert_allclose(store.decoder, Q.T @ V, atol=1e-8)
    for t, task in enumerate(store.manifest["tasks"]):
        err = np.linalg.norm(V[:, t] - Q @ (Q.T @ V[:, t])) / np.linalg.norm(V[:, t])
        assert task["rel_error"] == pytest.approx(err, rel=1e-6)


def test_sample_reconstructs_every_task_by_least_squares(family, tmp_path: Path) -> None:
    V = family.dense()
    sample = Sample(3, seed=5)
    store = build(family, sample, tmp_path)
    idx = sample.indices_
    assert len(set(idx.tolist())) == 3
    np.testing.assert_allclose(stored_atoms(store, family.names), V[:, idx], atol=1e-6)
    W_ref = np.linalg.lstsq(V[:, idx], V, rcond=None)[0]
    np.testing.assert_allclose(store.decoder, W_ref, atol=1e-6)
    for t in idx:  # the chosen tasks are reconstructed exactly
        assert store.manifest["tasks"][t]["rel_error"] < 1e-6


def test_cluster_mean_groups_correlated_tasks(tmp_path: Path) -> None:
    fam = write_family(tmp_path / "f", T=6, rank=None)
    # make tasks 0-2 and 3-5 two tight groups
    V = fam.dense()
    G = V.T @ V
    G2 = G.copy()
    for group in ((0, 1, 2), (3, 4, 5)):
        for i in group:
            for j in group:
                if i != j:
                    G2[i, j] = 0.9 * np.sqrt(G[i, i] * G[j, j])
    labels = Cluster(2).fit(G2).labels_
    assert len(set(labels[:3].tolist())) == 1 and len(set(labels[3:].tolist())) == 1 and labels[0] != labels[3]
    spectral = Cluster(2, algorithm="spectral", seed=1).fit(G2).labels_
    np.testing.assert_array_equal(spectral, labels)
    cl = Cluster(2)
    store = build_store(fam.base, fam.tasks, cl, tmp_path / "s", exclude=EXCLUDE)
    B = cl.encoder_
    np.testing.assert_allclose(stored_atoms(store, fam.names), V @ B, atol=1e-6)
    S = V @ B
    np.testing.assert_allclose(store.decoder, np.linalg.lstsq(S, V, rcond=None)[0], atol=1e-6)


def test_cluster_ties_matches_dense_ties(family, tmp_path: Path) -> None:
    V = family.dense()
    cl = Cluster(2, merge="ties", density=0.3)
    store = build(family, cl, tmp_path)
    thr = cl.thresholds_
    for t in range(V.shape[1]):  # the histogram threshold is the exact quantile to within one bin
        q = np.sort(np.abs(V[:, t]))[::-1][int(np.ceil(0.3 * V.shape[0])) - 1]
        assert q * 2 ** (-1 / 16) <= thr[t] <= q
        assert np.mean(np.abs(V[:, t]) >= thr[t]) >= 0.3
    S = stored_atoms(store, family.names)
    for k in range(2):
        members = np.nonzero(cl.labels_ == k)[0]
        X = V[:, members]
        trimmed = np.where(np.abs(X) >= thr[members], X, 0.0)
        sign = np.sign(trimmed.sum(1, keepdims=True))
        agree = (np.sign(trimmed) == sign) & (trimmed != 0)
        ref = (trimmed * agree).sum(1) / np.maximum(agree.sum(1), 1)
        np.testing.assert_allclose(S[:, k], ref, atol=1e-6)


@pytest.mark.parametrize("name", ["autoencoder", "pca", "sample", "cluster"])  # random: test_engine
def test_each_method_is_deterministic_given_its_seed(family, name: str) -> None:
    G = family.dense().T @ family.dense()
    kw = {"steps": 30} if name == "autoencoder" else {}
    a, b = make_method(name, 2, seed=4, **kw).fit(G), make_method(name, 2, seed=4, **kw).fit(G)
    np.testing.assert_array_equal(a.decoder_, b.decoder_)
