"""The vision path offline: a tiny random CLIP, a tokenizer built here, synthetic image folders.

Nothing is downloaded: the CLIP model is a randomly initialised ``CLIPConfig`` with 32-wide
towers, the tokenizer a byte-level CLIP BPE vocabulary without merges, and the datasets
coloured squares, stripes and blobs whose classes a few fine-tuning steps learn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from tvbasis.build import build_store
from tvbasis.cli import app
from tvbasis.errors import CheckpointError, TvbasisError
from tvbasis.methods import PCA
from tvbasis.store import MANIFEST
from tvbasis.tasks import TaskSource
from tvbasis.vision import convert as vc
from tvbasis.vision.data import CLIP_MEAN, SUITES, Preprocess, load_task
from tvbasis.vision.model import (
    FINETUNE_MARKER,
    HEAD_FILE,
    Evaluator,
    FinetuneConfig,
    encoder_dir,
    finetune_cached,
    load_clip,
    zero_shot_head,
)

# A 32-wide model: BLAS threads only add wake-up latency (100x slower steps on a busy 2-core machine).
pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
PROJ = 16
FAST = FinetuneConfig(steps=25, batch_size=8, lr=2e-3, weight_decay=0.0, warmup_steps=0)


# --------------------------------------------------------------------------------------------
# Fixtures: a tiny CLIP and synthetic datasets
# --------------------------------------------------------------------------------------------
def _byte_vocab() -> dict[str, int]:
    """CLIP's byte-to-unicode alphabet, each symbol alone and word-final, plus the two special tokens."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def make_clip(out: Path, *, patch: int = 8, width: int = 32, seed: int = 0, preprocessor: bool = True) -> Path:
    """A tiny random CLIPModel directory with a tokenizer that transformers loads offline."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab = _byte_vocab()
    eos = vocab["<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    text = {
        "vocab_size": len(vocab),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 48,
        "eos_token_id": eos,
        "bos_token_id": vocab["<|startoftext|>"],
        "pad_token_id": eos,
    }
    vision = {
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": patch,
    }
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=PROJ))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if preprocessor:
        pre = {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "size": {"shortest_edge": 32}}
        (out / "preprocessor_config.json").write_text(json.dumps(pre))
    return out


def _draw(kind: str, label: int, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    w, h = size
    img = rng.integers(0, 40, (h, w, 3)).astype(np.uint8)
    if kind == "Colors":  # whole image one of red / green / blue
        img[..., label] = np.clip(img[..., label].astype(int) + 200, 0, 255)
    elif kind == "Blobs":  # a bright square at the left, middle or right
        x0 = [2, w // 2 - 6, w - 14][label]
        img[h // 2 - 6 : h // 2 + 6, x0 : x0 + 12] = 255
    else:  # Stripes: horizontal or vertical bars
        if label == 0:
            img[::4] = 255
        else:
            img[:, ::4] = 255
    return Image.fromarray(img)


DATASETS = {
    "Colors": ("red", "green", "blue"),
    "Blobs": ("left", "middle", "right"),
    "Stripes": ("horizontal", "vertical"),
}


def make_data(root: Path, per_class: dict[str, int] | None = None) -> Path:
    """Three ImageFolder datasets; Stripes has its own val/ folder, the others get one carved from train."""
    per_class = per_class or {"train": 16, "test": 8}
    rng = np.random.default_rng(0)
    for name, classes in DATASETS.items():
        splits = dict(per_class)
        if name == "Stripes":
            splits["val"] = 6
        for split, n in splits.items():
            for label, cls in enumerate(classes):
                d = root / name / split / cls
                d.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    size = (40 + 4 * (i % 3), 36)  # not square: the resize and crop matter
                    _draw(name, label, rng, size).save(d / f"{i:03d}.png")
    (root / "Blobs" / "classnames.txt").write_text("blob on the left\nblob in the middle\nblob on the right\n")
    return root


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def other_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same towers but patch 16: a CLIP of another architecture."""
    return make_clip(tmp_path_factory.mktemp("clip16") / "tiny-clip-p16", patch=16)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def one_line_exit2(args: Sequence[str | Path]) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


