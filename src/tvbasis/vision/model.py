"""CLIP zero-shot heads, cached image-encoder fine-tuning and fast evaluation (Ilharco et al.'s protocol).

- A task's *zero-shot head* is computed once from the BASE model's text tower: each class name
  is put into every prompt template, the projected text embeddings are L2-normalised,
  averaged over templates and normalised again (one row per class), as CLIP does.
- An image's logits are ``logit_scale * normalize(image_embeds) @ head.T`` with the base
  model's ``exp(logit_scale)`` (100 for OpenAI's models); accuracy does not depend on it.
- Fine-tuning updates the whole image encoder (``vision_model.*`` and ``visual_projection``)
  with the head frozen; the text tower is never touched. The task vector is the image-encoder
  delta. Fine-tunes are written as Hugging Face ``CLIPVisionModelWithProjection`` directories
  (safetensors) holding the base's image-encoder tensor names, so ``tvbasis build`` takes
  them with the base *image encoder* directory (:func:`encoder_dir`) as its base.
- Outputs are cached by content: a fine-tune's directory is reused only when its marker
  records the same key (base weights, training files, classes, templates, hyperparameters).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tvbasis.errors import CheckpointError, TvbasisError
from tvbasis.evaluation.training import optimizer_step, training_stats
from tvbasis.io.cache_dirs import (
    check_replaceable,
    fingerprint_files,
    install,
    json_digest,
    marker_matches,
    tmp_dir,
)
from tvbasis.io.checkpoint import open_checkpoint
from tvbasis.vision.convert import (
    PREPROCESSOR_FILE,
    TOKENIZER_FILES,
    check_same_architecture,
    image_encoder_state,
    read_clip_state,
    read_config,
    read_image_encoder,
    shapes_of,
    vision_config_dict,
    write_model_dir,
)
from tvbasis.vision.data import ImageDataset, Preprocess, VisionTask, fingerprint_task

log = logging.getLogger(__name__)

#: Bump when a change here changes what a fine-tune or a converted encoder contains (part of the cache keys).
CODE_VERSION = "vision-model-1"
FINETUNE_MARKER = "tvbasis-vision-finetune.json"
ENCODER_MARKER = "tvbasis-vision-encoder.json"
HEAD_FILE = "zeroshot_head.safetensors"

Log = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else must name a usable torch device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TvbasisError(f"--device {device!r}: not a torch device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TvbasisError(f"--device {device}: CUDA is not available here")
    return dev


def _load_strict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: Path | str) -> None:
    """Load every parameter from ``state``: a missing tensor is an error, never a random initialisation."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    if missing:
        raise CheckpointError(f"{source}: lacks tensor {missing[0]!r} (and {len(missing) - 1} more) of the model")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{source}: tensor {k!r} has shape {tuple(state[k].shape)}, its config.json says {tuple(v.shape)}"
            )
    model.load_state_dict({k: state[k] for k in own}, strict=True)


@dataclass
class ClipBase:
    """A base CLIP model (both towers, float32), its tokenizer and its image preprocessing."""

    path: Path
    config: dict[str, Any]
    model: torch.nn.Module  # transformers.CLIPModel
    tokenizer: Any
    preprocess: Preprocess

    @property
    def logit_scale(self) -> float:
        """``exp(logit_scale)``, capped at 100 as CLIP's training does."""
        return float(min(100.0, math.exp(float(self.model.logit_scale.detach()))))


