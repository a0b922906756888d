"""Image-classification datasets in torchvision ``ImageFolder`` layout, the paper's suites, CLIP preprocessing.

Layout under a user-supplied root (one folder per dataset, one per class)::

    ROOT/<Dataset>/train/<class>/*.png|jpg|jpeg|...
    ROOT/<Dataset>/val/<class>/...        optional: else carved from train (below)
    ROOT/<Dataset>/test/<class>/...
    ROOT/<Dataset>/classnames.txt         optional: one readable name per class, in sorted folder order
    ROOT/<Dataset>/templates.txt          optional: prompt templates, one per line, each with one "{}"

Classes are the sorted folder names of ``train`` (of ``test`` when a dataset, such as a
negation control, has no ``train``); the other splits may only use those classes. Without
``val``, a deterministic validation split is carved out of ``train``: per class,
``round(val_fraction * n)`` images (at least one when the class has two or more), chosen by a
seeded shuffle; the rest stays for training. Every split is then put in a seeded random
order, so "the first N examples" of a split is a random subset with all classes.

No torchvision: images are decoded with Pillow and preprocessed as CLIP does (shortest side
resized to the model's resolution, bicubic; center crop; scaled to [0, 1]; normalised with
the model's mean and std).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tvbasis.errors import TvbasisError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
SPLITS = ("train", "val", "test")
#: OpenAI CLIP's normalisation, used when the model directory has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_VAL_FRACTION = 0.1

_PHOTO = ("a photo of a {}.", "a photo of the {}.", "a close-up photo of a {}.", "a good photo of a {}.")
_DIGIT = ('a photo of the number: "{}".', "an image of the digit {}.", "a handwritten {}.")
_CHAR = ('a photo of the character: "{}".', "a handwritten character {}.", "an image of the symbol {}.")
_SMALL = ("a photo of a {}.", "a blurry photo of a {}.", "a low resolution photo of the {}.", "a photo of a small {}.")


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset the paper's suites use: its folder name, suites and prompt templates."""

    name: str
    suites: tuple[int, ...]  # the smallest suite that has it and every larger one
    templates: tuple[str, ...]
    #: Readable names for folders named 0, 1, ... (used only when every folder is a number).
    numeric_classnames: tuple[str, ...] = ()


def _spec(name: str, first: int, templates: Sequence[str], numeric: Sequence[str] = ()) -> DatasetSpec:
    return DatasetSpec(name, tuple(s for s in (8, 14, 20) if s >= first), tuple(templates), tuple(numeric))


