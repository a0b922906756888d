"""Build recipes: a YAML file that lists the base, the tasks and the method instead of flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tvbasis.errors import TvbasisError
from tvbasis.tasks.taskvectors import TaskSource, check_task_name


class TaskEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    path: str


class Recipe(BaseModel):
    """What ``tvbasis build --recipe FILE.yaml`` reads; command-line flags override it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    base: str | None = None
    tasks: list[TaskEntry] = Field(default_factory=list)
    method: str | None = None
    n_atoms: int | None = Field(default=None, alias="M")
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    dtype: str | None = None
    settings: dict[str, Any] = Field(default_factory=dict)

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks_mapping(cls, v: Any) -> Any:
        # Accept both a list of {name, path} and a mapping name -> path.
        if isinstance(v, dict):
            return [{"name": k, "path": p} for k, p in v.items()]
        return v

    def task_sources(self, root: Path) -> list[TaskSource]:
        out = []
        for t in self.tasks:
            check_task_name(t.name)
            p = Path(t.path)
            out.append(TaskSource(t.name, p if p.is_absolute() else root / p))
        return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # "<<": merged keys may be overridden
            continue
        key = loader.construct_object(key_node)
        if not isinstance(key, str | int | float | bool):
            continue
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        return f"{where}{exc.problem}"
    return " ".join(str(exc).split())


def load_recipe(path: str | Path) -> tuple[Recipe, Path]:
    """Parse a recipe; relative paths in it are relative to the recipe's own directory."""
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except FileNotFoundError:
        raise TvbasisError(f"--recipe {path}: file not found") from None
    except OSError as exc:
        raise TvbasisError(f"--recipe {path}: cannot read ({exc})") from None
    except yaml.YAMLError as exc:
        raise TvbasisError(f"--recipe {path}: cannot parse YAML ({_yaml_problem(exc)})") from None
    try:
        return Recipe.model_validate(data or {}), path.parent
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "top level"
        raise TvbasisError(f"--recipe {path}: {where}: {first['msg']}") from None
