"""A real, offline text benchmark: eight classification tasks whose labels come from installed packages."""

from tvbasis.textsuite.data import TASK_NAMES, Example, SourceMissingError, TaskData, load_task

__all__ = ["TASK_NAMES", "Example", "SourceMissingError", "TaskData", "load_task"]

from tvbasis.textsuite.model import (
    Evaluator,
    FinetuneConfig,
    derive_small_model,
    finetune,
    finetune_cached,
    finetune_key,
    load_encoder_state,
    minilm_path,
    zero_shot_head,
)

__all__ += [
    "Evaluator",
    "FinetuneConfig",
    "derive_small_model",
    "finetune",
    "finetune_cached",
    "finetune_key",
    "load_encoder_state",
    "minilm_path",
    "zero_shot_head",
]
