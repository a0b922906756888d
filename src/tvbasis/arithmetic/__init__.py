"""Task arithmetic on a stored basis, and export of task vectors and edited models."""

from tvbasis.arithmetic.combine import atoms_sum_coefficients, task_coefficients, task_weights
from tvbasis.arithmetic.export import (
    combination_state,
    edit_model,
    iter_combination,
    reconstruct_task,
    write_task_vector,
)

__all__ = [
    "atoms_sum_coefficients",
    "combination_state",
    "edit_model",
    "iter_combination",
    "reconstruct_task",
    "task_coefficients",
    "task_weights",
    "write_task_vector",
]
