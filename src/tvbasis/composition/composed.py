"""Run a frozen base model with per-sample combinations of K weight directions, without per-sample weights.

For a sample n with coefficients ``z[n, k, p]`` (K directions, P parameter blocks), the model
computes with ``theta_0 + sum_k z[n, k, block(w)] * d_k[w]`` for every weight ``w``, but never
builds those weights. Each module whose parameters carry directions is swapped for a version
that adds the directions' effect on its *output*:

- linear: ``y = x W_0^T + b_0 + sum_k z_k (x dW_k^T + db_k)`` as one GEMM of the z-scaled inputs
  against all K deltas side by side (``[out, K * in]``), a single batched contraction (SPEC section 6);
  with low-rank directions ``dW_k ~ U_k V_k^T`` the same runs through the factors;
- embedding: ``E_0[ids] + sum_k z_k dE_k[ids]`` (a gather, no extra matmul);
- layer norm: the normalised input times ``g_0 + sum_k z_k dg_k`` plus ``b_0 + sum_k z_k db_k``.

Base weights and directions are frozen buffers; only ``z`` (set per batch with
:meth:`ComposedModel.coefficients`) carries gradient, so a composer is trained by
back-propagating through the frozen network to ``z``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from tvbasis.errors import TvbasisError


class _Context:
    """The coefficients of the batch being run, shared by every swapped module."""

    def __init__(self) -> None:
        self.z: torch.Tensor | None = None  # [N, K, P]
        self.shared = False  # one z for the whole batch ([1, K, P])

    def block(self, p: int, n: int) -> torch.Tensor:
        if self.z is None:
            raise TvbasisError("ComposedModel: run it inside `with model.coefficients(z):`")
        z = self.z[:, :, p]
        if z.shape[0] != n:
            if z.shape[0] == 1:
                return z.expand(n, -1)
            raise TvbasisError(f"ComposedModel: coefficients for {z.shape[0]} samples, batch of {n}")
        return z


def _stack(directions: Mapping[str, torch.Tensor], name: str, k: int, shape: torch.Size) -> torch.Tensor | None:
    d = directions.get(name)
    if d is None:
        return None
    if tuple(d.shape) != (k, *shape):
        raise TvbasisError(f"direction {name!r} has shape {list(d.shape)}, expected {[k, *shape]}")
    return d.detach().to(torch.float32).contiguous()


class ComposedLinear(nn.Module):
    """``nn.Linear`` plus ``sum_k z_k (x dW_k^T + db_k)``, exact or through rank-r factors."""

    def __init__(
        self,
        base: nn.Linear,
        ctx: _Context,
        dw: torch.Tensor | None,
        db: torch.Tensor | None,
        block_w: int,
        block_b: int,
        factors: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.ctx, self.block_w, self.block_b = ctx, block_w, block_b
        self.register_buffer("weight", base.weight.detach())
        self.register_buffer("bias", None if base.bias is None else base.bias.detach())
        out_f, in_f = base.weight.shape
        self.k = (dw if dw is not None else db).shape[0] if (dw is not None or db is not None) else 0
        # Exact: the K deltas side by side as one [out, K * in] weight. The input scaled by each
        # sample's z_k and laid side by side, [N, L, K * in], times it is sum_k z_k x dW_k^T: one GEMM
        # whose output is [N, L, out] (stacking the deltas by output rows would write K times as much).
        self.register_buffer("dw_cat", None if dw is None else dw.permute(1, 0, 2).reshape(out_f, -1).contiguous())
        self.register_buffer("db", db)
        self.low_rank = factors is not None
        if factors is not None:
            u, v = factors  # u [K, out, r], v [K, r, in]
            self.rank = v.shape[1]
            self.register_buffer("v_stacked", v.reshape(-1, in_f).contiguous())  # [K * r, in]
            # [K * r, out]: row (k, j) is column j of U_k
            self.register_buffer("u_stacked", u.permute(0, 2, 1).reshape(-1, out_f).contiguous())
        self.out_features = out_f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        n = x.shape[0]
        if self.ctx.shared:
            # One z for the whole batch: merging the weight once is cheaper than K extra GEMMs.
            z1 = self.ctx.z[0, :, self.block_w]
            if self.dw_cat is not None:
                dw = (self.dw_cat.view(self.out_features, self.k, -1) * z1[None, :, None]).sum(1)
            elif self.low_rank:
                dw = (self.u_stacked * z1.repeat_interleave(self.rank)[:, None]).T @ self.v_stacked
            else:
                dw = None
            bias = self.bias
            if self.db is not None:
                shift = self.ctx.z[0, :, self.block_b] @ self.db
                bias = shift if bias is None else bias + shift
            return F.linear(x, self.weight if dw is None else self.weight + dw, bias)
        if self.dw_cat is not None or self.low_rank:
            z = self.ctx.block(self.block_w, n)  # [N, K]
            lead = x.shape[1:-1]
            flat = x.reshape(n, -1, x.shape[-1])  # [N, L, in]
            if self.low_rank:
                h = F.linear(flat, self.v_stacked).view(n, flat.shape[1], self.k, self.rank)
                h = (h * z[:, None, :, None]).reshape(n, flat.shape[1], -1)
                delta = h @ self.u_stacked
            else:
                scaled = (flat[:, :, None, :] * z[:, None, :, None]).reshape(n, flat.shape[1], -1)
                delta = F.linear(scaled, self.dw_cat)
            y = y + delta.reshape(n, *lead, self.out_features)
        if self.db is not None:
            zb = self.ctx.block(self.block_b, n)
            shift = zb @ self.db  # [N, out]
            y = y + shift.view(n, *([1] * (x.dim() - 2)), self.out_features)
        return y


class ComposedEmbedding(nn.Module):
    """``nn.Embedding`` plus ``sum_k z_k dE_k[ids]``."""

    def __init__(self, base: nn.Embedding, ctx: _Context, de: torch.Tensor, block: int) -> None:
        super().__init__()
        self.ctx, self.block = ctx, block
        self.padding_idx = base.padding_idx
        self.register_buffer("weight", base.weight.detach())
        self.register_buffer("de", de)  # [K, V, d]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(ids, self.weight, self.padding_idx)
        z = self.ctx.block(self.block, self.ctx.z.shape[0] if ids.shape[0] == 1 else ids.shape[0])
        if ids.shape[0] == 1 and z.shape[0] > 1:  # position ids are often one row broadcast over the batch
            ids = ids.expand(z.shape[0], *ids.shape[1:])
            out = out.expand(z.shape[0], *out.shape[1:])
        gathered = self.de[:, ids]  # [K, N, ..., d]
        return out + torch.einsum("kn...d,nk->n...d", gathered, z)


class ComposedLayerNorm(nn.Module):
    """``nn.LayerNorm`` with gain ``g_0 + sum_k z_k dg_k`` and shift ``b_0 + sum_k z_k db_k`` per sample."""

    def __init__(
        self,
        base: nn.LayerNorm,
        ctx: _Context,
        dg: torch.Tensor | None,
        db: torch.Tensor | None,
        block_w: int,
        block_b: int,
    ) -> None:
        super().__init__()
        self.ctx, self.block_w, self.block_b = ctx, block_w, block_b
        self.normalized_shape, self.eps = base.normalized_shape, base.eps
        self.register_buffer("weight", base.weight.detach())
        self.register_buffer("bias", base.bias.detach())
        self.register_buffer("dg", dg)
        self.register_buffer("db", db)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        view = (n, *([1] * (x.dim() - 2)), -1)
        gain, shift = self.weight.expand(n, -1), self.bias.expand(n, -1)
        if self.dg is not None:
            gain = gain + self.ctx.block(self.block_w, n) @ self.dg
        if self.db is not None:
            shift = shift + self.ctx.block(self.block_b, n) @ self.db
        return F.layer_norm(x, self.normalized_shape, None, None, self.eps) * gain.view(view) + shift.view(view)


def _set_child(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, module)


class ComposedModel(nn.Module):
    """A frozen model whose named parameters move along K directions per sample and per block.

    ``directions`` maps the model's parameter names to ``[K, *shape]`` tensors; ``blocks`` maps
    each of those names to a block index in ``range(n_blocks)``. ``low_rank`` optionally gives
    ``(U [K, out, r], V [K, r, in])`` factors for 2-D weights, used instead of the exact deltas.
    Parameters without a direction stay at the base.
    """

    def __init__(
        self,
        model: nn.Module,
        directions: Mapping[str, torch.Tensor],
        blocks: Mapping[str, int],
        n_blocks: int,
        low_rank: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        super().__init__()
        low_rank = low_rank or {}
        if not directions:
            raise TvbasisError("ComposedModel: no directions given")
        self.n_directions = next(iter(directions.values())).shape[0]
        self.n_blocks = n_blocks
        self.ctx = _Context()
        for p in model.parameters():
            p.requires_grad_(False)
        params = dict(model.named_parameters())
        unknown = sorted(set(directions) - set(params))
        if unknown:
            raise TvbasisError(f"directions for {unknown[:3]} which the model does not have ({len(unknown)} in all)")
        for name in directions:
            b = blocks.get(name)
            if b is None or not 0 <= b < n_blocks:
                raise TvbasisError(f"direction {name!r} has no block in range(0, {n_blocks})")
        covered: set[str] = set()
        k = self.n_directions
        for path, module in list(model.named_modules()):
            prefix = f"{path}." if path else ""
            wn, bn = f"{prefix}weight", f"{prefix}bias"
            if wn not in directions and bn not in directions:
                continue
            if isinstance(module, nn.Linear):
                dw = None if wn in low_rank else _stack(directions, wn, k, module.weight.shape)
                db = _stack(directions, bn, k, module.bias.shape) if module.bias is not None else None
                factors = low_rank.get(wn)
                new: nn.Module = ComposedLinear(
                    module, self.ctx, dw, db, blocks.get(wn, 0), blocks.get(bn, 0), factors=factors
                )
            elif isinstance(module, nn.Embedding):
                de = _stack(directions, wn, k, module.weight.shape)
                new = ComposedEmbedding(module, self.ctx, de, blocks[wn])
            elif isinstance(module, nn.LayerNorm):
                dg = _stack(directions, wn, k, module.weight.shape)
                db = _stack(directions, bn, k, module.bias.shape)
                new = ComposedLayerNorm(module, self.ctx, dg, db, blocks.get(wn, 0), blocks.get(bn, 0))
            else:
                raise TvbasisError(
                    f"parameter {wn if wn in directions else bn!r} belongs to a {type(module).__name__}; "
                    "composition supports Linear, Embedding and LayerNorm parameters"
                )
            covered.update(n for n in (wn, bn) if n in directions)
            _set_child(model, path, new)
        missed = sorted(set(directions) - covered)
        if missed:
            raise TvbasisError(f"directions for {missed[:3]} are not weights or biases of a supported module")
        self.model = model

    @contextmanager
    def coefficients(self, z: torch.Tensor) -> Iterator[None]:
        """Run the model with ``z`` (``[N, K, P]``, or ``[1, K, P]`` shared by the batch) inside this block."""
        if z.dim() != 3 or z.shape[1:] != (self.n_directions, self.n_blocks):
            raise TvbasisError(
                f"coefficients must have shape [N, {self.n_directions}, {self.n_blocks}], got {list(z.shape)}"
            )
        self.ctx.z, self.ctx.shared = z, z.shape[0] == 1
        try:
            yield
        finally:
            self.ctx.z, self.ctx.shared = None, False

    def forward(self, *args: object, **kwargs: object) -> object:
        return self.model(*args, **kwargs)
