"""Task arithmetic on a stored basis, and export of task vectors and edited models."""

from tvbasis.arithmetic.combine import atoms_sum_coefficients, task_coefficients, task_weights
from tvbasis.arithmetic.export import edit_model, reconstruct_task, write_task_vector

__all__ = [
    "atoms_sum_coefficients",
    "edit_model",
    "reconstruct_task",
    "task_coefficients",
    "task_weights",
    "write_task_vector",
]
