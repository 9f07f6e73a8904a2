"""``lora-lightning fit|validate|test|predict --config run.yaml`` (``LoRALightningCLI``, see lightning_cli.py) and
``lora-lightning compare ...`` (the ``lora_lightning.compare`` package)."""

from __future__ import annotations

import sys
from typing import Optional

from lightning.pytorch import LightningDataModule

from .lightning_cli import LoRALightningCLI
from .module import LoRAModule

__all__ = ["LoRALightningCLI", "main"]


def main(args: Optional[list[str]] = None) -> Optional[int]:
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["compare"]:  # `lora-lightning compare ...`: several methods side by side
        from . import compare

        return compare.main(argv[1:])
    LoRALightningCLI(
        LoRAModule,
        LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
