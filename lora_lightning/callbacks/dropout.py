"""Dropout removal (ALLoRA's first fix: dropout does not regularise short fine-tuning reliably).

At fit start (after ``configure_model`` has injected the adapters) every adapter layer's input dropout is
removed (``layer.dropout = None``; ``AdapterLayer`` then feeds x straight to the low-rank path), so the
adapter path is s·U·D·x in training as in evaluation.

With ``include_backbone=True`` it also turns off the backbone's stochastic regularisers:
- every ``nn.Dropout`` / ``Dropout1d/2d/3d`` / ``AlphaDropout`` module with p > 0 → p = 0;
- every plain numeric module attribute > 0 whose name looks like a dropout rate (``dropout``,
  ``attention_dropout``, ``dropout_prob``, ``*_pdrop``, ``*layerdrop``, ``drop_prob`` ...) → 0.0. This covers
  transformers attention that calls ``F.dropout(p=self.attention_dropout)`` (Llama, Qwen2, ViT, BART, T5)
  and stochastic depth (timm ``DropPath.drop_prob``, transformers ``*DropPath.drop_prob``);
- the same names on every transformers config found as a ``config`` attribute of a module (and its
  sub-configs): ``hidden_dropout_prob``, ``attention_probs_dropout_prob``, ``attention_dropout``,
  ``resid_pdrop``, ``embd_pdrop``, ``attn_pdrop``, ``dropout``, ``classifier_dropout``, ``drop_path_rate`` ...
  Changing a config after the model is built does not rebuild anything; it is done so that code that reads
  the config at run time, and copies of the config saved with the model, agree with the modules.
Not covered: a dropout rate hard-coded in a forward (a literal ``F.dropout(x, 0.1)``) or held in a
closure; those cannot be found by inspection.

``self.changed`` lists every name that was changed ("<module>.dropout" for adapters, "<module>.p" for
dropout modules, "<module>.<attr>" for attributes, "<module>.config.<attr>" for configs); it is logged
once (rank zero, ``lora_lightning`` logger) with the old values.
"""

from __future__ import annotations

import logging
import re

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from ..inject import adapter_layers

log = logging.getLogger("lora_lightning")
DROPOUT_NAME = re.compile(r".*dropout.*|.*pdrop|.*layerdrop|drop_prob|drop_path_rate")


def _is_rate(name: str, value) -> bool:
    return (
        not name.startswith("_")
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and value > 0
        and DROPOUT_NAME.fullmatch(name) is not None
    )


def _is_hf_config(obj) -> bool:
    return hasattr(obj, "to_dict") and hasattr(obj, "model_type")


class DropoutRemoval(Callback):
    """Turn off adapter dropout (and, with ``include_backbone``, the backbone's) at fit start."""

    def __init__(self, include_backbone: bool = False) -> None:
        self.include_backbone = include_backbone
        self.changed: list[str] = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.remove(pl_module)

    def remove(self, model: nn.Module) -> list[str]:
        """Do the removal on ``model`` (what ``on_fit_start`` calls); returns and records the changed names."""
        layers = adapter_layers(model)
        if not layers and not self.include_backbone:
            raise ValueError(
                f"DropoutRemoval found no adapter layers in {type(model).__name__}; inject adapters first, "
                "or pass include_backbone=True to remove the backbone's dropout only"
            )
        changes: list[tuple[str, float]] = []
        for name, layer in layers.items():
            if layer.dropout is not None:
                changes.append((f"{name}.dropout", layer.dropout.p))
                layer.dropout = None
        if self.include_backbone:
            changes += self._backbone(model)
        self.changed = [n for n, _ in changes]
        what = ", ".join(f"{n} ({v:g})" for n, v in changes) or "nothing (no dropout was active)"
        rank_zero_only(log.info)(f"DropoutRemoval: set to 0: {what}")
        return self.changed

    @staticmethod
    def _backbone(model: nn.Module) -> list[tuple[str, float]]:
        changes: list[tuple[str, float]] = []
        configs: dict[int, tuple[str, object]] = {}
        for name, m in model.named_modules():
            prefix = f"{name}." if name else ""
            if isinstance(m, _DropoutNd) and m.p > 0:
                changes.append((f"{prefix}p", m.p))
                m.p = 0.0
            for attr, value in list(vars(m).items()):
                if _is_rate(attr, value):
                    changes.append((prefix + attr, value))
                    setattr(m, attr, 0.0)
            config = getattr(m, "config", None)
            if _is_hf_config(config) and id(config) not in configs:
                configs[id(config)] = (f"{prefix}config", config)
        stack = list(configs.values())
        while stack:
            path, config = stack.pop(0)
            for attr, value in list(vars(config).items()):
                if _is_hf_config(value) and id(value) not in configs:
                    configs[id(value)] = (f"{path}.{attr}", value)
                    stack.append(configs[id(value)])
                elif _is_rate(attr, value):
                    changes.append((f"{path}.{attr}", value))
                    setattr(config, attr, 0.0)
        return changes
