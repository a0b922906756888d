"""PEFT LoRA adapter directories read as task vectors, in factored form.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``adapter_model.bin``, loaded with ``weights_only=True``). Its task vector is, for each
module it targets, ``scale * B @ A`` on that module's ``.weight`` in the base, and zero on
every other tensor. The rules are PEFT's (0.21):

- ``scale = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; ``r`` and
  ``lora_alpha`` per module from ``rank_pattern`` / ``alpha_pattern`` when one of their keys
  matches the module path (PEFT's ``get_pattern_key``: the first key ``k`` in order with
  ``re.match(rf"(.*\\.)?({k})$", module)``);
- Linear: ``delta = scale * B @ A``; with ``fan_in_fan_out`` (GPT-2's ``Conv1D``, whose
  weight is ``(in, out)``) ``delta = scale * (B @ A).T``; Embedding (``lora_embedding_A``,
  ``lora_embedding_B``): ``delta = scale * (B @ A).T``.

PEFT corrects ``fan_in_fan_out`` per module when it loads an adapter (it is True for
``Conv1D``, False for ``Linear``) and saves whichever value it set last, so the orientation
is taken from the shapes: ``B @ A`` or its transpose, whichever has the base tensor's shape,
and the config's flag decides only for square matrices.

Every delta is kept as ``left @ right`` with ``left`` ``(rows, r)`` (the scale folded in)
and ``right`` ``(r, cols)``, ``rows`` being the base tensor's first dimension: rows
``i:j`` of the delta are ``left[i:j] @ right``, which is what the streaming passes need.

Refused, with an error naming the file and the module: DoRA and the other LoRA variants,
LoRA biases, convolution LoRA, initialisations that change the base weights (PiSSA, OLoRA,
CorDA, LoftQ, MiCA), and full tensors in the adapter (``modules_to_save``, saved embedding
layers) on a selected tensor; those on excluded tensors (``--exclude 'classifier.*'``) are
ignored, as a full fine-tune's excluded tensors are.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tvbasis.errors import CheckpointError
from tvbasis.io.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from tvbasis.io.paths import InputPath, as_input_path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."

# <module>.lora_A[.<adapter name>].weight and <module>.lora_embedding_A[.<adapter name>]
_FACTOR_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?P<adapter>(?!weight$|bias$)[^.]+))?"
    r"(?P<suffix>\.weight|\.bias)?$"
)
#: Config fields that switch on a LoRA variant whose delta is not ``scale * B @ A``.
_VARIANTS = (
    "use_dora",
    "lora_bias",
    "use_qalora",
    "use_bdlora",
    "alora_invocation_tokens",
    "arrow_config",
    "kasa_config",
    "velora_config",
    "monteclora_config",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
)
#: ``init_lora_weights`` values that change the base weights (the adapter is relative to a
#: residual model, unless it was converted on saving, which resets the field to True).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "mica")


def is_adapter(path: InputPath) -> bool:
    """Whether ``path`` is a PEFT adapter directory (it holds ``adapter_config.json``)."""
    path = as_input_path(path)
    try:
        return bool(path.is_dir() and (path / ADAPTER_CONFIG).is_file())
    except OSError:
        return False


@dataclass(frozen=True)
class LoraModule:
    """One targeted module: its factor keys and PEFT's settings for it."""

    module: str  # the module path as the adapter names it (PEFT's key, without ``base_model.model.``)
    a_key: str
    b_key: str
    embedding: bool
    rank: int
    alpha: float
    scale: float