#: Our own short template lists, in the spirit of CLIP's per-dataset prompts.
REGISTRY: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        _spec("Cars", 8, ("a photo of a {}.", "a photo of my {}.", "a photo of the {}, a type of car.")),
        _spec("DTD", 8, ("a photo of a {} texture.", "a photo of a {} pattern.", "a close-up of a {} surface.")),
        _spec(
            "EuroSAT",
            8,
            ("a satellite photo of {}.", "an aerial view of {}.", "a centered satellite image of {}."),
        ),
        _spec(
            "GTSRB",
            8,
            ('a photo of a "{}" traffic sign.', 'a zoomed-in photo of a "{}" road sign.', "a traffic sign: {}."),
        ),
        _spec("MNIST", 8, _DIGIT),
        _spec("RESISC45", 8, ("satellite imagery of {}.", "an aerial photo of {}.", "a remote sensing image of {}.")),
        _spec("SVHN", 8, ('a photo of the house number "{}".', "a street number {}.", "the digit {} on a wall.")),
        _spec("SUN397", 8, ("a photo of a {}.", "a photo of the {}, a kind of place.", "a scene showing a {}.")),
        _spec("CIFAR100", 14, _SMALL),
        _spec("STL10", 14, _PHOTO),
        _spec("Flowers102", 14, ("a photo of a {}, a type of flower.", "a close-up photo of a {} flower.")),
        _spec("OxfordIIITPet", 14, ("a photo of a {}, a type of pet.", "a photo of my {}, a cat or dog breed.")),
        _spec(
            "PCAM",
            14,
            ("a histopathology image of {}.", "a microscope slide showing {}.", "this tissue patch shows {}."),
            ("healthy lymph node tissue", "lymph node tumor tissue"),
        ),
        _spec(
            "FER2013",
            14,
            ("a photo of a {} looking face.", "a face showing the emotion: {}.", "a person who looks {}."),
            ("angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral"),
        ),
        _spec("EMNIST", 20, _CHAR),
        _spec("CIFAR10", 20, _SMALL),
        _spec("Food101", 20, ("a photo of {}, a type of food.", "a close-up photo of a plate of {}.")),
        _spec("FashionMNIST", 20, ("a photo of a {}.", "a grayscale photo of a {}, a piece of clothing.")),
        _spec(
            "RenderedSST2",
            20,
            ("a {} review of a movie.", "a sentence with a {} sentiment.", "text expressing a {} opinion."),
            ("negative", "positive"),
        ),
        _spec("KMNIST", 20, ('a photo of the hiragana character "{}".', "a handwritten Japanese character {}.")),
        # The negation control of the paper; in no suite.
        DatasetSpec(
            "ImageNet", (), ("a photo of a {}.", "a bad photo of a {}.", "art of the {}.", "a photo of a big {}.")
        ),
    )
}
SUITES: dict[int, tuple[str, ...]] = {n: tuple(s.name for s in REGISTRY.values() if n in s.suites) for n in (8, 14, 20)}
GENERIC_TEMPLATES = ("a photo of a {}.",)


@dataclass(frozen=True)
class Example:
    path: Path
    label: int


@dataclass
class VisionTask:
    """One dataset: readable class names, templates and the three splits (lists of image paths)."""

    name: str
    classnames: list[str]
    templates: list[str]
    root: Path
    train: list[Example] = field(default_factory=list)
    val: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)
    val_source: str = "val"  # "val" (the folder) or "carved from train"

    @property
    def source(self) -> str:
        return f"{self.root} (val: {self.val_source})"

    def split(self, name: str) -> list[Example]:
        if name not in SPLITS:
            raise TvbasisError(f"split must be train, val or test, got {name!r}")
        return getattr(self, name)


def suite_datasets(suite: int) -> tuple[str, ...]:
    """The datasets of the paper's 8-, 14- or 20-task suite."""
    if suite not in SUITES:
        raise TvbasisError(f"--suite {suite}: choose 8, 14 or 20")
    return SUITES[suite]


