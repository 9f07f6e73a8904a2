"""Tasks: one per file behind the ``Task`` protocol (base.py). ``get_task(name)`` builds one by name."""

from __future__ import annotations

import inspect
from typing import Any, Optional

from .base import Task, TaskOutput
from .causal_lm import CausalLM
from .classification import ClassificationTask, ImageClassification, SequenceClassification
from .regression import Regression

TASKS: dict[str, type[Task]] = {
    SequenceClassification.name: SequenceClassification,
    ImageClassification.name: ImageClassification,
    Regression.name: Regression,
    CausalLM.name: CausalLM,
}


def get_task(name: str, options: Optional[dict[str, Any]] = None) -> Task:
    """The task ``name`` built with ``options`` (its constructor's keyword arguments, e.g. the causal LM's
    ``loss_chunk_size``)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of: auto, {', '.join(TASKS)}")
    cls, options = TASKS[name], dict(options or {})
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    valid = [n for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self" and p.kind in kinds]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown task_options {unknown} for task {name!r}; it takes: {', '.join(valid) or 'none'}"
        )
    return cls(**options)


__all__ = [
    "TASKS",
    "CausalLM",
    "ClassificationTask",
    "ImageClassification",
    "Regression",
    "SequenceClassification",
    "Task",
    "TaskOutput",
    "get_task",
]
