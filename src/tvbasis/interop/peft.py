"""Write a combination of a store's atoms as a PEFT LoRA adapter (truncated SVD per weight matrix).

The adapter holds, for every 2-D weight whose module PEFT can wrap (``nn.Linear``,
``nn.Embedding``, GPT-2's ``Conv1D``), the factors of the truncated SVD of that weight's
delta, with ``lora_alpha == r`` per module so PEFT's scale is 1 and ``B @ A`` is the
truncated delta. Everything else (biases, LayerNorm, 2-D tensors of other modules) cannot
be LoRA and is left out; the report says which tensors and what share of the delta's
squared norm they carry.

Key names are those ``PeftModel.save_pretrained`` writes:
``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (Linear, Conv1D) and
``base_model.model.<module path>.lora_embedding_A`` / ``.lora_embedding_B`` (Embedding). The
module path is the tensor name without ``.weight``, as the model that loads the adapter
names it: for a Hugging Face directory tvbasis builds that model (``config.architectures[0]``,
or ``model_class``) on the meta device and maps each tensor to its module, adding or
dropping the class's ``base_model_prefix`` (``bert.``) where the checkpoint's naming and the
model's differ.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from tvbasis.arithmetic.export import check_base_layout, iter_combination
from tvbasis.engine.streaming import DEFAULT_CHUNK_ELEMENTS
from tvbasis.errors import TvbasisError
from tvbasis.io.checkpoint import open_checkpoint
from tvbasis.io.outputs import atomic_output, check_output_path
from tvbasis.progress import progress
from tvbasis.store.format import Store

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REPORT_FILE = "tvbasis_lora.json"
PREFIX = "base_model.model."


@dataclass
class LoraTensor:
    """One weight written as LoRA factors."""

    name: str
    module: str
    kind: str  # linear, embedding or conv1d
    shape: tuple[int, ...]
    rank: int
    rel_error: float  # ||Delta - Delta_r|| / ||Delta||
    sq_norm: float  # ||Delta||^2


@dataclass
class LeftOut:
    """One delta tensor that is not in the adapter, and why."""

    name: str
    shape: tuple[int, ...]
    reason: str
    sq_norm: float


@dataclass
class LoraReport:
    """What ``write_lora_adapter`` wrote and how close the adapter is to the combination."""

    out: Path
    tensors: list[LoraTensor] = field(default_factory=list)
    left_out: list[LeftOut] = field(default_factory=list)

    @property
    def ranks(self) -> dict[str, int]:
        return {t.module: t.rank for t in self.tensors}

    @property
    def lora_sq_norm(self) -> float:
        return sum(t.sq_norm for t in self.tensors)

    @property
    def total_sq_norm(self) -> float:
        return self.lora_sq_norm + sum(t.sq_norm for t in self.left_out)

    @property
    def truncation_error(self) -> float:
        """Relative Frobenius error of the SVD truncation over the tensors written as LoRA."""
        tail = sum(t.sq_norm * t.rel_error**2 for t in self.tensors)
        return math.sqrt(tail / self.lora_sq_norm) if self.lora_sq_norm > 0 else 0.0

    @property
    def left_out_share(self) -> float:
        """Share of the delta's squared norm in tensors left out of the adapter."""
        total = self.total_sq_norm
        return (total - self.lora_sq_norm) / total if total > 0 else 0.0

    @property
    def total_error(self) -> float:
        """``||Delta - adapter|| / ||Delta||`` over the whole delta, left-out tensors counted as missing."""
        total = self.total_sq_norm
        tail = sum(t.sq_norm * t.rel_error**2 for t in self.tensors)
        return math.sqrt((tail + total - self.lora_sq_norm) / total) if total > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "truncation_error": self.truncation_error,
            "total_error": self.total_error,
            "left_out_share": self.left_out_share,
            "tensors": [asdict(t) for t in self.tensors],
            "left_out": [asdict(t) for t in self.left_out],
        }

    def summary(self) -> str:
        """Two lines for the CLI."""
        ranks = sorted(self.ranks.values())
        span = "-" if not ranks else str(ranks[0]) if ranks[0] == ranks[-1] else f"{ranks[0]}-{ranks[-1]}"
        return (
            f"LoRA adapter: {len(self.tensors)} tensors, rank {span}, "
            f"truncation error {self.truncation_error:.4g} (whole delta: {self.total_error:.4g})\n"
            f"left out: {len(self.left_out)} tensors (biases, norms, ...), "
            f"{100 * self.left_out_share:.3g}% of the delta's squared norm"
        )


