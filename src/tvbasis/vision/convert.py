"""CLIP checkpoints: open_clip and Hugging Face naming, architecture checks, image-encoder directories.

Everything here works in Hugging Face ``CLIPModel`` naming (``vision_model.*``,
``visual_projection.weight``, ``text_model.*``, ``text_projection.weight``, ``logit_scale``).
open_clip state dicts (OpenAI-style ViT towers: ``visual.conv1.weight``,
``visual.transformer.resblocks.N.attn.in_proj_weight``, ``visual.proj``, ...) are converted
on reading: fused ``in_proj`` q/k/v split into three projections, ``proj`` matrices
transposed (open_clip applies ``x @ proj``, a ``Linear`` applies ``x @ W.T``). The
conversion is exact, tensor for tensor.

Torch files are loaded with ``weights_only=True`` only: a whole pickled module (as the task
vectors paper released its ``ImageEncoder`` checkpoints) needs code execution and is refused;
``torch.save(encoder.state_dict(), "x.pt")`` in the environment that made it gives a file
that loads here.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tvbasis.errors import CheckpointError, TvbasisError
from tvbasis.io.checkpoint import open_checkpoint

VISION_PREFIX = "vision_model."
PROJECTION = "visual_projection.weight"
ENCODER_ARCHITECTURE = "CLIPVisionModelWithProjection"
#: Files besides the weights that a converted or derived directory keeps from its source.
PREPROCESSOR_FILE = "preprocessor_config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)

_BLOCK_MAP = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
_FUSED = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}
_TOP_MAP = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "text_projection.weight": "text_projection.weight",  # open_clip models with a Linear text projection
}
_TRANSPOSED = {"visual.proj": PROJECTION, "text_projection": "text_projection.weight"}
_IGNORED = {"attn_mask"}  # open_clip's causal-mask buffer: rebuilt by the model, not a weight
_OC_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)$")
_HF_QKV = re.compile(r"^self_attn\.([qkv])_proj\.(weight|bias)$")
# Wrappers around an open_clip model: DDP's ``module.``, the task vectors paper's ``ImageEncoder.model``.
_WRAPPER_PREFIXES = ("module.model.", "model.", "module.")


# --------------------------------------------------------------------------------------------
# Naming
# --------------------------------------------------------------------------------------------
def strip_wrapper_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a prefix every key shares (``model.``, ``module.``) left by a wrapping module."""
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def naming_of(names: Sequence[str] | Mapping[str, Any]) -> str | None:
    """``"open_clip"``, ``"hf"``, ``"hf-bare"`` (a transformers 5 ``CLIPVisionModel``: no ``vision_model.``
    prefix) or None, from the tensor names."""
    names = set(names)
    if "visual.conv1.weight" in names or "token_embedding.weight" in names:
        return "open_clip"
    if any(n.startswith(("vision_model.", "text_model.")) for n in names):
        return "hf"
    if "embeddings.patch_embedding.weight" in names:
        return "hf-bare"
    return None


def _foreign(source: str, name: str) -> TvbasisError:
    if name.startswith(("visual.layer", "visual.attnpool", "visual.stem")):
        why = "a ResNet (ModifiedResNet) image tower; only ViT CLIP models are supported"
    elif name.startswith(("visual.trunk", "visual.head")):
        why = "a timm image tower; only OpenAI-style ViT CLIP models are supported"
    else:
        why = "not part of an OpenAI-style CLIP ViT (a CLIP checkpoint of another architecture?)"
    return CheckpointError(f"{source}: tensor {name!r} is {why}")