def check_base(base_dir: str | Path) -> tuple[dict[str, Any], Any]:
    """The config and tokenizer of a base ``CLIPModel`` directory, or a one-line error saying what is wrong."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise TvbasisError("the vision path needs transformers: pip install 'tvbasis[hf]'") from None

    base_dir = Path(base_dir)
    if not base_dir.is_dir():
        raise TvbasisError(f"--base {base_dir}: not a directory (give a Hugging Face CLIPModel directory)")
    config = read_config(base_dir)
    if config["model_type"] != "clip":
        raise TvbasisError(
            f"{base_dir}: holds only a CLIP image tower (model_type {config['model_type']!r}); zero-shot heads need "
            "the text tower: give the full CLIPModel directory (or convert with 'tvbasis vision convert')"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise TvbasisError(f"{base_dir}: cannot load its tokenizer ({type(exc).__name__}: {exc})") from None
    return config, tokenizer


def load_clip(base_dir: str | Path) -> ClipBase:
    """A Hugging Face ``CLIPModel`` directory (config, weights, tokenizer), loaded offline and strictly."""
    from transformers import CLIPConfig, CLIPModel

    base_dir = Path(base_dir)
    config, tokenizer = check_base(base_dir)
    state, _ = read_clip_state(base_dir)
    model = CLIPModel(CLIPConfig.from_dict(config))
    _load_strict(model, {k: v.to(torch.float32) for k, v in state.items()}, base_dir)
    model.eval()
    preprocess = Preprocess.for_model(base_dir, int(model.config.vision_config.image_size))
    return ClipBase(base_dir, config, model, tokenizer, preprocess)


def image_encoder(clip: ClipBase) -> torch.nn.Module:
    """The base's image tower as a ``CLIPVisionModelWithProjection`` (its own copy of the weights)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    enc = CLIPVisionModelWithProjection(CLIPVisionConfig.from_dict(vision_config_dict(clip.config)))
    _load_strict(enc, image_encoder_state(clip.model.state_dict()), clip.path)
    return enc


@torch.no_grad()
def zero_shot_head(
    clip: ClipBase, classnames: Sequence[str], templates: Sequence[str], device: torch.device | None = None
) -> torch.Tensor:
    """``[classes, embed_dim]`` unit rows: per class, the normalised mean of its normalised prompt embeddings."""
    if len(classnames) < 2:
        raise TvbasisError(f"a zero-shot head needs at least 2 classes, got {len(classnames)}")
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise TvbasisError(f"prompt templates need exactly one '{{}}' each, got {list(templates)[:3]}")
    model = clip.model
    device = device or next(model.parameters()).device
    texts = [t.replace("{}", c) for c in classnames for t in templates]
    max_len = int(model.config.text_config.max_position_embeddings)
    embs = []
    for s in range(0, len(texts), 256):
        enc = clip.tokenizer(texts[s : s + 256], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        pooled = model.text_model(
            input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)
        ).pooler_output
        embs.append(F.normalize(model.text_projection(pooled).float(), dim=-1))
    per_class = torch.cat(embs).view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1).cpu().clone()  # a normal tensor (not an inference one) for training


def base_fingerprint(base_dir: Path) -> str:
    """Hash of a model directory's weights, config, preprocessor and tokenizer files (by content)."""
    with open_checkpoint(base_dir) as ckpt:
        files = ckpt.weight_files()
        if ckpt.index_file is not None:
            files = [ckpt.index_file, *files]
    names = ("config.json", PREPROCESSOR_FILE, *TOKENIZER_FILES)
    return fingerprint_files([*files, *(base_dir / n for n in names if (base_dir / n).is_file())])


def _source_fingerprint(path: Path) -> str:
    if path.is_dir():
        with open_checkpoint(path) as ckpt:
            files = ckpt.weight_files()
        return fingerprint_files(files)
    return fingerprint_files([path])


