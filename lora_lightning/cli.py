"""``lora-lightning fit|validate|test|predict --config run.yaml`` (``LoRALightningCLI``, see lightning_cli.py),
``lora-lightning compare ...`` (the ``lora_lightning.compare`` package) and ``lora-lightning export --config
run.yaml --ckpt_path CKPT --format peft|lora_lightning|merged --out DIR`` (export.py), the last two dispatched
before LightningCLI."""

from __future__ import annotations

import sys
from typing import Optional

from lightning.pytorch import LightningDataModule

from .console import quiet_console
from .data.rows import BadDataError
from .lightning_cli import LoRALightningCLI
from .module import LoRAModule

__all__ = ["LoRALightningCLI", "main"]


def main(args: Optional[list[str]] = None) -> Optional[int]:
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["compare"]:  # `lora-lightning compare ...`: several methods side by side
        from . import compare

        return compare.main(argv[1:])
    if argv[:1] == ["export"]:  # `lora-lightning export ...`: checkpoint → PEFT / adapter / merged files (export.py)
        from . import export

        return export.main(argv[1:])
    quiet_console()
    try:
        LoRALightningCLI(
            LoRAModule,
            LightningDataModule,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"enable_model_summary": False},  # see console.py
            args=args,
        )
    except BadDataError as err:  # a data file the run cannot use: the message names the file and the fix
        sys.exit(f"lora-lightning: {err}")


if __name__ == "__main__":
    main()
