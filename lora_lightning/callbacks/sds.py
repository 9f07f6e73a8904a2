"""SDS-LoRA re-orthonormalisation: switch SDS layers on after warm-up, then refresh their bases.

The paper's text available to us (arXiv 2606.16454) gives neither the refresh nor its schedule nor the
optimiser handling; every choice below is a [reading] or [ours] and an option, and the defaults (truncate,
every 10 steps, moments kept, warm-up 10) are the best-measured ones (docs/results.md §2, "SDS-LoRA's
options": with Adam on the ill-conditioned task they reach the target 2.4–3.3× sooner (κ = 1 … 1000) than
our earlier default of every 100 steps with the moments reset; the [reading] re-orthonormalise-only refresh
does not converge at κ = 100 within 1,500 steps on the phased schedule, though it is the best option on the
digits transfer task, +2.4 points).

Schedule, in optimizer steps t = ``trainer.global_step`` (checked in ``on_train_batch_end``, i.e. right
after the optimizer step, once per step also under gradient accumulation), ``RefreshSchedule``:

    t = warmup_steps                        rebalance() every SDS layer: plain LoRA (A, B) → SDS
                                            (Q_B, Q_A, A, B) with ΔW unchanged; Adam moments of A, B cleared
    schedule="every" [ours]:                a refresh at t = warmup_steps + k·refresh_every (k ≥ 1;
                                            refresh_every = 0: never)
    schedule="phased" [reading]:            P = ``phases`` phases of ``phase_steps`` steps after warm-up;
                                            phase k (1..P) refreshes every k steps, counted from its start;
                                            after phase P, every P steps. ``phase_steps=None``: the rest of
                                            the run split evenly, ⌈(T − warmup_steps)/P⌉ with T the trainer's
                                            total optimizer steps

A refresh (``refresh=``):

    "truncate" [ours]                       SDSLayer.refresh(): the rank-≤2r ΔW = s·(Q_B·A + B·Q_Aᵀ) is
                                            re-factored by two thin QRs and a 2r×2r SVD and truncated to
                                            rank r (ΔW changes by the truncation error only); logs
                                            ``sds/truncation_error`` (max over layers) and ``..._mean``
    "reorthonormalize" [reading]            SDSLayer.reorthonormalize(): Q_A ← orth(Aᵀ), Q_B ← orth(B), A and
                                            B untouched (what one third-party implementation does); logs
                                            ``sds/reorthonormalize_change`` (max) and ``..._mean`` of
                                            ‖ΔW_after − ΔW_before‖_F

With warmup_steps = 0 the layers are rebalanced in ``on_train_start`` (B = 0: A = B = 0 and bases from
A's row space / an arbitrary orthonormal Q_B). On resume, layers found still in warm-up past
``warmup_steps`` are rebalanced at once.

Optimiser moments: at the rebalance the moments of A and B are deleted (``optimizer.state[p]``) on every
optimizer of the trainer, so Adam restarts them (and its bias correction) at the next step: after the
rebalance A and B are new coordinates. ``reset_moments_on_refresh`` [ours] does the same after every
refresh; False (the default, measured) clears them only at the warm-up switch, as the third-party
implementation does. A truncating refresh re-orders, rotates and sign-flips the coordinates A's rows and
B's columns are paired with, yet keeping the moments measured better than restarting Adam at every
refresh (our reading of why: restarting throws away the second-moment estimates and re-applies bias
correction's large first steps, and the bases move little between frequent refreshes).

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

import math
from dataclasses import dataclass
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from ..adapters.sds import SDSLayer
from ..distributed import check_not_flat_sharded, full_params
from ..inject import adapter_layers

REFRESHES = ("truncate", "reorthonormalize")
SCHEDULES = ("every", "phased")
_LOG_KEY = {"truncate": "sds/truncation_error", "reorthonormalize": "sds/reorthonormalize_change"}


def sds_layers(module: torch.nn.Module) -> list[SDSLayer]:
    """The SDS adapter layers of any module."""
    return [layer for layer in adapter_layers(module).values() if isinstance(layer, SDSLayer)]


def reset_moments(trainer: pl.Trainer, layers: list[SDSLayer]) -> None:
    """Drop the optimiser state of every layer's A and B on every optimizer of ``trainer``."""
    params = [p for layer in layers for p in (layer.lora_A, layer.lora_B)]
    for optimizer in trainer.optimizers:
        for p in params:
            optimizer.state.pop(p, None)