# --------------------------------------------------------------------------------------------
# open_clip <-> Hugging Face
# --------------------------------------------------------------------------------------------
def _reference_open_clip_image(oc: dict[str, torch.Tensor], pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """open_clip's VisionTransformer forward written from its definition (fused nn.MultiheadAttention)."""
    p = "visual."
    x = F.conv2d(pixels, oc[p + "conv1.weight"], stride=oc[p + "conv1.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = oc[p + "class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + oc[p + "positional_embedding"]
    width = x.shape[-1]
    x = F.layer_norm(x, (width,), oc[p + "ln_pre.weight"], oc[p + "ln_pre.bias"])
    n_layers = len({k.split(".")[3] for k in oc if k.startswith(p + "transformer.resblocks.")})
    for i in range(n_layers):
        b = f"{p}transformer.resblocks.{i}."
        attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict(
            {
                "in_proj_weight": oc[b + "attn.in_proj_weight"],
                "in_proj_bias": oc[b + "attn.in_proj_bias"],
                "out_proj.weight": oc[b + "attn.out_proj.weight"],
                "out_proj.bias": oc[b + "attn.out_proj.bias"],
            }
        )
        h = F.layer_norm(x, (width,), oc[b + "ln_1.weight"], oc[b + "ln_1.bias"])
        x = x + attn(h, h, h, need_weights=False)[0]
        h = F.layer_norm(x, (width,), oc[b + "ln_2.weight"], oc[b + "ln_2.bias"])
        h = F.linear(h, oc[b + "mlp.c_fc.weight"], oc[b + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU, as OpenAI's models
        x = x + F.linear(h, oc[b + "mlp.c_proj.weight"], oc[b + "mlp.c_proj.bias"])
    pooled = F.layer_norm(x[:, 0], (width,), oc[p + "ln_post.weight"], oc[p + "ln_post.bias"])
    return pooled @ oc[p + "proj"]


def test_open_clip_round_trip(clip_dir: Path, tmp_path: Path) -> None:
    clip = load_clip(clip_dir)
    state = {k: v.clone() for k, v in clip.model.state_dict().items()}
    oc = vc.hf_to_open_clip(state)
    assert oc["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert oc["visual.proj"].shape == (32, PROJ) and oc["text_projection"].shape == (32, PROJ)
    assert "transformer.resblocks.1.mlp.c_fc.weight" in oc and "token_embedding.weight" in oc
    back = vc.open_clip_to_hf(oc, "oc")
    assert set(back) == set(state)
    for k, v in state.items():
        assert torch.equal(back[k], v), k

    # The mapping means what open_clip means: same image features as its own forward pass.
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        hf = clip.model.visual_projection(clip.model.vision_model(pixel_values=pixels).pooler_output)
        ref = _reference_open_clip_image(oc, pixels, heads=2)
    torch.testing.assert_close(hf, ref, atol=1e-5, rtol=1e-4)

    # Through files: a wrapped (ImageEncoder-style "model.") torch state dict and a convert to a CLIPModel dir.
    pt = tmp_path / "openclip.pt"
    torch.save({f"model.{k}": v for k, v in oc.items()}, pt)
    read, config = vc.read_clip_state(pt)
    assert config is None and all(torch.equal(read[k], state[k]) for k in state)
    kind, notes = vc.convert_checkpoint(pt, tmp_path / "converted", tokenizer=clip_dir, head_width=16)
    assert kind == "CLIPModel" and any("read off the tensors" in n for n in notes)
    conv = load_clip(tmp_path / "converted")
    ids = clip.tokenizer(["a photo of a cat.", "blue"], padding=True, return_tensors="pt")
    with torch.no_grad():
        for m in (clip.model, conv.model):
            m.eval()
        a = clip.model.text_projection(clip.model.text_model(**ids).pooler_output)
        b = conv.model.text_projection(conv.model.text_model(**ids).pooler_output)
        torch.testing.assert_close(a, b)
        img_a = clip.model.vision_model(pixel_values=pixels).pooler_output
        img_b = conv.model.vision_model(pixel_values=pixels).pooler_output
        torch.testing.assert_close(img_a, img_b)

    # An image encoder alone (no text transformer, as the task vectors paper's ImageEncoder) -> encoder dir.
    enc_only = {k: v for k, v in oc.items() if not k.startswith("transformer.")}
    torch.save(enc_only, tmp_path / "enc.pt")
    kind, _ = vc.convert_checkpoint(tmp_path / "enc.pt", tmp_path / "enc", like=clip_dir)
    assert kind == "CLIPVisionModelWithProjection"
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(
        tmp_path / "enc", local_files_only=True, use_safetensors=True
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).image_embeds, hf)


def test_architecture_mismatch_is_refused(clip_dir: Path, other_clip: Path, tmp_path: Path) -> None:
    base = vc.read_image_encoder(clip_dir)
    with pytest.raises(CheckpointError) as info:
        vc.vision_task_vector(base, other_clip, clip_dir)
    msg = str(info.value)
    assert "\n" not in msg and str(other_clip) in msg and "another architecture" in msg
    assert "patch_embedding" in msg and "patch 16" in msg and "patch 8" in msg
    # open_clip files of another architecture, and non-ViT towers, are refused the same way.
    oc = vc.hf_to_open_clip(load_clip(other_clip).model.state_dict())
    torch.save(oc, tmp_path / "p16.pt")
    with pytest.raises(CheckpointError, match="another architecture"):
        vc.vision_task_vector(base, tmp_path / "p16.pt", clip_dir)
    with pytest.raises(CheckpointError, match="ResNet"):
        vc.open_clip_to_hf({"visual.layer1.0.conv1.weight": torch.zeros(1)}, "rn50.pt")
    with pytest.raises(CheckpointError, match="not a CLIP checkpoint"):
        vc.read_clip_state(_write_bert_like(tmp_path / "bert.safetensors"))
    # a pickled whole module needs code execution: refused with the way out
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match=r"state_dict\(\)"):
        vc.read_clip_state(tmp_path / "module.pt")


def _write_bert_like(path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"encoder.layer.0.attention.self.query.weight": torch.zeros(2, 2)}, str(path))
    return path


def test_hf_vision_only_checkpoints_give_task_vectors(clip_dir: Path, tmp_path: Path) -> None:
    """A CLIPVisionModel (no projection) fine-tune: its projection counts as unchanged."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    clip = load_clip(clip_dir)
    base = vc.read_image_encoder(clip_dir)
    cfg = CLIPVisionConfig.from_dict(vc.vision_config_dict(clip.config))
    model = CLIPVisionModel(cfg)
    # transformers 5 names a CLIPVisionModel's tensors without the "vision_model." prefix (4.x kept it)
    state = {k.removeprefix("vision_model."): v + 0.5 for k, v in base.items() if k.startswith("vision_model.")}
    model.load_state_dict(state)
    model.save_pretrained(tmp_path / "vis")
    tau = vc.vision_task_vector(base, tmp_path / "vis", clip_dir)
    assert set(tau) == set(base)
    assert torch.count_nonzero(tau[vc.PROJECTION]) == 0
    torch.testing.assert_close(tau["vision_model.pre_layrnorm.weight"], torch.full((32,), 0.5))


# --------------------------------------------------------------------------------------------
# Data and preprocessing
# --------------------------------------------------------------------------------------------
def test_datasets_splits_and_classnames(data_root: Path) -> None:
    colors = load_task(data_root, "Colors")
    assert colors.classnames == ["blue", "green", "red"]  # sorted folder names
    assert len(colors.val) == 3 * 2 and len(colors.train) == 3 * 14 and len(colors.test) == 24
    assert "carved" in colors.val_source
    assert {e.path for e in colors.val}.isdisjoint({e.path for e in colors.train})
    again = load_task(data_root, "colors")  # case-insensitive folder match, same carve and order
    assert [e.path for e in again.val] == [e.path for e in colors.val]
    assert load_task(data_root, "Blobs").classnames[0] == "blob on the left"
    stripes = load_task(data_root, "Stripes", train_limit=5)
    assert stripes.val_source == "val" and len(stripes.val) == 12 and len(stripes.train) == 5
    assert stripes.templates == ["a photo of a {}."]  # not in the registry: the generic template
    assert len(SUITES[8]) == 8 and len(SUITES[14]) == 14 and len(SUITES[20]) == 20
    with pytest.raises(TvbasisError, match="dataset folder not found"):
        load_task(data_root, "Cars")


def test_preprocess_shape_and_normalisation(clip_dir: Path, tmp_path: Path) -> None:
    pre = Preprocess.for_model(clip_dir, 32)
    assert pre.mean == (0.5, 0.4, 0.3) and pre.std == (0.2, 0.25, 0.3)
    Image.new("RGB", (80, 40), (255, 128, 0)).save(tmp_path / "wide.png")
    Image.new("L", (20, 50), 200).save(tmp_path / "tall_gray.png")
    for name in ("wide.png", "tall_gray.png"):
        raw = pre.load(tmp_path / name)
        assert raw.shape == (3, 32, 32) and raw.dtype == torch.uint8
    x = pre(tmp_path / "wide.png")
    want = torch.tensor([(1.0 - 0.5) / 0.2, (128 / 255 - 0.4) / 0.25, (0.0 - 0.3) / 0.3])
    torch.testing.assert_close(x.mean(dim=(1, 2)), want, atol=1e-2, rtol=0)
    assert Preprocess.for_model(tmp_path, 32).mean == CLIP_MEAN  # no preprocessor_config.json: CLIP's defaults
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(TvbasisError, match=r"broken\.png: cannot read image"):
        pre.load(tmp_path / "broken.png")


def test_zero_shot_head(clip_dir: Path) -> None:
    clip = load_clip(clip_dir)
    templates = ["a photo of a {}.", "a {} thing."]
    head = zero_shot_head(clip, ["red", "green", "blue"], templates)
    assert head.shape == (3, PROJ)
    torch.testing.assert_close(head.norm(dim=-1), torch.ones(3))
    # row 0 by hand: normalised mean of the normalised prompt embeddings
    ids = clip.tokenizer([t.replace("{}", "red") for t in templates], padding=True, return_tensors="pt")
    with torch.no_grad():
        e = F.normalize(clip.model.text_projection(clip.model.text_model(**ids).pooler_output), dim=-1)
    torch.testing.assert_close(head[0], F.normalize(e.mean(0), dim=-1), atol=1e-5, rtol=1e-5)
    with pytest.raises(TvbasisError, match="at least 2 classes"):
        zero_shot_head(clip, ["only"], templates)


# --------------------------------------------------------------------------------------------
# Fine-tuning, evaluation, stores
# --------------------------------------------------------------------------------------------
def test_finetune_evaluate_and_build_store(clip_dir: Path, data_root: Path, cache: Path, tmp_path: Path) -> None:
    tasks = [load_task(data_root, n) for n in ("Colors", "Blobs")]
    ev = Evaluator(clip_dir, tasks, device="cpu", batch_size=64)
    base_train = ev.accuracy("Colors", "train")
    ft = finetune_cached(clip_dir, tasks[0], cache / "finetunes", FAST, device="cpu")
    marker = json.loads((ft / FINETUNE_MARKER).read_text())
    assert marker["loss_last"] < marker["loss_first"]
    assert (ft / HEAD_FILE).is_file() and (ft / "preprocessor_config.json").is_file()
    assert finetune_cached(clip_dir, tasks[0], cache / "finetunes", FAST, device="cpu") == ft  # cached
    assert not [p for p in ft.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind

    from transformers import CLIPVisionModelWithProjection

    loaded = CLIPVisionModelWithProjection.from_pretrained(ft, local_files_only=True, use_safetensors=True)
    assert loaded.visual_projection.weight.shape == (PROJ, 32)

    enc = encoder_dir(clip_dir, cache)
    assert vc.read_config(enc)["architectures"] == ["CLIPVisionModelWithProjection"]
    base = ev.base_state()
    assert set(base) == set(ev.names()) == set(vc.read_image_encoder(enc))
    tau = vc.vision_task_vector(base, ft, enc)
    ev.set_task_vector(tau)
    tuned_train = ev.accuracy("Colors", "train")
    assert tuned_train > base_train + 0.2, (base_train, tuned_train)
    assert tuned_train >= 0.9
    ev.reset()
    assert ev.accuracy("Colors", "train") == base_train
    ev.set_weights(vc.read_image_encoder(ft))  # the fine-tune's own weights: the same model as base + tau
    assert ev.accuracy("Colors", "train") == tuned_train
    with pytest.raises(TvbasisError, match="not an image-encoder parameter"):
        ev.set_weights({"text_model.final_layer_norm.weight": torch.ones(32)})
    ev.reset()

    ft2 = finetune_cached(clip_dir, tasks[1], cache / "finetunes", FAST, device="cpu")
    store = build_store(enc, [TaskSource("Colors", ft), TaskSource("Blobs", ft2)], PCA(n_atoms=2), tmp_path / "s")
    assert store.task_names == ["Colors", "Blobs"]
    assert max(t["rel_error"] for t in store.manifest["tasks"]) < 1e-4  # M = T: exact

    from tvbasis.arithmetic import combination_state, task_coefficients, task_weights

    delta = combination_state(store, task_coefficients(store.decoder, task_weights(store.task_names, {"Colors": 1})))
    ev.set_task_vector(delta)
    assert ev.accuracy("Colors", "train") == tuned_train


# --------------------------------------------------------------------------------------------
# The suite end to end, and the CLI
# --------------------------------------------------------------------------------------------
def test_suite_end_to_end(clip_dir: Path, data_root: Path, cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # Colors comes as an open_clip state dict (as converted from the task vectors paper's checkpoints)
    ft = finetune_cached(clip_dir, load_task(data_root, "Colors"), cache / "finetunes", FAST, device="cpu")
    oc = vc.hf_to_open_clip(vc.read_image_encoder(ft))
    torch.save({f"model.{k}": v for k, v in oc.items()}, tmp_path / "colors.pt")
    args = [
        "vision", "suite", "--data-root", data_root, "--base", clip_dir, "--dataset", "Colors", "--dataset", "Blobs",
        "--finetuned", f"Colors={tmp_path / 'colors.pt'}",
        "--out", out, "--cache", cache, "--method", "pca", "--method", "autoencoder", "-M", "1",
        "--control", "Stripes", "--steps", FAST.steps, "--batch-size", FAST.batch_size, "--lr", FAST.lr,
        "--weight-decay", 0, "--warmup-steps", 0, "--device", "cpu", "--val-limit", 6, "--autoencoder-steps", 300,
    ]  # fmt: skip
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    results = json.loads((out / "results.json").read_text())
    assert results["task_names"] == ["Colors", "Blobs"]
    assert results["tasks"]["Colors"]["imported"] and not results["tasks"]["Blobs"]["imported"]
    imported = Path(results["tasks"]["Colors"]["finetune"])
    assert all(torch.equal(v, vc.read_image_encoder(ft)[k]) for k, v in vc.read_image_encoder(imported).items())
    assert set(results["addition"]) == {"full task vectors", "pca M=1", "autoencoder M=1", "autoencoder M=1 atoms-sum"}
    assert set(results["negation"]) == {"Colors", "Blobs"}
    assert results["negation"]["Colors"]["full task vectors"]["control"] == "Stripes"
    assert "Stripes" in results["control_zero_shot"]
    for n in ("Colors", "Blobs"):
        assert results["finetuned"]["test"][n] > results["zero_shot"]["test"][n]
    report = (out / "report.md").read_text()
    assert "Task addition" in report and "Negation through the store" in report
    assert (out / "stores" / "pca-M1" / MANIFEST).is_file()
    assert "report:" in result.output


def test_cli_finetune_evaluate_convert(clip_dir: Path, data_root: Path, cache: Path, tmp_path: Path) -> None:
    train = ["--steps", FAST.steps, "--batch-size", FAST.batch_size, "--lr", FAST.lr, "--weight-decay", 0]
    r = runner.invoke(
        app,
        [str(a) for a in ["vision", "finetune", "--base", clip_dir, "--data-root", data_root, "--dataset", "Colors",
                          "--cache", cache, "--warmup-steps", 0, "--device", "cpu", *train]],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    ft = Path(r.output.split("Colors: ")[1].split()[0])
    assert (ft / FINETUNE_MARKER).is_file()
    r = runner.invoke(
        app,
        [str(a) for a in ["vision", "evaluate", "--base", clip_dir, "--data-root", data_root, "--dataset", "Colors",
                          "--weights", ft, "--split", "train", "--device", "cpu", "--json"]],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["Colors"] >= 0.9
    r = runner.invoke(app, ["vision", "datasets", "--data-root", str(data_root), "--dataset", "Colors"])
    assert r.exit_code == 0 and "3 classes" in r.output
    r = runner.invoke(app, ["vision", "convert", str(clip_dir), "--image-encoder", "--out", str(tmp_path / "enc")])
    assert r.exit_code == 0, r.output
    assert vc.read_config(tmp_path / "enc")["model_type"] == "clip_vision_model"


def test_cli_bad_inputs_exit_2(clip_dir: Path, other_clip: Path, data_root: Path, cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    line = one_line_exit2(
        ["vision", "suite", "--data-root", tmp_path / "nowhere", "--base", clip_dir, "--out", out, "--cache", cache]
    )
    assert "nowhere" in line
    line = one_line_exit2(
        ["vision", "suite", "--data-root", data_root, "--base", clip_dir, "--suite", "8", "--out", out,
         "--cache", cache]
    )  # fmt: skip
    assert "dataset folder not found" in line and "Cars" in line
    assert not out.exists()
    # a user-supplied fine-tune of another architecture: refused before anything is trained or written
    line = one_line_exit2(
        ["vision", "suite", "--data-root", data_root, "--base", clip_dir, "--dataset", "Colors", "--dataset", "Blobs",
         "--finetuned", f"Colors={other_clip}", "--control", "Stripes", "--out", out, "--cache", cache]
    )  # fmt: skip
    assert "another architecture" in line and str(other_clip) in line
    assert not out.exists()
    line = one_line_exit2(
        ["vision", "convert", other_clip, "--like", clip_dir, "--image-encoder", "--out", tmp_path / "conv"]
    )
    assert "another architecture" in line and not (tmp_path / "conv").exists()
    line = one_line_exit2(
        ["vision", "evaluate", "--base", clip_dir, "--data-root", data_root, "--dataset", "Colors",
         "--weights", other_clip, "--device", "cpu"]
    )  # fmt: skip
    assert "another architecture" in line
    line = one_line_exit2(
        ["vision", "suite", "--data-root", data_root, "--base", clip_dir, "--dataset", "Colors", "--dataset", "Blobs",
         "--out", out, "--cache", cache]
    )  # fmt: skip
    assert "negation control 'ImageNet'" in line and "--no-negation" in line and not out.exists()
    line = one_line_exit2(["vision", "suite", "--data-root", data_root, "--base", clip_dir, "--suite", "7"])
    assert "--suite 7" in line
    enc = encoder_dir(clip_dir, cache)
    line = one_line_exit2(["vision", "finetune", "--base", enc, "--data-root", data_root, "--dataset", "Colors"])
    assert "text tower" in line
