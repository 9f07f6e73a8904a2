"""SupervisionCheck: count training batches whose labels are all ignored, and log how much is supervised.

Looks at the ``labels`` tensor of dict batches (``batch["labels"]``, or ``batch["label"]``), whatever the task:

    a batch with no label != ``ignore_index`` (-100: cross-entropy's and transformers' "ignore")
        contributes nothing to the loss: counted, and warned (how many, and the first batch indices);
    an epoch where no batch has a supervised label is an error (e.g. a chat template that marks no
        assistant token, a label column that is all -100);
    token labels (2-D and more): ``supervised_fraction`` = #labels != ignore_index / #tokens (tokens = the
        ``attention_mask`` sum when the batch has one of the same shape, else every position) is logged each
        step with ``pl_module.log`` (kept on the device; Lightning syncs it at its logging interval).

Cost: a comparison and a sum per batch on the device; the per-batch "empty" flags are read on the host every
``trainer.log_every_n_steps`` batches and at epoch end, when Lightning synchronises anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor


class NoSupervisionError(RuntimeError):
    """Raised by ``SupervisionCheck`` when a whole training epoch had no supervised label."""


def batch_labels(batch: Any) -> Optional[Tensor]:
    if isinstance(batch, Mapping):
        labels = batch.get("labels", batch.get("label"))
        return labels if isinstance(labels, Tensor) else None
    return None


class SupervisionCheck(Callback):
    """Warn about training batches whose labels are all ``ignore_index``; error on an epoch of them; log the
    supervised fraction of token labels (module docstring)."""

    def __init__(self, ignore_index: int = -100, log_fraction: bool = True) -> None:
        self.ignore_index = int(ignore_index)
        self.log_fraction = log_fraction
        self.empty_batches = 0  # in the current epoch
        self._reset_epoch()

    def _reset_epoch(self) -> None:
        self._flags: list[Tensor] = []  # device bools: batch had no supervised label
        self._indices: list[int] = []
        self._seen_batches = 0
        self._supervised_batches = 0
        self.empty_batches = 0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset_epoch()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        labels = batch_labels(batch)
        if labels is None:
            return
        supervised = labels != self.ignore_index
        count = supervised.sum()
        self._flags.append(count == 0)
        self._indices.append(batch_idx)
        if self.log_fraction and labels.ndim >= 2:
            mask = batch.get("attention_mask")
            tokens = mask.sum() if isinstance(mask, Tensor) and mask.shape == labels.shape else labels.numel()
            fraction = count.float() / torch.clamp_min(torch.as_tensor(tokens, device=count.device).float(), 1)
            pl_module.log("supervised_fraction", fraction, on_step=True, on_epoch=False, batch_size=labels.shape[0])

    def _read(self, final: bool) -> None:
        if not self._flags:
            return
        flags = torch.stack(self._flags).cpu().tolist()  # host read: at logging steps and epoch end only
        empty = [i for i, f in zip(self._indices, flags) if f]
        self._seen_batches += len(flags)
        self._supervised_batches += len(flags) - len(empty)
        self._flags, self._indices = [], []
        if empty:
            self.empty_batches += len(empty)
            shown = ", ".join(map(str, empty[:5])) + (" ..." if len(empty) > 5 else "")
            rank_zero_warn(
                f"SupervisionCheck: {len(empty)} training batch(es) had every label == {self.ignore_index} "
                f"(ignored), so they trained nothing (batch indices {shown}; {self.empty_batches} this epoch). "
                "Check the label masking: e.g. a chat template that marks no assistant token, or prompts longer "
                "than max_length truncating every answer."
            )

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if len(self._flags) >= max(1, trainer.log_every_n_steps):
            self._read(final=False)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._read(final=True)
        if self._seen_batches and not self._supervised_batches:
            raise NoSupervisionError(
                f"SupervisionCheck: none of the {self._seen_batches} training batches of epoch "
                f"{trainer.current_epoch} had a label other than {self.ignore_index}: the loss had nothing to "
                "learn from. Check how labels are built (chat template / assistant-token masking, label column, "
                "max_length truncation)."
            )


__all__ = ["NoSupervisionError", "SupervisionCheck", "batch_labels"]
