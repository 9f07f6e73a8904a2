"""Vector regression: loss = squared error summed over all outputs, divided by their number:
mean_{n,j} (ŷ_nj − y_nj)² over every example of an optimizer step (½-free); metric "mse" (torchmetrics
MeanSquaredError, the same mean). Batches as image_classification: (x, y) tuples or dicts. ``num_classes`` is
the output dimension (unused by the metric)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanSquaredError, MetricCollection

from ..generation import GenerationOptions
from ..inject import find_task_head
from .base import Task, TaskOutput, format_metrics
from .classification import logits_of, require_labels, tensor_batch


class Regression(Task):
    name = "regression"
    model_class = None  # a plain nn.Module backbone (e.g. lora_lightning.data.synthetic.TeacherBackbone)

    def default_modules_to_save(self, model: nn.Module) -> list[str]:
        return find_task_head(model)

    def forward(self, model: nn.Module, batch: Any) -> TaskOutput:
        x, labels = tensor_batch(batch)
        preds = logits_of(model(x))
        labels = require_labels(labels).to(preds.dtype)
        loss_sum = F.mse_loss(preds, labels, reduction="sum")
        return TaskOutput(loss_sum, torch.tensor(labels.numel(), device=preds.device), {"preds": preds, "target": labels})

    def metrics(self, num_classes: int, prefix: str) -> MetricCollection:
        return MetricCollection({"mse": MeanSquaredError()}, prefix=prefix)

    def predict(self, model: nn.Module, batch: Any, generation: GenerationOptions) -> Tensor:
        """The predicted vectors."""
        return logits_of(model(tensor_batch(batch)[0]))

    def summary(self, metrics: Mapping[str, Any]) -> Optional[str]:
        return format_metrics(metrics, ("val_mse", "val_loss"))