def check_rank_options(rank: int | None, energy: float | None) -> None:
    """Exactly one of ``rank`` (>= 1) and ``energy`` (in (0, 1])."""
    if rank is not None and energy is not None:
        raise TvbasisError("--rank and --energy: give one, not both")
    if rank is None and energy is None:
        raise TvbasisError("--as-lora needs --rank R or --energy E (share of each delta's squared singular values)")
    if rank is not None and rank < 1:
        raise TvbasisError(f"--rank {rank}: must be at least 1")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise TvbasisError(f"--energy {energy}: must be in (0, 1]")


def choose_rank(singular_values: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """``rank`` capped at the matrix's size, or the least rank keeping ``energy`` of ``sum s_i^2``."""
    n = len(singular_values)
    if rank is not None:
        return min(rank, n)
    sq = singular_values.to(torch.float64) ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(sq, 0)
    # A hair under the target so that energy=1.0 is met despite rounding in the sum.
    need = float(energy) * total * (1 - 1e-12)  # type: ignore[arg-type]
    return min(n, int(torch.searchsorted(cum, torch.tensor([need], dtype=torch.float64)).item()) + 1)


def _modules(base: Path, model_class: str | None) -> tuple[dict[str, str], str] | None:
    """Module path -> kind (linear, embedding, conv1d, other) of the model that loads the adapter, and its prefix.

    ``None`` for a base without ``config.json`` (a bare weights file): then every ``*.weight``
    2-D tensor is taken for an ``nn.Linear`` named as the tensor.
    """
    config_file = base / "config.json" if base.is_dir() else None
    if config_file is None or not config_file.is_file():
        if model_class is not None:
            raise TvbasisError(f"--lora-model-class {model_class}: the base {base} has no config.json to build it from")
        return None
    try:
        import transformers
    except ImportError:
        raise TvbasisError(
            f"{base}: a LoRA adapter for a Hugging Face model needs transformers (pip install 'tvbasis[peft]')"
        ) from None
    try:
        config = transformers.AutoConfig.from_pretrained(base)
    except Exception as exc:
        raise TvbasisError(f"{config_file}: cannot read the model config ({exc})") from None
    name = model_class or next(iter(getattr(config, "architectures", None) or []), None)
    if name is None:
        raise TvbasisError(f"{config_file}: names no architecture; pass the model class (--lora-model-class)")
    cls = getattr(transformers, name, None)
    if not isinstance(cls, type):
        raise TvbasisError(f"--lora-model-class {name}: transformers has no model class of that name")
    try:
        with torch.device("meta"):
            model = cls(config)
    except Exception as exc:
        raise TvbasisError(f"{base}: cannot build {name} from its config ({exc})") from None
    conv1d = getattr(getattr(transformers, "pytorch_utils", None), "Conv1D", None)
    kinds: dict[str, str] = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            kinds[path] = "linear"
        elif isinstance(module, torch.nn.Embedding):
            kinds[path] = "embedding"
        elif conv1d is not None and isinstance(module, conv1d):
            kinds[path] = "conv1d"
        else:
            kinds[path] = "other"
    return kinds, str(getattr(model, "base_model_prefix", "") or "")


def _module_for(name: str, modules: tuple[dict[str, str], str] | None) -> tuple[str, str] | str:
    """``(module path, kind)`` for a weight tensor, or the reason it cannot be LoRA."""
    if not name.endswith(".weight"):
        return "not a module's .weight"
    path = name.removesuffix(".weight")
    if modules is None:
        return path, "linear"
    kinds, prefix = modules
    candidates = [path]
    if prefix:
        candidates += [path.removeprefix(prefix + ".")] if path.startswith(prefix + ".") else [f"{prefix}.{path}"]
    for cand in candidates:
        if cand in kinds:
            kind = kinds[cand]
            return (cand, kind) if kind != "other" else "its module is not Linear, Embedding or Conv1D"
    return "no such module in the model"


def _targeted(module: str, targets: Sequence[str] | None) -> bool:
    """PEFT's rule for a list of target names: the module path equals one or ends with '.' + one."""
    return targets is None or any(module == t or module.endswith("." + t) for t in targets)


def _iter_tensors(
    store: Store, coefficients: np.ndarray, chunk_elements: int, residual_weights: np.ndarray | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Whole tensors of the combination, one at a time (float64)."""
    name, parts = None, []
    for chunk_name, rows in iter_combination(store, coefficients, chunk_elements, residual_weights):
        if chunk_name != name and parts:
            yield name, torch.cat(parts) if parts[0].dim() else parts[0]  # type: ignore[misc]
            parts = []
        name = chunk_name
        parts.append(rows)
    if parts:
        yield name, torch.cat(parts) if parts[0].dim() else parts[0]  # type: ignore[misc]


def _factor(delta: torch.Tensor, kind: str, rank: int | None, energy: float | None) -> tuple[int, float, dict]:
    """Truncated SVD of ``delta`` as PEFT factors: (rank, relative error, {suffix: tensor})."""
    matrix = delta.T if kind in ("embedding", "conv1d") else delta  # PEFT's delta is (B @ A).T for these
    u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    r = choose_rank(s, rank, energy)
    sq = s**2
    total = float(sq.sum())
    rel = math.sqrt(max(float(sq[r:].sum()), 0.0) / total) if total > 0 else 0.0
    root = s[:r].sqrt()
    b = (u[:, :r] * root).to(torch.float32).contiguous()  # out x r
    a = (root[:, None] * vh[:r]).to(torch.float32).contiguous()  # r x in
    if kind == "embedding":
        return r, rel, {"lora_embedding_A": a, "lora_embedding_B": b}
    return r, rel, {"lora_A.weight": a, "lora_B.weight": b}


def write_lora_adapter(
    store: Store,
    coefficients: np.ndarray,
    out_dir: str | Path,
    *,
    base: str | Path,
    rank: int | None = None,
    energy: float | None = None,
    target_modules: Sequence[str] | None = None,
    model_class: str | None = None,
    overwrite: bool = False,
    ignore_base_mismatch: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    residual_weights: np.ndarray | None = None,
) -> LoraReport:
    """Write ``sum_k c_k s_k`` (+ ``sum_t r_t R_hat_t`` of a store's coded residuals) as a PEFT LoRA
    adapter directory that ``PeftModel.from_pretrained`` loads.

    Each 2-D weight of a Linear, Embedding or Conv1D module gets the truncated SVD of its
    delta, at rank ``rank`` (capped at the matrix's size) or at the least rank keeping
    ``energy`` of its squared singular values; ``lora_alpha`` equals the rank, so the merged
    model is ``base + B @ A``. ``target_modules`` (PEFT's suffix rule) limits which modules
    are written. The base's tensor names and shapes are checked against the store (not its
    content hash); ``model_class`` names the transformers class the adapter is for (default:
    the base's ``config.json`` architecture). The directory also holds ``tvbasis_lora.json``,
    the report.
    """
    check_rank_options(rank, energy)
    out = Path(out_dir)
    check_output_path(out, overwrite)
    base = Path(base)
    ckpt = open_checkpoint(base)
    if not ignore_base_mismatch:
        check_base_layout(store, ckpt)
    modules = _modules(base, model_class)
    report = LoraReport(out=out)
    weights: dict[str, torch.Tensor] = {}
    kinds: set[str] = set()
    with progress(sum(i.numel for i in store.tensors), "Factoring", unit="param") as bar:
        for name, delta in _iter_tensors(store, coefficients, chunk_elements, residual_weights):
            bar.update(delta.numel())
            shape = tuple(delta.shape)
            sq_norm = float((delta.to(torch.float64) ** 2).sum())
            target = _module_for(name, modules) if delta.dim() == 2 else f"{delta.dim()}-D, not a matrix"
            if isinstance(target, tuple) and not _targeted(target[0], target_modules):
                target = "not in target_modules"
            if isinstance(target, tuple) and sq_norm == 0.0:
                target = "zero delta"
            if isinstance(target, str):
                report.left_out.append(LeftOut(name, shape, target, sq_norm))
                continue
            module, kind = target
            r, rel, factors = _factor(delta, kind, rank, energy)
            for suffix, tensor in factors.items():
                weights[f"{PREFIX}{module}.{suffix}"] = tensor
            kinds.add(kind)
            report.tensors.append(LoraTensor(name, module, kind, shape, r, rel, sq_norm))
    if not report.tensors:
        raise TvbasisError(f"{store.path}: no 2-D weight of this combination can be written as LoRA (nothing to write)")
    ranks = report.ranks
    r_max = max(ranks.values())
    pattern = {m: r for m, r in ranks.items() if r != r_max}
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": str(base),
        "r": r_max,
        "lora_alpha": r_max,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": list(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        # One flag per adapter; PEFT corrects it per module on load (True for Conv1D, False for Linear).
        "fan_in_fan_out": "conv1d" in kinds and "linear" not in kinds,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    with atomic_output(out, overwrite=overwrite, directory=True) as tmp:
        save_file(weights, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt", "tvbasis_store": str(store.path)})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report
