"""``lora-lightning fit|validate|test|predict --config run.yaml``: LightningCLI over LoRAModule and any
LightningDataModule (``data.class_path`` picks it).

Links (set once, in the model section):
    model.backbone     → data.init_args.backbone      (the tokenizer / timm data config follow the model)
    model.num_classes  → data.init_args.num_classes   (labels are checked against it)
A datamodule without these arguments simply does not receive them.

``lora-lightning compare ...`` (compare.py) and ``lora-lightning export --config run.yaml --ckpt_path CKPT
--format peft|lora_lightning|merged --out DIR`` (export.py) are dispatched before LightningCLI.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from . import data as _data  # noqa: F401 - registers the datamodules' short class names
from .callbacks import adapter_checkpoint as _ckpt  # noqa: F401 - same for AdapterCheckpoint
from .module import LoRAModule

LINKS = (("model.backbone", "backbone"), ("model.num_classes", "num_classes"))


def _spec_or_none(value: Any) -> Optional[Any]:
    return value if isinstance(value, (str, int)) else None  # an nn.Module class_path spec has no name


class LoRALightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: Any) -> None:
        for source, target in LINKS:
            parser.link_arguments(source, f"data.init_args.{target}", compute_fn=_spec_or_none)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:  # a bad value in the config (AdapterConfig validation ...): one line, no trace
            self.parser.error(str(err))


def main(args: Optional[list[str]] = None) -> Optional[int]:
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["compare"]:  # `lora-lightning compare ...`: several methods side by side (compare.py)
        from . import compare

        return compare.main(argv[1:])
    if argv[:1] == ["export"]:  # `lora-lightning export ...`: checkpoint → PEFT / adapter / merged files (export.py)
        from . import export

        return export.main(argv[1:])
    LoRALightningCLI(
        LoRAModule,
        LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
