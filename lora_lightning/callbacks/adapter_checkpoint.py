"""AdapterCheckpoint: write adapter-only files (safetensors weights + adapter_config.json) during training.

A full Lightning checkpoint resumes a run; an adapter file is what you ship: ``save_adapter`` writes the
adapter tensors and ``modules_to_save`` of the model the adapters were injected into (a few MB instead
of the whole backbone), loadable with ``load_adapter(base_model, dir)``.

    <dirpath>/last/   after every validation and at the end of training   (save_last)
    <dirpath>/best/   whenever ``monitor`` improves (mode "max": higher is better, "min": lower)

``format="peft"`` writes PEFT's LoRA layout instead (``PeftModel.from_pretrained(base, dir)``, vLLM, TGI; each
method mapped exactly, see ``lora_lightning.interop``); a method PEFT cannot express is refused at fit start.

Works on any LightningModule that contains adapters: it saves every submodule that ``inject_adapters``
was run on (the one carrying the ``_lora_lightning_config`` attribute), in ``<dir>/<submodule name>/``
when there is more than one. The class names (``label_names`` of the module, else of the datamodule; see
``lora_lightning.data.labels``) go into adapter_config.json as ``labels``.

Never a broken or half-written model: ``last/`` and ``best/`` are each replaced as one unit (every adapted
submodule's weights and config together; ``lora_lightning.atomic.write_directory``), and a model holding
NaN/inf is refused with an error naming the tensors (``allow_nonfinite=True`` writes it anyway). ``best/`` is
written only for a finite monitored value (a NaN/inf score never counts as an improvement).

Multi-device: every rank takes part in each save (FSDP2 shards are gathered whole, a collective) and only
global rank 0 writes, once; whether ``monitor`` improved is decided on rank 0 and broadcast, so all ranks
agree on when to save. FSDP1's flattened shards are refused by ``save_adapter`` (use FSDP2 or DDP).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch import Callback
from torch import nn

from ..atomic import write_directory
from ..inject import CONFIG_ATTR, adapter_layers, injected_config
from ..state import FORMATS, encoded_adapter


def adapter_holders(module: nn.Module) -> dict[str, nn.Module]:
    """The submodules ``inject_adapters`` was applied to, by qualified name ("" for ``module`` itself)."""
    return {name: m for name, m in module.named_modules() if hasattr(m, CONFIG_ATTR) and adapter_layers(m)}


def label_names(pl_module: pl.LightningModule) -> Optional[list[str]]:
    """The class names by id: ``pl_module.label_names``, else the datamodule's; None when neither has them."""
    names = getattr(pl_module, "label_names", None)
    if names is None and pl_module._trainer is not None:
        names = getattr(pl_module.trainer.datamodule, "label_names", None)
    return list(names) if names is not None else None


class AdapterCheckpoint(Callback):
    """Save adapter files at the last step and/or at the best value of a monitored metric.

    Args:
        dirpath: output folder; None = ``<trainer.log_dir or default_root_dir>/adapters``.
        save_last: write ``last/`` after each validation and at the end of training.
        monitor: a logged metric (e.g. "val_acc"); None = no ``best/``.
        mode: "max" or "min" for ``monitor``.
        allow_nonfinite: write adapters holding NaN/inf too (default: refuse with an error).
        format: "lora_lightning" (ours: every method as trained) or "peft" (PEFT's LoRA layout).
    """

    def __init__(
        self,
        dirpath: Optional[Union[str, Path]] = None,
        save_last: bool = True,
        monitor: Optional[str] = None,
        mode: str = "max",
        allow_nonfinite: bool = False,
        format: str = "lora_lightning",
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
        self.format = format
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.save_last = save_last
        self.monitor = monitor
        self.mode = mode
        self.allow_nonfinite = allow_nonfinite
        self.best_score: Optional[float] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = Path(trainer.log_dir or trainer.default_root_dir) / "adapters"

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        holders = adapter_holders(pl_module)
        if not holders:  # after configure_model, so the adapters exist by now
            raise ValueError(
                f"AdapterCheckpoint found no adapters in {type(pl_module).__name__}: inject them with "
                "lora_lightning.inject_adapters(model, AdapterConfig(...)) (LoRAModule does this itself)"
            )
        if self.format == "peft":  # refuse a method PEFT cannot express now, not after the first epoch
            from ..interop import peft_form

            for holder in holders.values():
                peft_form(injected_config(holder))

    def save(self, pl_module: pl.LightningModule, name: str) -> Path:
        """Write ``<dirpath>/<name>/`` as one unit (one subfolder per adapted submodule if there are several).
        Every rank must call it (FSDP2 shards are gathered); global rank 0 writes."""
        holders = adapter_holders(pl_module)
        target = self.dirpath / name
        labels = label_names(pl_module)
        files: dict[str, bytes] = {}
        for sub, holder in holders.items():
            where = target / sub if len(holders) > 1 else target
            prefix = f"{sub}/" if len(holders) > 1 else ""
            encoded = encoded_adapter(holder, self.format, self.allow_nonfinite, where, labels)
            files.update({prefix + k: v for k, v in encoded.items()})
        if pl_module.global_rank == 0:
            write_directory(target, files)
        if pl_module._trainer is not None:
            pl_module.trainer.strategy.barrier("AdapterCheckpoint.save")
        return target

    def _improved(self, score: float) -> bool:
        if not math.isfinite(score):
            return False
        if self.best_score is None:
            return True
        return score > self.best_score if self.mode == "max" else score < self.best_score

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self.monitor is not None:
            if self.monitor not in trainer.callback_metrics:
                raise KeyError(
                    f"AdapterCheckpoint(monitor={self.monitor!r}): metric not logged; logged metrics: "
                    f"{', '.join(sorted(trainer.callback_metrics)) or 'none'}"
                )
            score = float(trainer.callback_metrics[self.monitor])
            if trainer.strategy.broadcast(self._improved(score)):  # rank 0 decides: all ranks save together
                score = trainer.strategy.broadcast(score)
                self.save(pl_module, "best")  # raises on non-finite weights: then best_score stays as it was
                self.best_score = score
        if self.save_last:
            self.save(pl_module, "last")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_last:
            self.save(pl_module, "last")

    @property
    def state_key(self) -> str:
        # Several AdapterCheckpoints (e.g. best-by-accuracy and last) may coexist in one Trainer.
        return self._generate_state_key(dirpath=str(self.dirpath), monitor=self.monitor, mode=self.mode)

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score = state_dict.get("best_score")
