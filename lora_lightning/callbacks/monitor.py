"""AdapterMonitor: ΔW spectra, norms and the signal/drift of updates, logged through the Lightning logger.

Every ``every_n_steps`` optimiser steps, per adapter layer (math in ``lora_lightning.spectra``; ΔW is never
formed, only its ≤ k×k core):

    monitor/<layer>/stable_rank      ‖ΔW‖_F² / ‖ΔW‖_2²
    monitor/<layer>/numerical_rank   #{σ > rtol·σ_max}
    monitor/<layer>/fro_norm         ‖ΔW‖_F
    monitor/<layer>/spectral_norm    ‖ΔW‖_2 = σ_max
    monitor/<layer>/nuclear_norm     ‖ΔW‖_* = Σσ
    monitor/<layer>/factor_sq_norm   ‖A‖_F² + ‖B‖_F²

(the loss-landscape diagnostics of Kim, Kim & Ryu 2025: low-rank small-norm vs high-rank large-norm
solutions). Every ``signal_drift_every`` steps, for layers with ``lora_A``/``lora_B`` (the LoRA family):

    monitor/<layer>/signal        ‖s·(δB·A + B·δA)‖_F    first-order change of ΔW in the step
    monitor/<layer>/drift         ‖s·δB·δA‖_F            second-order change
    monitor/<layer>/drift_ratio   drift / signal

(the LoRA-α reading: raising α raises the signal at a constant drift ratio, raising the LR raises both).
δA, δB are the change over the optimiser step(s) of one training batch: A and B are copied in
``on_before_optimizer_step`` (after backward, before the first step of the batch, only on steps where
signal/drift is due) and compared in ``on_train_batch_end``, after every step hook (e.g. ALLoRA's) ran.

Metrics go straight to ``trainer.loggers`` at ``step = trainer.global_step`` (optimiser steps taken, this
update included), as Lightning's ``LearningRateMonitor`` does, and only on the steps they are computed:
``pl_module.log`` would re-send the stale values at every step in between and keep every per-layer key in
Lightning's result collection. Aggregates over layers are always logged: ``monitor/<stat>_mean`` and
``monitor/<stat>_max``; the per-layer keys only with ``per_layer=True``. ``last_stats`` keeps the latest values per layer, and
``last_singular_values`` the latest σ per layer, for scripts and plots.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from ..inject import adapter_layers
from ..spectra import delta_singular_values, signal_drift, spectrum_stats


class AdapterMonitor(Callback):
    """Log ΔW spectra/norms every ``every_n_steps`` and signal/drift every ``signal_drift_every`` steps.

    ``numerical_rank_tol``: threshold relative to σ_max (``rtol`` of ``torch.linalg.matrix_rank``);
    None = max(out, in)·eps.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        signal_drift_every: int | None = None,
        per_layer: bool = True,
        numerical_rank_tol: float | None = None,
    ) -> None:
        for name, value in (("every_n_steps", every_n_steps), ("signal_drift_every", signal_drift_every)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"AdapterMonitor: {name} must be a positive integer (got {value!r})")
        if numerical_rank_tol is not None and not numerical_rank_tol >= 0:
            raise ValueError(f"AdapterMonitor: numerical_rank_tol must be ≥ 0 (got {numerical_rank_tol})")
        self.every_n_steps = every_n_steps
        self.signal_drift_every = signal_drift_every or every_n_steps
        self.per_layer = per_layer
        self.numerical_rank_tol = numerical_rank_tol
        self.last_stats: dict[str, dict[str, float]] = {}
        self.last_singular_values: dict[str, Tensor] = {}
        self._before: dict[str, tuple[Tensor, Tensor]] | None = None
        self._logged_step = -1

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._before, self._logged_step = None, -1
        if not adapter_layers(pl_module):
            raise ValueError(
                f"AdapterMonitor found no adapter layers in {type(pl_module).__name__}; "
                "call inject_adapters(...) on the model (or use LoRAModule) before fitting"
            )

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if self._before is None and (trainer.global_step + 1) % self.signal_drift_every == 0:
            self._before = {
                name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
                for name, layer in adapter_layers(pl_module).items()
                if hasattr(layer, "lora_A") and hasattr(layer, "lora_B")
            }

    @torch.no_grad()
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == 0 or step == self._logged_step:  # gradient accumulation: no optimiser step in this batch
            return
        layers = adapter_layers(pl_module)
        stats: dict[str, dict[str, float]] = {}
        if step % self.every_n_steps == 0:
            for name, layer in layers.items():
                sigma = delta_singular_values(layer)
                self.last_singular_values[name] = sigma.cpu()
                stats[name] = spectrum_stats(layer, self.numerical_rank_tol, sigma)
        if self._before is not None:
            for name, (a0, b0) in self._before.items():
                layer = layers[name]
                stats.setdefault(name, {}).update(signal_drift(a0, b0, layer.lora_A, layer.lora_B, layer.scaling))
            self._before = None
        if not stats:
            return
        self._logged_step = step
        for name, s in stats.items():
            self.last_stats.setdefault(name, {}).update(s)
        metrics = self.metrics(stats)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def metrics(self, stats: dict[str, dict[str, float]]) -> dict[str, float]:
        """Flat ``monitor/...`` metrics: per layer (if ``per_layer``) and mean/max over layers."""
        out: dict[str, float] = {}
        if self.per_layer:
            out.update({f"monitor/{layer}/{k}": v for layer, s in stats.items() for k, v in s.items()})
        keys = dict.fromkeys(k for s in stats.values() for k in s)
        for k in keys:
            values = [s[k] for s in stats.values() if k in s]
            out[f"monitor/{k}_mean"] = sum(values) / len(values)
            out[f"monitor/{k}_max"] = max(values)
        return out
