"""Tasks: one per file behind the ``Task`` protocol (base.py). ``get_task(name)`` builds one by name."""

from __future__ import annotations

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


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of: auto, {', '.join(TASKS)}")
    return TASKS[name]()


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