def open_clip_to_hf(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """open_clip tensor names -> Hugging Face CLIPModel names (q/k/v split, projections transposed)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in strip_wrapper_prefix(state).items():
        if name in _IGNORED:
            continue
        m = _OC_BLOCK.match(name)
        if m:
            prefix = f"{'vision_model' if m.group(1) else 'text_model'}.encoder.layers.{m.group(2)}."
            rest = m.group(3)
            if rest in _BLOCK_MAP:
                out[prefix + _BLOCK_MAP[rest]] = t
            elif rest in _FUSED:
                if t.shape[0] % 3:
                    raise CheckpointError(f"{source}: tensor {name!r} has {t.shape[0]} rows, not 3 equal q/k/v parts")
                for part, value in zip("qkv", t.chunk(3, dim=0), strict=True):
                    out[f"{prefix}self_attn.{part}_proj.{_FUSED[rest]}"] = value.contiguous()
            else:
                raise _foreign(source, name)
        elif name in _TOP_MAP:
            out[_TOP_MAP[name]] = t
        elif name in _TRANSPOSED:
            if t.ndim != 2:
                raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, expected a matrix")
            out[_TRANSPOSED[name]] = t.t().contiguous()
        else:
            raise _foreign(source, name)
    return out


def hf_to_open_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`open_clip_to_hf` (q/k/v fused again, projections transposed back)."""
    top = {v: k for k, v in _TOP_MAP.items() if k != "text_projection.weight"}
    transposed = {v: k for k, v in _TRANSPOSED.items()}
    block = {v: k for k, v in _BLOCK_MAP.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, t in state.items():
        if name.endswith("position_ids"):
            continue
        m = _HF_BLOCK.match(name)
        if m:
            prefix = f"{'visual.' if m.group(1) == 'vision_model' else ''}transformer.resblocks.{m.group(2)}."
            rest = m.group(3)
            q = _HF_QKV.match(rest)
            if q:
                qkv.setdefault((prefix, q.group(2)), {})[q.group(1)] = t
            elif rest in block:
                out[prefix + block[rest]] = t
            else:
                raise CheckpointError(f"tensor {name!r} has no open_clip counterpart")
        elif name in transposed:
            out[transposed[name]] = t.t().contiguous()
        elif name in top:
            out[top[name]] = t
        else:
            raise CheckpointError(f"tensor {name!r} has no open_clip counterpart")
    for (prefix, kind), parts in qkv.items():
        if set(parts) != set("qkv"):
            raise CheckpointError(f"{prefix}: q/k/v projections incomplete ({sorted(parts)})")
        out[f"{prefix}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VitArch:
    """The shape of a CLIP ViT image tower, as its tensors give it (None: tensor absent)."""

    width: int | None
    layers: int
    patch: int | None
    image_size: int | None
    mlp: int | None
    embed_dim: int | None

    def __str__(self) -> str:
        def v(x: int | None) -> str:
            return "?" if x is None else str(x)

        return (
            f"ViT width {v(self.width)}, {self.layers} layers, patch {v(self.patch)}, image {v(self.image_size)}, "
            f"MLP {v(self.mlp)}, embedding {v(self.embed_dim)}"
        )


def vit_arch(shapes: Mapping[str, Sequence[int]]) -> VitArch:
    """Width, depth, patch and image size of the image tower in HF-named ``shapes``."""

    def dim(name: str, axis: int) -> int | None:
        s = shapes.get(name)
        return int(s[axis]) if s else None

    layers = {int(m.group(2)) for n in shapes if (m := _HF_BLOCK.match(n)) and m.group(1) == "vision_model"}
    patch = dim("vision_model.embeddings.patch_embedding.weight", -1)
    n_pos = dim("vision_model.embeddings.position_embedding.weight", 0)
    grid = math.isqrt(n_pos - 1) if n_pos and n_pos > 1 else None
    return VitArch(
        width=dim("vision_model.embeddings.class_embedding", 0),
        layers=max(layers) + 1 if layers else 0,
        patch=patch,
        image_size=grid * patch if grid and patch else None,
        mlp=dim("vision_model.encoder.layers.0.mlp.fc1.weight", 0),
        embed_dim=dim(PROJECTION, 0),
    )


def check_same_architecture(
    shapes: Mapping[str, Sequence[int]],
    base_shapes: Mapping[str, Sequence[int]],
    source: str | Path,
    base_source: str | Path,
    optional: Sequence[str] = (PROJECTION,),
) -> None:
    """Refuse ``shapes`` unless it has exactly the base's tensors and shapes (``optional`` may be absent)."""

    def refuse(what: str) -> TvbasisError:
        return CheckpointError(
            f"{source}: {what}: a CLIP checkpoint of another architecture "
            f"({vit_arch(shapes)}; the base {base_source} is {vit_arch(base_shapes)})"
        )

    for name, want in base_shapes.items():
        got = shapes.get(name)
        if got is None:
            if name in optional:
                continue
            raise refuse(f"lacks tensor {name!r}")
        if tuple(got) != tuple(want):
            raise refuse(f"tensor {name!r} has shape {tuple(got)}, the base's is {tuple(want)}")
    extra = sorted(set(shapes) - set(base_shapes))
    if extra:
        raise refuse(f"has tensor {extra[0]!r}, which the base lacks")


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def read_config(model_dir: Path) -> dict[str, Any]:
    """``config.json`` of an HF directory, which must describe a CLIP model or CLIP vision tower."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind not in ("clip", "clip_vision_model"):
        raise CheckpointError(
            f"{path}: model_type {kind!r} is not a CLIP checkpoint (expected 'clip' or 'clip_vision_model')"
        )
    return config


def _open_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint file or HF directory, with a hint for pickled whole modules."""
    try:
        with open_checkpoint(path) as ckpt:
            return {name: ckpt.read(name) for name in ckpt.names()}
    except CheckpointError as exc:
        if "code execution" in str(exc):
            raise CheckpointError(
                f"{exc} For a pickled open_clip/ImageEncoder module, save its state dict instead: "
                "torch.save(model.state_dict(), 'encoder.pt') (see docs/vision.md)"
            ) from None
        raise


def read_clip_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """All tensors of a CLIP checkpoint in HF naming, and its config.json (None for a bare file).

    ``path``: an HF ``CLIPModel`` / ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection``
    directory, or a ``.safetensors`` / torch state-dict file with open_clip or HF names.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    config = read_config(path) if path.is_dir() else None
    state = _open_state(path)
    naming = naming_of(strip_wrapper_prefix(state))
    if naming == "open_clip":
        return open_clip_to_hf(state, str(path)), config
    state = strip_wrapper_prefix(state)
    if naming == "hf-bare":
        return {VISION_PREFIX + k: v for k, v in state.items()}, config
    if naming is None:
        example = ", ".join(repr(n) for n in list(state)[:3])
        raise CheckpointError(
            f"{path}: not a CLIP checkpoint: neither open_clip names ('visual.conv1.weight') nor Hugging Face "
            f"names ('vision_model.*') (found e.g. {example})"
        )
    return state, config


def image_encoder_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image tower's floating-point tensors (``vision_model.*`` and the projection), in float32."""
    return {
        k: v.to(torch.float32)
        for k, v in state.items()
        if (k.startswith(VISION_PREFIX) or k == PROJECTION) and v.dtype.is_floating_point
    }


def read_image_encoder(path: str | Path) -> dict[str, torch.Tensor]:
    """The image encoder of any supported CLIP checkpoint, HF-named, float32."""
    state, _ = read_clip_state(path)
    enc = image_encoder_state(state)
    if not enc:
        raise CheckpointError(f"{path}: holds no CLIP image-encoder tensors ('vision_model.*' / 'visual.*')")
    return enc


def shapes_of(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def vision_task_vector(
    base: Mapping[str, torch.Tensor], finetuned: str | Path, base_source: str | Path = "base"
) -> dict[str, torch.Tensor]:
    """``theta_t - theta_0`` over the base image encoder's tensors, from any supported fine-tune.

    The fine-tune must have the base's architecture (else a one-line error naming the file and
    tensor). A ``CLIPVisionModel`` checkpoint has no projection; it is then taken as unchanged.
    """
    ft = read_image_encoder(finetuned)
    check_same_architecture(shapes_of(ft), shapes_of(base), finetuned, base_source)
    return {k: (ft[k] - v if k in ft else torch.zeros_like(v)) for k, v in base.items()}


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------
def vision_config_dict(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``CLIPVisionConfig`` (with ``projection_dim``) of a CLIP or CLIP-vision config dict."""
    from transformers import CLIPConfig, CLIPVisionConfig

    if config.get("model_type") == "clip":
        full = CLIPConfig.from_dict(dict(config))
        vc = full.vision_config
        vc.projection_dim = full.projection_dim
    else:
        vc = CLIPVisionConfig.from_dict(dict(config))
    d = vc.to_dict()
    d["architectures"] = [ENCODER_ARCHITECTURE]
    d["model_type"] = "clip_vision_model"
    for k in ("transformers_version", "_name_or_path", "id2label", "label2id"):
        d.pop(k, None)
    return d


def _vision_config(shapes: Mapping[str, Sequence[int]], head_width: int, hidden_act: str) -> dict[str, Any]:
    arch = vit_arch(shapes)
    if arch.width is None or arch.patch is None or arch.image_size is None or arch.mlp is None or not arch.layers:
        raise CheckpointError("cannot read the image tower's architecture: class/patch/position embeddings missing")
    if arch.width % head_width:
        raise CheckpointError(f"image tower width {arch.width} is not a multiple of the head width {head_width}")
    return {
        "hidden_size": arch.width,
        "intermediate_size": arch.mlp,
        "num_hidden_layers": arch.layers,
        "num_attention_heads": arch.width // head_width,
        "image_size": arch.image_size,
        "patch_size": arch.patch,
        "hidden_act": hidden_act,
    }


def clip_config_from_state(
    state: Mapping[str, torch.Tensor], *, head_width: int = 64, hidden_act: str = "quick_gelu", text: bool = True
) -> dict[str, Any]:
    """A ``CLIPConfig`` dict read off the tensors of a (converted) open_clip checkpoint.

    Heads are ``width / head_width`` (open_clip's 64 for every OpenAI model). The text tower pools
    at the largest token id (``eos_token_id = 2`` selects that in transformers), as open_clip does.
    With ``text=False`` only the image tower is read (the text config is left at its defaults).
    """
    from transformers import CLIPConfig

    shapes = shapes_of(state)
    vision = _vision_config(shapes, head_width, hidden_act)
    text_config: dict[str, Any] = {}
    if text:
        layers = {int(m.group(2)) for n in shapes if (m := _HF_BLOCK.match(n)) and m.group(1) == "text_model"}
        tok = shapes.get("text_model.embeddings.token_embedding.weight")
        pos = shapes.get("text_model.embeddings.position_embedding.weight")
        fc1 = shapes.get("text_model.encoder.layers.0.mlp.fc1.weight")
        if tok is None or pos is None or fc1 is None or not layers:
            raise CheckpointError("the checkpoint has no complete text tower; convert it as an image encoder only")
        if tok[1] % head_width:
            raise CheckpointError(f"text tower width {tok[1]} is not a multiple of the head width {head_width}")
        text_config = {
            "vocab_size": tok[0],
            "hidden_size": tok[1],
            "intermediate_size": fc1[0],
            "num_hidden_layers": max(layers) + 1,
            "num_attention_heads": tok[1] // head_width,
            "max_position_embeddings": pos[0],
            "hidden_act": hidden_act,
            "eos_token_id": 2,
        }
    proj = vit_arch(shapes).embed_dim or shapes.get("text_projection.weight", (512,))[0]
    d = CLIPConfig(text_config=text_config, vision_config=vision, projection_dim=proj).to_dict()
    d["architectures"] = ["CLIPModel"]
    d.pop("transformers_version", None)
    return d


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def write_model_dir(
    tmp: Path, state: Mapping[str, torch.Tensor], config: Mapping[str, Any], copy_from: Sequence[Path] = ()
) -> None:
    """Write ``model.safetensors`` and ``config.json`` into ``tmp``, plus preprocessor/tokenizer files
    found in ``copy_from`` (first hit wins)."""
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), {"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    names = (PREPROCESSOR_FILE, *TOKENIZER_FILES) if config.get("model_type") == "clip" else (PREPROCESSOR_FILE,)
    for name in names:
        for src in copy_from:
            if (src / name).is_file() and not (tmp / name).exists():
                shutil.copy2(src / name, tmp / name)


# --------------------------------------------------------------------------------------------
# Conversion (``tvbasis vision convert``)
# --------------------------------------------------------------------------------------------
def _text_complete(state: Mapping[str, torch.Tensor]) -> bool:
    need = (
        "text_model.embeddings.token_embedding.weight",
        "text_model.final_layer_norm.weight",
        "text_projection.weight",
    )
    return all(k in state for k in need) and any(k.startswith("text_model.encoder.layers.") for k in state)


def _float_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the floating-point tensors of an HF directory or checkpoint file, in HF naming."""
    state, _ = read_clip_state(path)
    return {k: tuple(v.shape) for k, v in state.items() if v.dtype.is_floating_point}


def convert_checkpoint(
    source: str | Path,
    out: str | Path,
    *,
    like: str | Path | None = None,
    tokenizer: str | Path | None = None,
    image_encoder_only: bool = False,
    hidden_act: str = "quick_gelu",
    head_width: int = 64,
    overwrite: bool = False,
) -> tuple[str, list[str]]:
    """Write ``source`` (open_clip or HF CLIP) as a Hugging Face directory; return its kind and notes.

    A checkpoint with a complete text tower becomes a ``CLIPModel`` directory (unless
    ``image_encoder_only``); otherwise, or then, the image encoder becomes a
    ``CLIPVisionModelWithProjection`` directory, the layout of every vision fine-tune and of
    the base that ``tvbasis build`` takes. With ``like`` (an HF CLIP directory), the
    architecture must match it tensor for tensor and its config is reused; without it the
    config is read off the tensors (``hidden_act`` and ``head_width`` cannot be: OpenAI's
    models use quick_gelu and 64). Every check runs before anything is written.
    """
    from tvbasis.io.outputs import atomic_output, check_output_path

    source, out = Path(source), Path(out)
    check_output_path(out, overwrite)
    if hidden_act not in ("quick_gelu", "gelu"):
        raise TvbasisError(f"--act {hidden_act!r}: choose quick_gelu (OpenAI's models) or gelu")
    if head_width < 1:
        raise TvbasisError(f"--head-width {head_width}: must be at least 1")
    state, config = read_clip_state(source)
    like_path = Path(like) if like is not None else None
    like_config = read_config(like_path) if like_path is not None else None
    full = _text_complete(state) and not image_encoder_only
    notes: list[str] = []
    if full:
        target = {k: v for k, v in state.items() if v.dtype.is_floating_point}
        if like_config is not None and like_config.get("model_type") == "clip":
            cfg = like_config
        elif config is not None and config.get("model_type") == "clip":
            cfg = config
        else:
            cfg = clip_config_from_state(target, head_width=head_width, hidden_act=hidden_act)
            notes.append(f"config read off the tensors (hidden_act {hidden_act}, head width {head_width})")
    else:
        target = image_encoder_state(state)
        if not target:
            raise CheckpointError(f"{source}: holds no CLIP image-encoder tensors ('vision_model.*' / 'visual.*')")
        src_cfg = like_config or config
        if src_cfg is None:
            src_cfg = clip_config_from_state(target, head_width=head_width, hidden_act=hidden_act, text=False)
            notes.append(f"config read off the tensors (hidden_act {hidden_act}, head width {head_width})")
        cfg = vision_config_dict(src_cfg)
        if not full and _text_complete(state):
            notes.append("text tower left out (--image-encoder)")
    if like_path is not None:
        want = _float_shapes(like_path)
        if not full:
            want = {k: v for k, v in want.items() if k.startswith(VISION_PREFIX) or k == PROJECTION}
        check_same_architecture(shapes_of(target), want, source, like_path, optional=())
    copy_from = [p for p in (Path(tokenizer) if tokenizer else None, like_path, source) if p is not None and p.is_dir()]
    if full and not any((p / "tokenizer.json").is_file() or (p / "vocab.json").is_file() for p in copy_from):
        notes.append("no tokenizer files copied: give --tokenizer DIR (e.g. the HF directory of the same CLIP model)")
    with atomic_output(out, overwrite=overwrite) as tmp:
        write_model_dir(tmp, target, cfg, copy_from)
    return ("CLIPModel" if full else ENCODER_ARCHITECTURE), notes
