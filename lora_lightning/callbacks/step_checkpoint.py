"""StepCheckpoint: Lightning's ModelCheckpoint for step checkpoints that resume exactly under gradient accumulation.

``ModelCheckpoint(every_n_train_steps=N)`` saves in ``on_train_batch_end`` when ``global_step`` moved since its
last save; it does not keep the step of its last save across a resume (it starts at 0), so the first batch
after ``fit --ckpt_path`` — when ``global_step`` has not moved yet and gradients are half accumulated —
writes a checkpoint. Those accumulated gradients are not in any checkpoint, so a run resumed from it later
trains that optimizer step on part of its batches. StepCheckpoint takes the resumed ``global_step`` as
already saved, so checkpoints are only ever taken right after an optimizer step.

Use it wherever you would use ModelCheckpoint (same arguments), e.g. ``callbacks/step_checkpoints.yaml``.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that never writes a checkpoint in the middle of gradient accumulation after a resume."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        # resumed at global_step g: the checkpoint for g exists (we resumed from it); the next one is due
        # after the next optimizer step, not after the next micro-batch
        self._last_global_step_saved = max(self._last_global_step_saved, trainer.global_step)


__all__ = ["StepCheckpoint"]
