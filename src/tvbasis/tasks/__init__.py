"""Task vectors: fine-tuned minus base weights, selected, validated and read lazily."""

from tvbasis.tasks.taskvectors import TaskSource, TaskVectorSet, parse_task_arg, select_tensors

__all__ = ["TaskSource", "TaskVectorSet", "parse_task_arg", "select_tensors"]
