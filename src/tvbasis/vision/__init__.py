"""The paper's vision path: CLIP image encoders, zero-shot heads, fine-tuning and the 8/14/20-dataset suites.

Checkpoints: Hugging Face ``CLIPModel`` / ``CLIPVisionModel(WithProjection)`` directories and
open_clip state dicts (converted to Hugging Face names). Data: torchvision-style image folders
under a user-supplied root. See docs/vision.md.
"""

from tvbasis.vision.convert import (
    VitArch,
    check_same_architecture,
    hf_to_open_clip,
    open_clip_to_hf,
    read_clip_state,
    read_image_encoder,
    vision_task_vector,
    vit_arch,
)
from tvbasis.vision.data import REGISTRY, SUITES, Preprocess, VisionTask, load_task, suite_datasets
from tvbasis.vision.model import (
    Evaluator,
    FinetuneConfig,
    encoder_dir,
    finetune,
    finetune_cached,
    import_finetune,
    load_clip,
    zero_shot_head,
)
from tvbasis.vision.suite import VisionSuiteConfig, run_suite, suite_config

__all__ = [
    "REGISTRY",
    "SUITES",
    "Evaluator",
    "FinetuneConfig",
    "Preprocess",
    "VisionSuiteConfig",
    "VisionTask",
    "VitArch",
    "check_same_architecture",
    "encoder_dir",
    "finetune",
    "finetune_cached",
    "hf_to_open_clip",
    "import_finetune",
    "load_clip",
    "load_task",
    "open_clip_to_hf",
    "read_clip_state",
    "read_image_encoder",
    "run_suite",
    "suite_config",
    "suite_datasets",
    "vision_task_vector",
    "vit_arch",
    "zero_shot_head",
]