@dataclass(frozen=True)
class LowRank:
    """One tensor's delta as ``left @ right`` (float64): ``left`` ``(rows, r)``, ``right`` ``(r, cols)``.

    ``digest_parts`` are the bytes that identify it (for content hashes): the factors as
    stored and the scale and orientation they are combined with.
    """

    left: torch.Tensor
    right: torch.Tensor
    digest_parts: tuple[Any, ...]

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the delta, flattened (float64)."""
        return (self.left[start:stop] @ self.right).reshape(-1)


@dataclass(frozen=True)
class _Binding:
    module: LoraModule
    transposed: bool  # delta = scale * (B @ A).T


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the value of the first key whose regex ends the module path."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


class LoraAdapter:
    """A PEFT LoRA adapter directory, opened lazily: factors are read one tensor at a time."""

    def __init__(self, path: InputPath) -> None:
        path = as_input_path(path)
        self.path = path
        self.config_file = path / ADAPTER_CONFIG
        self.config = self._read_config()
        weights = next((path / f for f in ADAPTER_FILES if (path / f).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path}: adapter directory has no {' or '.join(ADAPTER_FILES)}")
        self.weights_file = weights
        self.weights: Checkpoint = open_checkpoint(weights)
        self.modules, self.full_tensors = self._parse_keys()
        self._bound: dict[str, _Binding] = {}
        self._cache: tuple[str, LowRank] | None = None
        self._lock = threading.Lock()

    # -- config ---------------------------------------------------------------------------
    def _bad(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.config_file}: {what}")

    def _read_config(self) -> dict[str, Any]:
        try:
            config = json.loads(self.config_file.read_text())
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise self._bad(f"cannot read the adapter config ({exc})") from None
        if not isinstance(config, dict):
            raise self._bad("not a JSON object")
        peft_type = config.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise self._bad(f"peft_type {peft_type!r}: only LoRA adapters can be task vectors")
        for name in _VARIANTS:
            if config.get(name):
                raise self._bad(
                    f"{name}={config[name]!r}: this LoRA variant's delta is not scale * B @ A; "
                    f"merge it into a full checkpoint first (PEFT's merge_and_unload)"
                )
        init = config.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            raise self._bad(
                f"init_lora_weights={init!r} changes the base weights, so the adapter is not relative to the "
                f"base; save it with PEFT's path_initial_model_for_weight_conversion or merge it first"
            )
        r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
        if not _positive_int(r):
            raise self._bad(f"r={r!r}: must be a positive integer")
        if not _number(alpha):
            raise self._bad(f"lora_alpha={alpha!r}: must be a number")
        for key in ("rank_pattern", "alpha_pattern"):
            pattern = config.get(key) or {}
            if not isinstance(pattern, dict):
                raise self._bad(f"{key} must be an object mapping module patterns to values")
            for k, v in pattern.items():
                if not (_positive_int(v) if key == "rank_pattern" else _number(v)):
                    raise self._bad(f"{key}[{k!r}]={v!r}: not a valid {'rank' if key == 'rank_pattern' else 'alpha'}")
                try:
                    re.compile(k)
                except re.error as exc:
                    raise self._bad(f"{key} key {k!r} is not a regular expression ({exc})") from None
        if not isinstance(config.get("use_rslora", False), bool):
            raise self._bad(f"use_rslora={config['use_rslora']!r}: must be true or false")
        return config

    def _module(self, module: str, a_key: str, b_key: str, embedding: bool) -> LoraModule:
        c = self.config
        r = _pattern_value(c.get("rank_pattern") or {}, module, c.get("r", 8))
        alpha = float(_pattern_value(c.get("alpha_pattern") or {}, module, c.get("lora_alpha", 8)))
        scale = alpha / math.sqrt(r) if c.get("use_rslora", False) else alpha / r
        return LoraModule(module, a_key, b_key, embedding, int(r), alpha, scale)

    # -- keys -----------------------------------------------------------------------------
    def _refuse(self, module: str, what: str) -> CheckpointError:
        return CheckpointError(f"{self.weights_file}: module {module!r}: {what}")

    def _parse_keys(self) -> tuple[dict[str, LoraModule], dict[str, str]]:
        """The targeted modules, and the adapter's full tensors (tensor name -> key)."""
        factors: dict[str, dict[str, str]] = {}
        full: dict[str, str] = {}
        for key in self.weights.names():
            name = key.removeprefix(PEFT_PREFIX)
            m = _FACTOR_KEY.match(name)
            if m is None:
                if "lora_" in name:
                    module = name.split(".lora_")[0]
                    if "lora_magnitude_vector" in name:
                        raise self._refuse(module, "DoRA (lora_magnitude_vector) is not supported")
                    raise self._refuse(module, f"tensor {key!r} is not a LoRA factor tvbasis knows")
                full[name] = key  # modules_to_save, a saved embedding layer: checked in bind()
                continue
            module, kind, suffix = m["module"], m["kind"], m["suffix"]
            embedding = kind.startswith("lora_embedding")
            if suffix == ".bias":
                raise self._refuse(module, "LoRA biases (lora_bias) are not supported")
            if embedding == (suffix == ".weight"):
                raise self._refuse(module, f"tensor {key!r} is not a LoRA factor tvbasis knows")
            slot = factors.setdefault(module, {"embedding": "1" if embedding else ""})
            side = kind[-1]
            if side in slot:
                raise self._refuse(module, f"has two lora_{side} tensors ({slot[side]!r}, {key!r})")
            if slot["embedding"] != ("1" if embedding else ""):
                raise self._refuse(module, "mixes lora_A/lora_B with lora_embedding_A/lora_embedding_B factors")
            slot[side] = key
        modules = {}
        for module, slot in factors.items():
            for side in "AB":
                if side not in slot:
                    raise self._refuse(module, f"has no lora_{side} tensor")
            modules[module] = self._module(module, slot["A"], slot["B"], bool(slot["embedding"]))
        if not modules:
            raise CheckpointError(f"{self.weights_file}: holds no LoRA factors (lora_A / lora_B tensors)")
        return modules, full

    # -- binding to the base ----------------------------------------------------------------
    def bind(
        self, base: Checkpoint, selected: Sequence[TensorInfo], include: Sequence[str], exclude: Sequence[str]
    ) -> None:
        """Map every module to its base tensor and check the shapes; remember those ``selected``.

        A module whose tensor the user left out (``exclude``/``include``) is ignored, as a full
        fine-tune's left-out tensors are; one with no tensor in the base is an error.
        """
        wanted = {i.name for i in selected}
        names = base.names()
        for module, lm in self.modules.items():
            name = _base_name(f"{module}.weight", base, names)
            if name is None:
                weight = f"{module}.weight"
                raise self._refuse(
                    module, f"the base {base.path} has no tensor {weight!r} (with or without a model prefix)"
                )
            info = base.info(name)
            a_info, b_info = self.weights.info(lm.a_key), self.weights.info(lm.b_key)
            for f in (a_info, b_info):
                if len(f.shape) != 2:
                    raise self._refuse(module, f"{f.name!r} is {len(f.shape)}-D: convolution LoRA is not supported")
                if not f.dtype.is_floating_point:
                    raise self._refuse(module, f"{f.name!r} is {f.dtype}, not floating point")
            if a_info.shape[0] != lm.rank or b_info.shape[1] != lm.rank:
                raise self._refuse(
                    module,
                    f"adapter_config.json gives rank {lm.rank} but the factors are {list(a_info.shape)} (A) and "
                    f"{list(b_info.shape)} (B)",
                )
            transposed = self._orientation(lm, info, a_info.shape, b_info.shape)
            if name in wanted:
                self._bound[name] = _Binding(lm, transposed)
        for tensor, key in self.full_tensors.items():
            name = _base_name(tensor, base, names) or tensor
            left_out = name not in wanted and (name in base or _left_out(name, include, exclude))
            if not left_out:
                raise CheckpointError(
                    f"{self.weights_file}: tensor {key!r} is a full copy of a module (modules_to_save or a saved "
                    f"embedding layer), not LoRA factors; tvbasis reads only LoRA factors from adapters: exclude "
                    f"{name!r} (e.g. --exclude '{name.rsplit('.', 1)[0]}.*') or merge the adapter first"
                )

    def _orientation(
        self, lm: LoraModule, info: TensorInfo, a_shape: tuple[int, ...], b_shape: tuple[int, ...]
    ) -> bool:
        """Whether the delta is ``(B @ A).T``: from the shapes, the config's flag for square matrices."""
        plain, flipped = (b_shape[0], a_shape[1]), (a_shape[1], b_shape[0])
        if len(info.shape) != 2:
            raise self._refuse(lm.module, f"B @ A is {list(plain)} but base tensor {info.name!r} is {list(info.shape)}")
        if lm.embedding:
            fits = [True] if info.shape == flipped else []
        else:
            prefer = bool(self.config.get("fan_in_fan_out", False))
            fits = [t for t in (prefer, not prefer) if info.shape == (flipped if t else plain)]
        if not fits:
            shape = flipped if lm.embedding else plain
            raise self._refuse(
                lm.module,
                f"{'(B @ A).T' if lm.embedding else 'B @ A'} is {list(shape)} but base tensor {info.name!r} is "
                f"{list(info.shape)}",
            )
        if not info.dtype.is_floating_point:
            raise self._refuse(lm.module, f"base tensor {info.name!r} is {info.dtype}, not floating point")
        return fits[0]

    @property
    def tensors(self) -> list[str]:
        """The selected base tensors this adapter changes."""
        return list(self._bound)

    def targets(self, tensor: str) -> bool:
        return tensor in self._bound

    def low_rank(self, tensor: str) -> LowRank | None:
        """The delta of base tensor ``tensor`` as factors, or None where the adapter leaves it alone.

        The last tensor's factors are kept: the passes ask for each tensor's once per chunk.
        """
        binding = self._bound.get(tensor)
        if binding is None:
            return None
        with self._lock:
            if self._cache is not None and self._cache[0] == tensor:
                return self._cache[1]
            lm = binding.module
            a, b = self.weights.read(lm.a_key), self.weights.read(lm.b_key)
            a64, b64 = a.to(torch.float64), b.to(torch.float64)
            if binding.transposed:  # delta = s (B A)^T = (s A^T) B^T
                left, right = lm.scale * a64.T, b64.T
            else:
                left, right = lm.scale * b64, a64
            header = struct.pack("<d?", lm.scale, binding.transposed)
            lr = LowRank(left.contiguous(), right.contiguous(), (header, a, b))
            self._cache = (tensor, lr)
            return lr

    def close(self) -> None:
        self.weights.close()


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _left_out(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """Whether the tensor selection (include/exclude globs) leaves ``name`` out."""
    inc = not include or any(fnmatch.fnmatchcase(name, p) for p in include)
    return not inc or any(fnmatch.fnmatchcase(name, p) for p in exclude)


def _base_name(name: str, base: Checkpoint, names: Sequence[str]) -> str | None:
    """The base tensor an adapter's tensor name means, with or without a model prefix.

    PEFT names modules as the model class that loaded the adapter does, which may add a
    prefix the checkpoint lacks (``bert.`` of ``BertForSequenceClassification`` over a
    ``BertModel`` checkpoint) or lack one it has. The exact name wins; otherwise one prefix
    component dropped from the adapter's name, or a unique one added.
    """
    if name in base:
        return name
    _, sep, rest = name.partition(".")
    if sep and rest in base:
        return rest
    found = [n for n in names if n.endswith("." + name) and "." not in n[: -len(name) - 1]]
    return found[0] if len(found) == 1 else None
