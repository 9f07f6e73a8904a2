"""``LoRALightningCLI``: LightningCLI over LoRAModule and any LightningDataModule (``data.class_path`` picks it).
Used by the ``lora-lightning`` entry point (cli.py) and by ``lora-lightning compare``'s runs, so neither imports
the other.

Links (set once, in the model section):
    model.backbone     → data.init_args.backbone      (the tokenizer / timm data config follow the model)
    model.num_classes  → data.init_args.num_classes   (labels are checked against it)
A datamodule without these arguments simply does not receive them.
"""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch.cli import LightningCLI

from . import data as _data  # noqa: F401 - registers the datamodules' short class names
from .callbacks import adapter_checkpoint as _ckpt  # noqa: F401 - same for AdapterCheckpoint

LINKS = (("model.backbone", "backbone"), ("model.num_classes", "num_classes"))
# Checkpoints are written crash-safely (lora_lightning.checkpoint_io); a config's own trainer.plugins replace this.
TRAINER_DEFAULTS = {"plugins": [{"class_path": "lora_lightning.checkpoint_io.AtomicCheckpointIO"}]}


def _spec_or_none(value: Any) -> Optional[Any]:
    return value if isinstance(value, (str, int)) else None  # an nn.Module class_path spec has no name


class LoRALightningCLI(LightningCLI):
    """LightningCLI with the links above and ``TRAINER_DEFAULTS`` (crash-safe checkpoint writes)."""

    def __init__(self, *args: Any, trainer_defaults: Optional[dict] = None, **kwargs: Any) -> None:
        super().__init__(*args, trainer_defaults={**TRAINER_DEFAULTS, **(trainer_defaults or {})}, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        for source, target in LINKS:
            parser.link_arguments(source, f"data.init_args.{target}", compute_fn=_spec_or_none)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:  # a bad value in the config (AdapterConfig validation ...): one line, no trace
            self.parser.error(str(err))