@dataclass(frozen=True)
class RefreshSchedule:
    """Which optimizer steps refresh the bases (module docstring). Pure Python: plain torch loops use it too.

    ``phases = 0``: every ``refresh_every`` steps after ``warmup_steps`` (0 = never). ``phases = P > 0``: P
    phases of ``phase_steps`` steps after warm-up, phase k refreshing every k steps, then every P steps.

    Example:
        >>> RefreshSchedule(warmup_steps=2, phases=3, phase_steps=4).steps(16)
        [3, 4, 5, 6, 8, 10, 13, 16]
    """

    warmup_steps: int
    refresh_every: int = 0
    phases: int = 0
    phase_steps: int = 0

    def __post_init__(self) -> None:
        if min(self.warmup_steps, self.refresh_every, self.phases, self.phase_steps) < 0:
            raise ValueError(f"RefreshSchedule: every field must be ≥ 0 (got {self})")
        if self.phases and not self.phase_steps:
            raise ValueError("RefreshSchedule: a phased schedule needs phase_steps ≥ 1")

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based count of steps taken) refreshes."""
        since = step - self.warmup_steps
        if since <= 0:
            return False
        if not self.phases:
            return bool(self.refresh_every) and since % self.refresh_every == 0
        k = min(self.phases, (since - 1) // self.phase_steps + 1)
        return (since - (k - 1) * self.phase_steps) % k == 0

    def steps(self, until: int) -> list[int]:
        """The refresh steps in 1..until."""
        return [t for t in range(1, until + 1) if self.due(t)]


class SDSReorthonormalization(pl.Callback):
    """Rebalance SDS layers after ``warmup_steps``, then refresh their bases on a schedule (module docstring:
    the math, the schedules and the moment handling; every option is a [reading] or [ours]).

    Args:
        warmup_steps: plain-LoRA optimizer steps before the rebalance (0: at train start).
        refresh_every: the interval of ``schedule="every"`` (0 = never refresh).
        reset_moments_on_refresh: also clear A's and B's optimiser moments after every refresh (they are
            always cleared at the rebalance).
        refresh: "truncate" (``SDSLayer.refresh``) or "reorthonormalize" (``SDSLayer.reorthonormalize``).
        schedule: "every" (``refresh_every``) or "phased" (``phases``, ``phase_steps``).
        phases: P of the phased schedule.
        phase_steps: steps per phase; None = the rest of the run split into P equal phases.
        log: log the ΔW change of each refresh (max and mean over layers).

    Raises:
        ValueError: negative counts, an unknown ``refresh``/``schedule``, or (at train start) a phased
            schedule with ``phase_steps=None`` on a run of unknown length.

    Example:
        >>> SDSReorthonormalization(warmup_steps=10, refresh="reorthonormalize", schedule="phased")  # doctest: +SKIP
    """

    def __init__(
        self,
        warmup_steps: int = 10,
        refresh_every: int = 10,
        reset_moments_on_refresh: bool = False,
        refresh: str = "truncate",
        schedule: str = "every",
        phases: int = 5,
        phase_steps: Optional[int] = None,
        log: bool = True,
    ) -> None:
        if warmup_steps < 0 or refresh_every < 0:
            raise ValueError(
                f"warmup_steps and refresh_every must be ≥ 0 (got {warmup_steps}, {refresh_every}); "
                "refresh_every=0 disables refreshes"
            )
        if refresh not in REFRESHES:
            raise ValueError(f"refresh={refresh!r}: choose one of {', '.join(REFRESHES)}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if phases < 1 or (phase_steps is not None and phase_steps < 1):
            raise ValueError(f"phases and phase_steps must be ≥ 1 (got {phases}, {phase_steps}); "
                             "phase_steps=None splits the run evenly")
        self.warmup_steps = int(warmup_steps)
        self.refresh_every = int(refresh_every)
        self.reset_moments_on_refresh = reset_moments_on_refresh
        self.refresh = refresh
        self.schedule_kind = schedule
        self.phases = int(phases)
        self.phase_steps = phase_steps
        self.log = log
        self.schedule: Optional[RefreshSchedule] = None  # built at train start (a phased one needs the run length)
        self._last_step = -1
        self.last_changes: torch.Tensor | None = None  # per layer, ‖ΔW change‖_F of the latest refresh

    def _layers(self, pl_module: pl.LightningModule) -> list[SDSLayer]:
        layers = sds_layers(pl_module)
        if not layers:
            raise ValueError(
                f"SDSReorthonormalization found no SDS adapter layers in {type(pl_module).__name__}; inject them "
                "with inject_adapters(model, AdapterConfig(method='sds', ...)) or remove this callback"
            )
        return layers

    def _build_schedule(self, trainer: pl.Trainer) -> RefreshSchedule:
        if self.schedule_kind == "every":
            return RefreshSchedule(self.warmup_steps, refresh_every=self.refresh_every)
        phase_steps = self.phase_steps
        if phase_steps is None:
            total = float(trainer.estimated_stepping_batches)
            if not math.isfinite(total):
                raise ValueError(
                    "SDSReorthonormalization(schedule='phased', phase_steps=None) splits the run into phases but "
                    "this run has no finite length: set trainer.max_steps / max_epochs, or phase_steps"
                )
            if total <= self.warmup_steps:
                rank_zero_warn(f"SDS: the run ({total:g} steps) ends within warm-up ({self.warmup_steps} steps)")
            phase_steps = max(1, math.ceil((total - self.warmup_steps) / self.phases))
        return RefreshSchedule(self.warmup_steps, phases=self.phases, phase_steps=phase_steps)

    def _rebalance_due(self, trainer: pl.Trainer, layers: list[SDSLayer]) -> bool:
        warming = [layer for layer in layers if not layer.active]
        if not warming or trainer.global_step < self.warmup_steps:
            return False
        for layer in warming:
            with full_params(layer):
                layer.rebalance()
        reset_moments(trainer, warming)
        return True

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        layers = self._layers(pl_module)
        check_not_flat_sharded(pl_module, "SDSReorthonormalization")
        self.schedule = self._build_schedule(trainer)
        self._last_step = trainer.global_step
        self._rebalance_due(trainer, layers)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # several micro-batches per optimizer step
            return
        self._last_step = step
        layers = self._layers(pl_module)
        if self._rebalance_due(trainer, layers) or not self.schedule.due(step):
            return
        changes = []
        for layer in layers:
            with full_params(layer):
                change = layer.refresh() if self.refresh == "truncate" else layer.reorthonormalize()
            changes.append(change.float())
        changes = torch.stack(changes)
        if self.reset_moments_on_refresh:
            reset_moments(trainer, layers)
        self.last_changes = changes
        if self.log:
            key = _LOG_KEY[self.refresh]
            metrics = {key: changes.max().item(), f"{key}_mean": changes.mean().item()}
            step = trainer.fit_loop.epoch_loop._batches_that_stepped  # Lightning's step axis, as LearningRateMonitor
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