# --------------------------------------------------------------------------------------------
# Image-encoder directories (the base for task vectors, imported fine-tunes)
# --------------------------------------------------------------------------------------------
def encoder_dir(base_dir: str | Path, cache_root: str | Path) -> Path:
    """The base's image encoder as a ``CLIPVisionModelWithProjection`` directory (cached): the base of
    every vision task vector, ``tvbasis build --base`` and ``tvbasis edit --base``."""
    base_dir = Path(base_dir)
    config = read_config(base_dir)
    key = json_digest({"code": CODE_VERSION, "base": base_fingerprint(base_dir)})
    out = Path(cache_root) / "encoders" / f"{base_dir.name}-{key[:12]}"
    if marker_matches(out, ENCODER_MARKER, {"key": key}):
        return out
    check_replaceable(out, ENCODER_MARKER)
    state = image_encoder_state(read_clip_state(base_dir)[0])
    tmp = tmp_dir(out)
    try:
        write_model_dir(tmp, state, vision_config_dict(config), copy_from=[base_dir])
        marker = {"key": key, "code_version": CODE_VERSION, "source": str(base_dir), "kind": "base image encoder"}
        (tmp / ENCODER_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        install(tmp, out, lambda: marker_matches(out, ENCODER_MARKER, {"key": key}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def import_finetune(base_dir: str | Path, source: str | Path, name: str, cache_root: str | Path) -> Path:
    """A user-supplied fine-tune (open_clip state dict, HF CLIP directory or file) as an encoder directory
    beside the base's (cached), after checking it has the base's architecture."""
    base_dir, source = Path(base_dir), Path(source)
    enc_dir = encoder_dir(base_dir, cache_root)
    base_state = read_image_encoder(enc_dir)
    ft = read_image_encoder(source)
    check_same_architecture(shapes_of(ft), shapes_of(base_state), source, base_dir)
    ft = {k: ft.get(k, v) for k, v in base_state.items()}  # a CLIPVisionModel has no projection: unchanged
    key = json_digest({"code": CODE_VERSION, "base": base_fingerprint(base_dir), "source": _source_fingerprint(source)})
    out = Path(cache_root) / "imported" / f"{name}-{key[:12]}"
    if marker_matches(out, FINETUNE_MARKER, {"key": key}):
        return out
    check_replaceable(out, FINETUNE_MARKER)
    tmp = tmp_dir(out)
    try:
        write_model_dir(tmp, ft, json.loads((enc_dir / "config.json").read_text()), copy_from=[base_dir])
        marker = {"key": key, "code_version": CODE_VERSION, "task": name, "source": str(source), "kind": "imported"}
        (tmp / FINETUNE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        install(tmp, out, lambda: marker_matches(out, FINETUNE_MARKER, {"key": key}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinetuneConfig:
    """Hyperparameters of one fine-tune; all are part of the cache key.

    Defaults are Ilharco et al.'s (task vectors paper) for ViT-B/32: AdamW, lr 1e-5, weight decay
    0.1, batch 128, cosine schedule after 500 warmup steps, gradient norm clipped at 1, and 2000
    steps (the 14/20-task papers train every dataset for 2000 steps). No augmentation: training
    images get the evaluation transform.
    """

    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup_steps: int = 500
    grad_clip: float | None = 1.0
    label_smoothing: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        # Normalise types so that lr=1 and lr=1.0 give the same cache key.
        for name in ("lr", "weight_decay", "label_smoothing"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("steps", "batch_size", "warmup_steps", "seed"):
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.grad_clip is not None:
            object.__setattr__(self, "grad_clip", float(self.grad_clip))
        if self.steps < 1 or self.batch_size < 1 or self.warmup_steps < 0:
            raise TvbasisError(f"fine-tune: steps and batch size must be >= 1, warmup >= 0 (got {self})")
        if not (self.lr > 0 and self.weight_decay >= 0 and 0 <= self.label_smoothing < 1):
            raise TvbasisError(f"fine-tune: invalid hyperparameters {self}")

    def lr_factor(self, step: int) -> float:
        """Linear warmup, then cosine decay to 0 over the remaining steps."""
        warmup = min(self.warmup_steps, self.steps - 1)
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, self.steps - warmup)))


def finetune_key(base_dir: Path, task: VisionTask, cfg: FinetuneConfig) -> str:
    return json_digest(
        {
            "code": CODE_VERSION,
            "base": base_fingerprint(base_dir),
            "task": fingerprint_task(task),
            "hp": asdict(cfg),
        }
    )


def default_workers(device: torch.device) -> int:
    """Image-decoding worker processes: none on CPU (they would compete with the model), up to 8 on a GPU."""
    return 0 if device.type == "cpu" else min(8, max(0, (os.cpu_count() or 1) - 1))


def _loader(
    examples: Sequence[Any], preprocess: Preprocess, batch_size: int, workers: int, generator: torch.Generator | None
) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        ImageDataset(examples, preprocess),
        batch_size=batch_size,
        shuffle=generator is not None,
        generator=generator,
        num_workers=workers,
        pin_memory=False,
        persistent_workers=workers > 0,
    )


def _iterate(loader: torch.utils.data.DataLoader) -> Iterator[Any]:
    """Batches of ``loader``; an unreadable image in a worker process stays a one-line error naming the file."""
    try:
        yield from loader
    except TvbasisError as exc:
        # A worker's error comes back with its traceback in the message; its last line is ours.
        last = [line for line in str(exc).splitlines() if line.strip()][-1]
        raise TvbasisError(last.split("TvbasisError: ", 1)[-1]) from None


def _autocast(device: torch.device) -> Any:
    """bf16 autocast on a GPU (as the papers train in mixed precision); nothing on CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def finetune(
    base_dir: str | Path,
    task: VisionTask,
    out_dir: str | Path,
    cfg: FinetuneConfig | None = None,
    *,
    device: str = "auto",
    workers: int | None = None,
    log_fn: Log | None = None,
) -> Path:
    """Fine-tune the base's image encoder on ``task`` against its frozen zero-shot head; write an HF dir.

    Returns ``out_dir`` at once when it already holds a complete fine-tune with the same key.
    The directory is built under a temporary name, its marker written last, then renamed into
    place. One that is not a tvbasis vision fine-tune is never overwritten.
    """
    cfg = cfg or FinetuneConfig()
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if not task.train:
        raise TvbasisError(f"dataset {task.name!r}: has no training images ({task.root / 'train'})")
    key = finetune_key(base_dir, task, cfg)
    if marker_matches(out_dir, FINETUNE_MARKER, {"key": key}):
        log.info("fine-tune %s: reusing %s", task.name, out_dir)
        return out_dir
    check_replaceable(out_dir, FINETUNE_MARKER)
    dev = resolve_device(device)
    tmp = tmp_dir(out_dir)
    try:
        stats = _train_and_write(base_dir, task, cfg, tmp, dev, default_workers(dev) if workers is None else workers)
        marker = {
            "key": key,
            "code_version": CODE_VERSION,
            "task": task.name,
            "source": task.source,
            "n_train": len(task.train),
            "n_classes": len(task.classnames),
            "base_dir": str(base_dir),
            "hyperparameters": asdict(cfg),
            "device": str(dev),
            **stats,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / FINETUNE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        install(tmp, out_dir, lambda: marker_matches(out_dir, FINETUNE_MARKER, {"key": key}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if log_fn is not None:
        log_fn(
            f"fine-tuned {task.name}: {stats['steps']} steps in {stats['train_seconds']:.0f} s, "
            f"loss {stats['loss_first']:.3f} -> {stats['loss_last']:.3f}"
        )
    return out_dir


def finetune_cached(
    base_dir: str | Path, task: VisionTask, cache_root: str | Path, cfg: FinetuneConfig | None = None, **kw: Any
) -> Path:
    """:func:`finetune` into ``cache_root/<task>-<key[:12]>``: each distinct input set gets its own directory."""
    cfg = cfg or FinetuneConfig()
    key = finetune_key(Path(base_dir), task, cfg)
    return finetune(base_dir, task, Path(cache_root) / f"{task.name}-{key[:12]}", cfg, **kw)


def _train_and_write(
    base_dir: Path, task: VisionTask, cfg: FinetuneConfig, out: Path, device: torch.device, workers: int
) -> dict[str, Any]:
    """Train in a forked RNG (the caller's torch RNG state is left as it was) and write ``out``."""
    t0 = time.perf_counter()
    clip = load_clip(base_dir)
    clip.model.to(device)  # the text tower too: heads of hundreds of classes are quicker there
    head = zero_shot_head(clip, task.classnames, task.templates).to(device)
    scale, preprocess = clip.logit_scale, clip.preprocess
    model = image_encoder(clip).to(device)
    del clip  # the text tower is not needed any more
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        loader = _loader(task.train, preprocess, cfg.batch_size, workers, torch.Generator().manual_seed(cfg.seed))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cfg.lr_factor)
        model.train()
        t_train = time.perf_counter()
        step = 0
        while step < cfg.steps:
            for images, labels in _iterate(loader):
                pixels = preprocess.normalise(images.to(device, non_blocking=True))
                with _autocast(device):
                    emb = model(pixel_values=pixels).image_embeds
                logits = scale * F.normalize(emb.float(), dim=-1) @ head.T
                loss = F.cross_entropy(logits, labels.to(device), label_smoothing=cfg.label_smoothing)
                losses.append(optimizer_step(loss, opt, sched, params, cfg.grad_clip))
                step += 1
                if step >= cfg.steps:
                    break
        train_s = time.perf_counter() - t_train
    model.eval()
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    write_model_dir(out, state, vision_config_dict(read_config(base_dir)), copy_from=[base_dir])
    meta = {
        "classnames": json.dumps(task.classnames),
        "templates": json.dumps(task.templates),
        "logit_scale": repr(scale),
    }
    save_file({"head": head.detach().cpu().contiguous()}, str(out / HEAD_FILE), metadata=meta)
    return training_stats(losses, train_s, t0)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------
class Evaluator:
    """Accuracy of many edited image encoders on fixed datasets, cheaply.

    The same interface as the text suite's ``Evaluator``, so the protocol functions of
    ``tvbasis.evaluation`` run on it. One image encoder is loaded once; :meth:`set_weights` /
    :meth:`set_task_vector` copy new values into its parameters in place, so a lambda search
    costs only forward passes. Each (dataset, split, limit) is decoded and preprocessed once
    and kept in memory as uint8 while the total stays under ``cache_bytes`` (else decoded
    again for every evaluation). Heads are the BASE model's zero-shot heads and never change.
    Tensor names are the image-encoder directory's (``vision_model.*``, ``visual_projection.weight``).
    """

    def __init__(
        self,
        base_dir: str | Path,
        tasks: Sequence[VisionTask],
        *,
        device: str = "auto",
        batch_size: int = 128,
        workers: int | None = None,
        cache_bytes: int = 8 << 30,
    ) -> None:
        self.base_dir = Path(base_dir)
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.workers = default_workers(self.device) if workers is None else workers
        self.cache_bytes = cache_bytes
        self.tasks = {t.name: t for t in tasks}
        if len(self.tasks) != len(tasks):
            raise TvbasisError("Evaluator: dataset names must be unique")
        clip = load_clip(self.base_dir)
        clip.model.to(self.device)
        self.preprocess, self.logit_scale = clip.preprocess, clip.logit_scale
        self.heads = {t.name: zero_shot_head(clip, t.classnames, t.templates).to(self.device) for t in tasks}
        self.model = image_encoder(clip).to(self.device).eval()
        del clip
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._params = dict(self.model.named_parameters())
        self._base = {k: p.detach().clone() for k, p in self._params.items()}
        self._cache: dict[tuple[str, str, int | None], tuple[torch.Tensor, torch.Tensor]] = {}
        self._cached = 0

    # -- weights -----------------------------------------------------------------------------
    def base_state(self) -> dict[str, torch.Tensor]:
        """Copies (on the CPU) of the base image encoder's tensors, named as in the encoder directory."""
        return {k: v.detach().to("cpu").clone() for k, v in self._base.items()}

    def names(self) -> list[str]:
        """The tensor names :meth:`set_weights` and :meth:`set_task_vector` accept."""
        return list(self._params)

    def _check(self, name: str, value: torch.Tensor, what: str) -> torch.nn.Parameter:
        param = self._params.get(name)
        if param is None:
            raise TvbasisError(f"{what}: {name!r} is not an image-encoder parameter of {self.base_dir}")
        if tuple(value.shape) != tuple(param.shape):
            raise TvbasisError(f"{what}: {name!r} has shape {tuple(value.shape)}, expected {tuple(param.shape)}")
        return param

    @torch.no_grad()
    def set_weights(self, state: Mapping[str, torch.Tensor]) -> None:
        """Overwrite the named parameters in place; others keep their current values."""
        for name, value in state.items():
            if name.endswith("position_ids") and not value.dtype.is_floating_point:
                continue  # an integer buffer some checkpoints carry; fixed
            self._check(name, value, "set_weights").copy_(value)

    @torch.no_grad()
    def set_task_vector(self, delta: Mapping[str, torch.Tensor], coef: float = 1.0) -> None:
        """Set the encoder to ``base + coef * delta`` (names absent from ``delta`` go back to base)."""
        for name, value in delta.items():
            self._check(name, value, "set_task_vector")
        for name, param in self._params.items():
            param.copy_(self._base[name])
            d = delta.get(name)
            if d is not None:
                param.add_(d.to(param.device, param.dtype), alpha=coef)

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the base encoder's weights, exactly."""
        for name, param in self._params.items():
            param.copy_(self._base[name])

    # -- data --------------------------------------------------------------------------------
    def _examples(self, task_name: str, split: str, limit: int | None) -> list[Any]:
        task = self.tasks.get(task_name)
        if task is None:
            raise TvbasisError(f"Evaluator: unknown dataset {task_name!r} (have {sorted(self.tasks)})")
        examples = task.split(split)[:limit]
        if not examples:
            raise TvbasisError(f"Evaluator: dataset {task_name!r} has no {split} images")
        return examples

    def _batches(self, task_name: str, split: str, limit: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """uint8 image batches and labels, in split order (from memory when they fit the cache)."""
        key = (task_name, split, limit)
        hit = self._cache.get(key)
        if hit is None:
            examples = self._examples(task_name, split, limit)
            size = self.preprocess.image_size
            nbytes = len(examples) * 3 * size * size
            loader = _loader(examples, self.preprocess, self.batch_size, self.workers, None)
            if self._cached + nbytes > self.cache_bytes:
                yield from _iterate(loader)
                return
            images, labels = zip(*_iterate(loader), strict=True)
            hit = self._cache[key] = (torch.cat(images), torch.cat(labels))
            self._cached += nbytes
        images, labels = hit
        for s in range(0, len(labels), self.batch_size):
            yield images[s : s + self.batch_size], labels[s : s + self.batch_size]

    # -- evaluation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, task_name: str, split: str = "test", limit: int | None = None) -> torch.Tensor:
        """``logit_scale * normalize(image_embeds) @ head.T`` for the split's first ``limit`` images (CPU)."""
        return torch.cat([self._logits(task_name, images) for images, _ in self._batches(task_name, split, limit)])

    def _logits(self, task_name: str, images: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess.normalise(images.to(self.device, non_blocking=True))
        with _autocast(self.device):
            emb = self.model(pixel_values=pixels).image_embeds
        return (self.logit_scale * F.normalize(emb.float(), dim=-1) @ self.heads[task_name].T).cpu()

    @torch.inference_mode()
    def accuracy(self, task_name: str, split: str = "test", limit: int | None = None) -> float:
        """Top-1 accuracy of the current weights on the first ``limit`` images of a split."""
        correct = total = 0
        for images, labels in self._batches(task_name, split, limit):
            correct += int((self._logits(task_name, images).argmax(-1) == labels).sum())
            total += len(labels)
        return correct / total

    def accuracies(self, split: str = "test", limit: int | None = None) -> dict[str, float]:
        """:meth:`accuracy` for every dataset."""
        return {name: self.accuracy(name, split, limit) for name in self.tasks}
