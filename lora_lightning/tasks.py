"""Tasks: how to read a batch, run the backbone, and score it.

Both tasks are C-way classification: loss = cross-entropy(logits, y); metrics = accuracy
(#correct / #examples, i.e. micro-averaged) and macro-F1 (the unweighted mean over classes of
2·precision·recall / (precision + recall)).

Batches:
    sequence_classification  a dict from DataCollatorWithPadding: input_ids, attention_mask, ..., "labels"
    image_classification     an (x, y) tuple/list, or a dict with pixel_values|image|x and labels|label|y
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score


def _logits(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else output.logits  # transformers ModelOutput


class ClassificationTask:
    """Cross-entropy + accuracy + macro-F1; subclasses say how to split a batch into inputs and labels."""

    name = "classification"

    def metrics(self, num_classes: int, prefix: str) -> MetricCollection:
        return MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "f1": MulticlassF1Score(num_classes, average="macro"),
            },
            prefix=prefix,
        )

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits, labels)

    def step(self, model: nn.Module, batch: Any) -> tuple[Tensor, Optional[Tensor]]:
        """(logits, labels); labels is None for unlabelled (predict) batches."""
        raise NotImplementedError


class SequenceClassification(ClassificationTask):
    name = "sequence_classification"

    def step(self, model: nn.Module, batch: Any) -> tuple[Tensor, Optional[Tensor]]:
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"sequence_classification expects dict batches (input_ids, attention_mask, labels), got "
                f"{type(batch).__name__}; use TextClassificationDataModule or set model.task: image_classification"
            )
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "label")}
        labels = batch.get("labels", batch.get("label"))
        return _logits(model(**inputs)), labels


class ImageClassification(ClassificationTask):
    name = "image_classification"
    INPUT_KEYS = ("pixel_values", "image", "x")
    LABEL_KEYS = ("labels", "label", "y")

    def step(self, model: nn.Module, batch: Any) -> tuple[Tensor, Optional[Tensor]]:
        if isinstance(batch, Mapping):
            key = next((k for k in self.INPUT_KEYS if k in batch), None)
            if key is None:
                raise KeyError(f"image batch has keys {sorted(batch)}; name the input one of {self.INPUT_KEYS}")
            x = batch[key]
            labels = next((batch[k] for k in self.LABEL_KEYS if k in batch), None)
        elif isinstance(batch, (tuple, list)):
            x, labels = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            x, labels = batch, None
        return _logits(model(x)), labels


TASKS: dict[str, type[ClassificationTask]] = {
    SequenceClassification.name: SequenceClassification,
    ImageClassification.name: ImageClassification,
}


def get_task(name: str) -> ClassificationTask:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of: auto, {', '.join(TASKS)}")
    return TASKS[name]()


class Regression(ImageClassification):
    """Vector regression: loss = mean squared error over all outputs, ½-free: mean_{n,j} (ŷ_nj − y_nj)²;
    metric "mse" (torchmetrics MeanSquaredError, the same mean). Batches as image_classification: (x, y)
    tuples or dicts. ``num_classes`` is the output dimension (unused by the metric)."""

    name = "regression"

    def metrics(self, num_classes: int, prefix: str) -> MetricCollection:
        from torchmetrics import MeanSquaredError

        return MetricCollection({"mse": MeanSquaredError()}, prefix=prefix)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return F.mse_loss(logits, labels.to(logits.dtype))


TASKS[Regression.name] = Regression
