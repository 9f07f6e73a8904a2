"""SDS-LoRA re-orthonormalisation: switch SDS layers on after warm-up, then refresh their bases.

Schedule, in optimizer steps t = ``trainer.global_step`` (checked in ``on_train_batch_end``, i.e. right
after the optimizer step, once per step also under gradient accumulation):

    t = warmup_steps                        rebalance() every SDS layer: plain LoRA (A, B) → SDS
                                            (Q_B, Q_A, A, B) with ΔW unchanged; reset Adam moments of A, B
    t = warmup_steps + k·refresh_every      refresh(): the rank-≤2r ΔW = s·(Q_B·A + B·Q_Aᵀ) is
        (k ≥ 1; refresh_every = 0: never)   re-factored by two thin QRs and a 2r×2r SVD and truncated to
                                            rank r; logs ``sds/truncation_error`` (max over layers) and
                                            ``sds/truncation_error_mean`` of ‖ΔW_before − ΔW_after‖_F

With warmup_steps = 0 the layers are rebalanced in ``on_train_start`` (B = 0: A = B = 0 and bases from
A's row space / an arbitrary orthonormal Q_B). On resume, layers found still in warm-up past
``warmup_steps`` are rebalanced at once.

Optimiser moments: the moments of A and B are deleted (``optimizer.state[p]``) on every optimizer of the
trainer, so Adam restarts them (and its bias correction) at the next step. After rebalance the old moments
describe different coordinates. ``reset_moments_on_refresh`` (default True) does the same after every
refresh: the SVD re-orders, rotates and sign-flips the basis columns that rows of A / columns of B are
paired with, so old moments point in the wrong coordinates, while Adam restarts cleanly from empty state.
Set it to False to keep momentum across refreshes when they are frequent and the bases move little.

Multi-device: under DDP every rank holds identical factors and computes identical bases. Under FSDP2 the
factors are DTensor shards: rebalance/refresh run on the whole matrices gathered on every rank
(``lora_lightning.distributed.full_params``) and each rank writes its shard back; the bases are plain
(replicated) buffers, identical on every rank; the optimiser state is keyed by the same parameter objects,
so the moment reset applies too. FSDP1's flattened shards are refused (use FSDP2 or DDP).

Logging goes straight to ``trainer.loggers`` at the refresh steps only (as Lightning's
LearningRateMonitor does): a value given to ``pl_module.log`` in a callback is re-sent by Lightning at
every later step of the epoch, which would plot stale errors at steps where no refresh happened.

Works on any LightningModule: the layers are found with ``adapter_layers(pl_module)``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from ..adapters.sds import SDSLayer
from ..distributed import check_not_flat_sharded, full_params
from ..inject import adapter_layers


def sds_layers(module: torch.nn.Module) -> list[SDSLayer]:
    """The SDS adapter layers of any module."""
    return [layer for layer in adapter_layers(module).values() if isinstance(layer, SDSLayer)]


def reset_moments(trainer: pl.Trainer, layers: list[SDSLayer]) -> None:
    """Drop the optimiser state of every layer's A and B on every optimizer of ``trainer``."""
    params = [p for layer in layers for p in (layer.lora_A, layer.lora_B)]
    for optimizer in trainer.optimizers:
        for p in params:
            optimizer.state.pop(p, None)


class SDSReorthonormalization(pl.Callback):
    """Rebalance SDS layers after ``warmup_steps`` and refresh them every ``refresh_every`` optimizer steps
    (see module docstring for the math, the schedule and the moment-reset choice)."""

    def __init__(
        self,
        warmup_steps: int = 10,
        refresh_every: int = 100,
        reset_moments_on_refresh: bool = True,
        log: bool = True,
    ) -> None:
        if warmup_steps < 0 or refresh_every < 0:
            raise ValueError(
                f"warmup_steps and refresh_every must be ≥ 0 (got {warmup_steps}, {refresh_every}); "
                "refresh_every=0 disables refreshes"
            )
        self.warmup_steps = int(warmup_steps)
        self.refresh_every = int(refresh_every)
        self.reset_moments_on_refresh = reset_moments_on_refresh
        self.log = log
        self._last_step = -1
        self.last_truncation_errors: torch.Tensor | None = None  # per layer, from the latest refresh

    def _layers(self, pl_module: pl.LightningModule) -> list[SDSLayer]:
        layers = sds_layers(pl_module)
        if not layers:
            raise ValueError(
                f"SDSReorthonormalization found no SDS adapter layers in {type(pl_module).__name__}; inject them "
                "with inject_adapters(model, AdapterConfig(method='sds', ...)) or remove this callback"
            )
        return layers

    def _rebalance_due(self, trainer: pl.Trainer, layers: list[SDSLayer]) -> bool:
        warming = [layer for layer in layers if not layer.active]
        if not warming or trainer.global_step < self.warmup_steps:
            return False
        for layer in warming:
            with full_params(layer):
                layer.rebalance()
        reset_moments(trainer, warming)
        return True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = self._layers(pl_module)
        check_not_flat_sharded(pl_module, "SDSReorthonormalization")
        self._last_step = trainer.global_step
        self._rebalance_due(trainer, layers)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # several micro-batches per optimizer step
            return
        self._last_step = step
        layers = self._layers(pl_module)
        if self._rebalance_due(trainer, layers):
            return
        since = step - self.warmup_steps
        if not self.refresh_every or since <= 0 or since % self.refresh_every:
            return
        errors = []
        for layer in layers:
            with full_params(layer):
                errors.append(layer.refresh().float())
        errors = torch.stack(errors)
        if self.reset_moments_on_refresh:
            reset_moments(trainer, layers)
        self.last_truncation_errors = errors
        if self.log:
            metrics = {"sds/truncation_error": errors.max().item(), "sds/truncation_error_mean": errors.mean().item()}
            step = trainer.fit_loop.epoch_loop._batches_that_stepped  # Lightning's step axis, as LearningRateMonitor
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
