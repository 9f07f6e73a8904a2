"""The console of ``lora-lightning``: what the run prints (what was adapted, the progress bar, the final metrics)
without lines a user cannot act on. Called once by the command-line entry point; a library user's own Trainer is
left alone.

    Lightning's "💡 Tip" lines advertise other products (litlogger, litmodels). Lightning has no switch for the
        litlogger one (it is printed whatever the logger, even ``logger=False``; Lightning issue #21294), so
        those records are dropped from Lightning's rank-zero logger.
    ``logger=True`` without tensorboard: Lightning uses its CSVLogger and warns that tensorboard is not installed.
        The logger is the same either way; the run's last line says where its files are.
    Lightning's own call ``isinstance(treespec, LeafSpec)`` (lightning/pytorch/utilities/_pytree.py) raises
        torch's FutureWarning on torch ≥ 2.10: Lightning's code, not ours, and nothing a user can change.
    torchao (installed for QLoRA; transformers imports it when present) registers Enum types with torch's pytree,
        which torch ≥ 2.14 logs as deprecated on ``torch.utils._pytree``'s logger: torchao's code, nothing a user
        can change; those records (and only those) are dropped.
    torchdata's ``StatefulDataLoader`` (our training loader, for exact resume) calls the deprecated
        ``torch.set_vital`` and warns about its own call: torchdata's code, nothing a user can change.

The model summary table is off by default in the CLI (``trainer.enable_model_summary``, cli.py): its FLOPs column
is all zeros without an ``example_input_array``, and the injection report already lists what is adapted and the
trainable / total parameter counts. ``--trainer.enable_model_summary=true`` brings it back.
"""

from __future__ import annotations

import logging
import warnings

TIP_PREFIX = "💡 Tip"
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TIP_PREFIX)


class _DropEnumRegistration(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Calling register_constant() on Enum subclasses is deprecated" not in record.getMessage()


def quiet_console() -> None:
    """Install the filters in the module docstring (idempotent)."""
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    pytree = logging.getLogger("torch.utils._pytree")
    if not any(isinstance(f, _DropEnumRegistration) for f in pytree.filters):
        pytree.addFilter(_DropEnumRegistration())
    warnings.filterwarnings(
        "ignore", message=r"Starting from v1\.9\.0, `tensorboardX` has been removed",
        module=r"lightning\.pytorch\.trainer\.connectors\.logger_connector",
    )
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    warnings.filterwarnings(
        "ignore", message=r"'set_vital' is deprecated", category=UserWarning,
        module=r"torchdata\.stateful_dataloader\.stateful_dataloader",
    )


__all__ = ["quiet_console"]
