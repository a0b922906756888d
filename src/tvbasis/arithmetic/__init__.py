"""Task arithmetic on a stored basis, and export of task vectors and edited models."""

from tvbasis.arithmetic.combine import atoms_sum_coefficients, task_coefficients, task_combination, task_weights
from tvbasis.arithmetic.export import (
    combination_state,
    edit_model,
    iter_combination,
    reconstruct_task,
    write_task_vector,
)
from tvbasis.arithmetic.merge import (
    MERGES,
    MergeSpec,
    TaskMerger,
    dare_rows,
    iter_merged,
    merged_state,
    ties_merge_rows,
    ties_thresholds,
)

__all__ = [
    "MERGES",
    "MergeSpec",
    "TaskMerger",
    "atoms_sum_coefficients",
    "combination_state",
    "dare_rows",
    "edit_model",
    "iter_combination",
    "iter_merged",
    "merged_state",
    "reconstruct_task",
    "task_coefficients",
    "task_combination",
    "task_weights",
    "ties_merge_rows",
    "ties_thresholds",
    "write_task_vector",
]