def dataset_dir(root: str | Path, name: str) -> Path:
    """``ROOT/<name>`` (the exact name, else a unique case-insensitive match)."""
    root = Path(root)
    if not root.is_dir():
        raise TvbasisError(f"--data-root {root}: no such directory")
    if (root / name).is_dir():
        return root / name
    hits = [p for p in root.iterdir() if p.is_dir() and p.name.lower() == name.lower()]
    if len(hits) == 1:
        return hits[0]
    raise TvbasisError(
        f"{root / name}: dataset folder not found (expected {root}/{name}/train/<class>/<image>; see docs/vision.md)"
    )


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_split(split_dir: Path, classes: Sequence[str]) -> list[Example]:
    index = {c: i for i, c in enumerate(classes)}
    out: list[Example] = []
    for c in _class_folders(split_dir):
        if c not in index:
            raise TvbasisError(
                f"{split_dir / c}: class {c!r} is not among the dataset's classes {list(classes)[:5]}..."
            )
        out.extend(Example(p, index[c]) for p in _images(split_dir / c))
    if not out:
        raise TvbasisError(f"{split_dir}: no images (looked for {', '.join(IMAGE_EXTENSIONS)} in class folders)")
    return out


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _seeded(seed: int, *parts: str) -> random.Random:
    """A generator seeded from the parts (not Python's salted ``hash``), stable across runs."""
    digest = hashlib.sha256("\0".join((str(seed), *parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _classnames(folder: Path, spec: DatasetSpec | None, classes: Sequence[str]) -> list[str]:
    override = folder / "classnames.txt"
    if override.is_file():
        names = _lines(override)
        if len(names) != len(classes):
            raise TvbasisError(f"{override}: has {len(names)} names, the dataset has {len(classes)} class folders")
        return names
    if spec and spec.numeric_classnames and len(classes) == len(spec.numeric_classnames):
        if all(c.isdigit() for c in classes) and sorted(int(c) for c in classes) == list(range(len(classes))):
            return [spec.numeric_classnames[int(c)] for c in classes]
    return [c.replace("_", " ") for c in classes]


def _templates(folder: Path, spec: DatasetSpec | None) -> list[str]:
    override = folder / "templates.txt"
    templates = _lines(override) if override.is_file() else list(spec.templates if spec else GENERIC_TEMPLATES)
    bad = [t for t in templates if t.count("{}") != 1]
    if bad or not templates:
        raise TvbasisError(f"{override}: every template needs exactly one '{{}}' (bad: {bad[:2]})")
    return templates


def load_task(
    root: str | Path,
    name: str,
    *,
    seed: int = 0,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    train_limit: int | None = None,
    need_train: bool = True,
) -> VisionTask:
    """Read ``ROOT/<name>`` (file lists only; images are decoded when used)."""
    folder = dataset_dir(root, name)
    name = folder.name  # the folder's own spelling: seeds and results do not depend on how it was asked for
    spec = REGISTRY.get(name) or next((s for s in REGISTRY.values() if s.name.lower() == name.lower()), None)
    dirs = {s: folder / s for s in SPLITS if (folder / s).is_dir()}
    if "test" not in dirs:
        raise TvbasisError(f"{folder / 'test'}: missing (each dataset needs test/<class>/<image>)")
    if need_train and "train" not in dirs:
        raise TvbasisError(f"{folder / 'train'}: missing (fine-tuning needs train/<class>/<image>)")
    if "val" not in dirs and "train" not in dirs:
        raise TvbasisError(f"{folder}: needs val/ or train/ (to carve a validation split from)")
    if not 0 < val_fraction < 1:
        raise TvbasisError(f"val_fraction {val_fraction}: must be in (0, 1)")
    classes = _class_folders(dirs.get("train", dirs["test"]))
    if len(classes) < 2:
        raise TvbasisError(f"{dirs.get('train', dirs['test'])}: needs at least 2 class folders, has {len(classes)}")
    splits = {s: _read_split(d, classes) for s, d in dirs.items()}
    val_source = "val"
    if "val" not in splits:
        train, val = _carve(splits["train"], val_fraction, _seeded(seed, name, "carve"))
        splits["train"], splits["val"], val_source = train, val, f"{val_fraction:g} of train, carved with seed {seed}"
    for s, examples in splits.items():
        _seeded(seed, name, s).shuffle(examples)  # "the first N" of a split: a random subset with all classes
    if train_limit is not None and "train" in splits:
        splits["train"] = splits["train"][:train_limit]
    return VisionTask(
        name=name,
        classnames=_classnames(folder, spec, classes),
        templates=_templates(folder, spec),
        root=folder,
        train=splits.get("train", []),
        val=splits["val"],
        test=splits["test"],
        val_source=val_source,
    )


def _carve(train: list[Example], fraction: float, rng: random.Random) -> tuple[list[Example], list[Example]]:
    """Per class, a seeded ``fraction`` of the training images (at least one of two or more) for validation."""
    by_class: dict[int, list[Example]] = {}
    for ex in train:
        by_class.setdefault(ex.label, []).append(ex)
    keep: list[Example] = []
    held: list[Example] = []
    for label in sorted(by_class):
        items = sorted(by_class[label], key=lambda e: e.path.name)
        rng.shuffle(items)
        k = max(1, round(fraction * len(items))) if len(items) >= 2 else 0
        held.extend(items[:k])
        keep.extend(items[k:])
    return keep, held


def fingerprint_task(task: VisionTask) -> str:
    """Hash of what training sees: classes, templates and the training files (path, size, mtime)."""
    h = hashlib.sha256()
    h.update(json.dumps([task.name, task.classnames, task.templates], ensure_ascii=False).encode())
    for ex in sorted(task.train, key=lambda e: str(e.path)):
        st = ex.path.stat()
        h.update(f"{os.path.relpath(ex.path, task.root)}\0{st.st_size}\0{st.st_mtime_ns}\0{ex.label}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preprocess:
    """CLIP's evaluation transform: resize the shortest side (bicubic), center crop, scale, normalise."""

    image_size: int
    resize: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def for_model(cls, model_dir: Path, image_size: int) -> Preprocess:
        """Mean, std and resize from ``preprocessor_config.json`` when present, else CLIP's defaults."""
        path = model_dir / "preprocessor_config.json"
        if not path.is_file():
            return cls(image_size, image_size)
        try:
            cfg = json.loads(path.read_text())
            size = cfg.get("size", image_size)
            resize = int(size.get("shortest_edge", image_size) if isinstance(size, dict) else size)
            mean = tuple(float(x) for x in cfg.get("image_mean", CLIP_MEAN))
            std = tuple(float(x) for x in cfg.get("image_std", CLIP_STD))
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise TvbasisError(f"{path}: cannot read ({exc})") from None
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise TvbasisError(f"{path}: image_mean and image_std need 3 values each (std > 0)")
        return cls(image_size, max(resize, image_size), mean, std)  # type: ignore[arg-type]

    def load(self, path: Path) -> torch.Tensor:
        """``uint8 [3, S, S]``: the decoded, resized and cropped image (not yet normalised)."""
        try:
            from PIL import Image, UnidentifiedImageError
        except ImportError:
            raise TvbasisError("the vision path decodes images with Pillow: pip install pillow") from None
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                w, h = img.size
                short, long = (w, h) if w <= h else (h, w)
                new_long = int(self.resize * long / short)  # truncation, as torchvision's Resize(int)
                size = (self.resize, new_long) if w <= h else (new_long, self.resize)
                if (w, h) != size:
                    img = img.resize(size, Image.Resampling.BICUBIC)
                left = round((size[0] - self.image_size) / 2.0)
                top = round((size[1] - self.image_size) / 2.0)
                img = img.crop((left, top, left + self.image_size, top + self.image_size))
                array = np.asarray(img, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise TvbasisError(f"{path}: cannot read image ({exc})") from None
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """``uint8 [N, 3, S, S]`` -> normalised float32 pixels (on the batch's device)."""
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1)
        return (batch.to(torch.float32) / 255.0 - mean) / std

    def __call__(self, path: Path) -> torch.Tensor:
        """One image, preprocessed: float32 ``[3, S, S]``."""
        return self.normalise(self.load(path).unsqueeze(0))[0]


class ImageDataset(torch.utils.data.Dataset):
    """(uint8 image, label) pairs of a list of examples, for a ``DataLoader`` (picklable for workers)."""

    def __init__(self, examples: Sequence[Example], preprocess: Preprocess) -> None:
        self.examples = list(examples)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        ex = self.examples[i]
        return self.preprocess.load(ex.path), ex.label


def describe_root(root: str | Path, names: Sequence[str]) -> Mapping[str, str]:
    """Per dataset, what ``ROOT`` holds for it (class and image counts) or why it cannot be used."""
    out: dict[str, str] = {}
    for name in names:
        try:
            t = load_task(root, name, need_train=name != "ImageNet")
            out[name] = f"{len(t.classnames)} classes; train {len(t.train)}, val {len(t.val)}, test {len(t.test)}"
        except TvbasisError as exc:
            out[name] = f"unusable: {exc}"
    return out
