"""``lora-lightning export``: turn a training checkpoint into files other tools load, without writing Python.

    lora-lightning export --config run.yaml --ckpt_path CKPT --format peft|lora_lightning|merged --out DIR

``--config`` is the run's YAML as given to ``fit`` (repeatable, in the same order; LightningCLI's saved
``config.yaml`` works too); further ``--model.…`` overrides are passed on. The LoRAModule is built from the
config (LightningCLI parser, ``run=False``), ``configure_model`` builds the backbone and injects the adapters,
the checkpoint's adapter and head tensors are loaded, and then:

    peft            PEFT's LoRA layout: ``PeftModel.from_pretrained(base, DIR)``, vLLM, TGI
    lora_lightning  our adapter files: ``lora_lightning.load_adapter(base, DIR)``
    merged          the base model with the adapters merged, saved by its own library
                    (``AutoModelFor….from_pretrained(DIR)``, timm ``local-dir:DIR``; see ``interop.export_merged``)

CKPT is a Lightning ``.ckpt`` file (read with ``torch.load(weights_only=True)``) or the directory a sharded
FSDP2 run writes (a torch.distributed.checkpoint, read in this one process; its metadata file is a pickle:
export only checkpoints you made).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional, Union

import torch

FORMATS = ("peft", "lora_lightning", "merged")


def load_checkpoint(module: Any, ckpt_path: Union[str, Path]) -> None:
    """Load a Lightning checkpoint (file, or FSDP2 distributed-checkpoint directory) into a configured
    LoRAModule (adapter and head tensors; missing ones are an error)."""
    path = Path(ckpt_path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.is_dir():
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint import load as dcp_load

        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        dcp_load({"state_dict": state}, storage_reader=FileSystemReader(str(path)))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)


def build_module(configs: list[str], overrides: list[str]) -> Any:
    """The LoRAModule a ``fit`` with these configs would train, with its backbone built and adapters injected."""
    from lightning.pytorch import LightningDataModule

    from .lightning_cli import LoRALightningCLI
    from .module import LoRAModule

    args = [a for config in configs for a in ("--config", config)] + overrides
    cli = LoRALightningCLI(
        LoRAModule, LightningDataModule, subclass_mode_data=True, run=False, args=args, save_config_callback=None
    )
    cli.model.configure_model()
    return cli.model


def export(module: Any, fmt: str, out: Union[str, Path]) -> Path:
    """Write ``module.model``'s adapters (or the merged model) in format ``fmt`` to ``out``."""
    from .interop import export_merged
    from .state import save_adapter

    if fmt == "merged":
        return export_merged(module.model, out)
    return save_adapter(module.model, out, format=fmt)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lora-lightning export",
        description="Write a training checkpoint's adapters in PEFT or lora_lightning format, or the merged model.",
        epilog="Other arguments (e.g. --model.backbone=...) override the config, as in `lora-lightning fit`.",
    )
    parser.add_argument("--config", action="append", required=True, help="the run's YAML (repeatable, as for fit)")
    parser.add_argument("--ckpt_path", required=True, help="a .ckpt file or an FSDP2 checkpoint directory")
    parser.add_argument("--format", choices=FORMATS, required=True, help="peft | lora_lightning | merged")
    parser.add_argument("--out", required=True, help="output directory")
    args, overrides = parser.parse_known_args(argv)
    module = build_module(args.config, overrides)
    load_checkpoint(module, args.ckpt_path)
    out = export(module, args.format, args.out)
    print(f"lora-lightning export: wrote {args.format} to {out}")
    return 0
