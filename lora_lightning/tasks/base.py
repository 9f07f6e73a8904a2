"""The Task protocol: what ``LoRAModule`` asks of a task, so that it never branches on the task's name.

A task says
    which transformers class to build    ``model_class`` (e.g. "AutoModelForCausalLM"; None = not a
                                          transformers task) and ``model_kwargs(num_classes)``
    what trains in full by default       ``default_modules_to_save(model)``: a classifier's new head; for a
                                          causal LM nothing (``lm_head`` is pretrained, and is often tied to
                                          the input embeddings)
    how to score one batch               ``forward(model, batch) -> TaskOutput``: the loss as a SUM over the
                                          batch's targets and their count, plus what its metrics consume
    its metrics                          ``metrics(num_classes, prefix)``: a torchmetrics MetricCollection,
                                          updated with ``TaskOutput.metric_inputs`` as keyword arguments
    what it predicts                     ``predict(model, batch, generation)``: class ids, values, or
                                          generated tokens
    a one-line result                    ``summary(metrics)``, printed at the end of ``fit``
    callbacks it needs                   ``callbacks()``: classes added unless the Trainer has one (the
                                          causal LM's ``CompletionWriter`` for ``predict``)

Why a sum and a count: the training loss is the mean over every target of an optimizer step, i.e. over all
micro-batches of gradient accumulation and all devices, L = Σ_targets ℓ / N_step. A per-batch mean
averaged over batches weights a target by 1/(its batch's count), which differs whenever batches hold
different numbers of targets (always, for tokens). ``LoRAModule`` turns the sums into that exact mean (see
its docstring).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor, nn
from torchmetrics import MetricCollection

from ..generation import GenerationOptions


@dataclass
class TaskOutput:
    """One scored batch: ``loss_sum`` = Σ over its targets of the per-target loss (a 0-dim tensor with a graph),
    ``n_targets`` = how many targets (a 0-dim tensor), ``metric_inputs`` = keyword arguments of the task's
    ``metrics().update``."""

    loss_sum: Tensor
    n_targets: Tensor
    metric_inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_loss(self) -> Tensor:
        return self.loss_sum / self.n_targets.clamp_min(1)


class Task(ABC):
    """Base of every task (see module docstring). Concrete tasks subclass this only, never each other."""

    name: str = ""
    model_class: Optional[str] = None

    def model_kwargs(self, num_classes: int) -> dict[str, Any]:
        """Extra ``from_pretrained`` / ``from_config`` keyword arguments for ``model_class``."""
        return {}

    @abstractmethod
    def default_modules_to_save(self, model: nn.Module) -> list[str]:
        """Modules trained in full when ``AdapterConfig.modules_to_save`` is None."""

    @abstractmethod
    def forward(self, model: nn.Module, batch: Any) -> TaskOutput:
        """Run ``model`` on a labelled batch and score it."""

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        """(Σ loss over the batch's targets, number of targets)."""
        out = self.forward(model, batch)
        return out.loss_sum, out.n_targets

    @abstractmethod
    def metrics(self, num_classes: int, prefix: str) -> MetricCollection:
        """Validation / test metrics, named ``<prefix><name>``."""

    @abstractmethod
    def predict(self, model: nn.Module, batch: Any, generation: GenerationOptions) -> Any:
        """Predictions for a batch that may have no labels."""

    def summary(self, metrics: Mapping[str, Any]) -> Optional[str]:
        """A one-line result from the logged metrics (None: nothing to say)."""
        return None

    def callbacks(self) -> list[type]:
        """Callback classes this task needs (added by ``LoRAModule.configure_callbacks`` unless present)."""
        return []


def format_metrics(metrics: Mapping[str, Any], names: tuple[str, ...]) -> Optional[str]:
    """"val_acc=0.9000 val_f1=0.8000" for the ``names`` present in ``metrics`` (None if none is)."""
    parts = [f"{n}={float(metrics[n]):.4f}" for n in names if n in metrics]
    return " ".join(parts) or None
