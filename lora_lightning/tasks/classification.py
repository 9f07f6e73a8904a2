"""Classification tasks: how to read a batch, run the backbone, and score it.

Both tasks are C-way classification: loss = cross-entropy(logits, y) (a sum over the batch's examples and
their count: the mean is taken over every example of an optimizer step); metrics = accuracy (#correct /
#examples, i.e. micro-averaged) and macro-F1 (the unweighted mean over classes of
2·precision·recall / (precision + recall)).

Batches:
    sequence_classification  a dict from DataCollatorWithPadding: input_ids, attention_mask, ..., "labels"
    image_classification     an (x, y) tuple/list, or a dict with pixel_values|image|x and labels|label|y
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from ..generation import GenerationOptions
from ..inject import find_task_head
from .base import Task, TaskOutput, format_metrics


def logits_of(output: Any) -> Tensor:
    return output if isinstance(output, Tensor) else output.logits  # transformers ModelOutput


def require_labels(labels: Optional[Tensor]) -> Tensor:
    if labels is None:
        raise ValueError("this batch has no labels; training/validation/test batches need them")
    return labels


IMAGE_INPUT_KEYS = ("pixel_values", "image", "x")
IMAGE_LABEL_KEYS = ("labels", "label", "y")


def tensor_batch(batch: Any) -> tuple[Tensor, Optional[Tensor]]:
    """(x, labels) of an (x, y) tuple/list, a dict with pixel_values|image|x and labels|label|y, or a tensor."""
    if isinstance(batch, Mapping):
        key = next((k for k in IMAGE_INPUT_KEYS if k in batch), None)
        if key is None:
            raise KeyError(f"image batch has keys {sorted(batch)}; name the input one of {IMAGE_INPUT_KEYS}")
        return batch[key], next((batch[k] for k in IMAGE_LABEL_KEYS if k in batch), None)
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


class ClassificationTask(Task):
    """Cross-entropy + accuracy + macro-F1; subclasses say how to split a batch into inputs and labels."""

    name = "classification"

    def model_kwargs(self, num_classes: int) -> dict[str, Any]:
        return {"num_labels": num_classes}

    def default_modules_to_save(self, model: nn.Module) -> list[str]:
        return find_task_head(model)  # the new head

    def metrics(self, num_classes: int, prefix: str) -> MetricCollection:
        return MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "f1": MulticlassF1Score(num_classes, average="macro"),
            },
            prefix=prefix,
        )

    def step(self, model: nn.Module, batch: Any) -> tuple[Tensor, Optional[Tensor]]:
        """(logits, labels); labels is None for unlabelled (predict) batches."""
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: Any) -> TaskOutput:
        logits, labels = self.step(model, batch)
        labels = require_labels(labels)
        loss_sum = F.cross_entropy(logits, labels, reduction="sum")
        n = torch.tensor(labels.shape[0], device=logits.device)
        return TaskOutput(loss_sum, n, {"preds": logits, "target": labels})

    def predict(self, model: nn.Module, batch: Any, generation: GenerationOptions) -> Tensor:
        """Predicted class ids."""
        return self.step(model, batch)[0].argmax(-1)

    def summary(self, metrics: Mapping[str, Any]) -> Optional[str]:
        return format_metrics(metrics, ("val_acc", "val_f1", "val_loss")) if "val_acc" in metrics else None


class SequenceClassification(ClassificationTask):
    name = "sequence_classification"
    model_class = "AutoModelForSequenceClassification"

    def step(self, model: nn.Module, batch: Any) -> tuple[Tensor, Optional[Tensor]]:
        if not isinstance(batch, Mapping):
            raise TypeError(
                f"sequence_classification expects dict batches (input_ids, attention_mask, labels), got "
                f"{type(batch).__name__}; use TextClassificationDataModule or set model.task: image_classification"
            )
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "label")}
        labels = batch.get("labels", batch.get("label"))
        return logits_of(model(**inputs)), labels


class ImageClassification(ClassificationTask):
    name = "image_classification"
    model_class = "AutoModelForImageClassification"
    INPUT_KEYS = IMAGE_INPUT_KEYS
    LABEL_KEYS = IMAGE_LABEL_KEYS

    def step(self, model: nn.Module, batch: Any) -> tuple[Tensor, Optional[Tensor]]:
        x, labels = tensor_batch(batch)
        return logits_of(model(x)), labels
