"""A real, offline text benchmark: eight classification tasks whose labels come from installed packages."""

from tvbasis.textsuite.data import TASK_NAMES, Example, SourceMissingError, TaskData, load_task

__all__ = ["TASK_NAMES", "Example", "SourceMissingError", "TaskData", "load_task"]
