"""GradientFlowCheck: the run learns nothing if a trainable tensor never gets a gradient; say so at step 1.

Checked on the gradients the optimizer is about to use (``on_before_optimizer_step``: after accumulation and
DDP's all-reduce), in the first ``within_steps`` optimizer steps of a fit, never later:

    step 1                 every trainable tensor has a gradient (``.grad`` is not None);
    by step within_steps   every adapter layer has had a non-zero gradient in at least one of its trainable
                           tensors, and every other trainable tensor (e.g. the head) a non-zero gradient itself.

Why per layer, and why not at step 1: LoRA starts at B = 0, so ∂L/∂A = s·Bᵀ·(∂L/∂W) = 0 at the first step
(Hu et al. 2021, §4.1), and A's gradient stays 0 until B has moved. And a layer whose output a zero-initialised
trainable gate multiplies (timm's ResNets set the last BatchNorm weight of every residual branch to 0,
``zero_init_last``; ReZero, adaLN-zero) gets only zero gradients at step 1, non-zero ones at step 2 once the
gate has moved. A learning rate of exactly 0 at the first steps (a warm-up starting from 0) keeps everything
where it was longer: raise ``within_steps`` then.

What it catches: gradient checkpointing with frozen embeddings (no input requires grad, so the checkpointed
blocks and their adapters get none: ``model.enable_input_require_grads()`` or non-reentrant checkpointing),
adapters on layers the loss does not use, a ``detach()``/``no_grad`` in a forward, a loss of 0 everywhere
(every label ignored). One error names the tensors. Costs one host read at each of the first
``within_steps`` steps, none after.

Multi-device: DDP's gradients are identical on every rank; FSDP2's are shards, so the per-tensor flags are
summed over ranks before deciding. Works on any LightningModule containing adapter layers (or none: then
every trainable tensor is its own unit).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from ..inject import adapter_layers
from .nonfinite import _local


class GradientFlowError(RuntimeError):
    """Raised by ``GradientFlowCheck`` when a trainable tensor gets no (or only zero) gradient."""


class GradientFlowCheck(Callback):
    """Error if a trainable tensor gets no gradient at step 1 or only zero gradients by ``within_steps``
    (module docstring).

    Args:
        within_steps: optimizer steps by which every adapter layer (and every other trainable tensor) must have
            had a non-zero gradient (≥ 2: a zero-initialised gate behind a layer opens after step 1).
    """

    def __init__(self, within_steps: int = 2) -> None:
        if isinstance(within_steps, bool) or not isinstance(within_steps, int) or within_steps < 2:
            raise ValueError(
                f"GradientFlowCheck: within_steps must be an integer ≥ 2 (got {within_steps!r}); LoRA's A has a "
                "zero gradient at step 1 by construction (B = 0)"
            )
        self.within_steps = within_steps
        self._steps = 0
        self._seen: dict[int, torch.Tensor] = {}

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._steps = 0
        self._seen = {}

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self._steps >= self.within_steps:
            return
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        if params and all(p.grad is None for p in params):
            return  # a step NonFiniteGuard(mode="skip") dropped (it clears every gradient): not counted
        self._steps += 1
        names = {id(p): n for n, p in pl_module.named_parameters()}
        step = self._steps
        if step == 1:
            missing = [names.get(id(p), "?") for p in params if p.grad is None]
            if missing:
                self._fail(trainer, step, "received no gradient at all (not on the loss path)", missing)
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return
        nonzero = torch.stack([_local(p.grad).ne(0).any() for p in with_grad]).float()
        if trainer.world_size > 1:
            nonzero = trainer.strategy.reduce(nonzero, reduce_op="sum")
        nonzero = (nonzero > 0).tolist()  # the host read: only in the first within_steps steps
        for p, flag in zip(with_grad, nonzero):
            self._seen[id(p)] = self._seen.get(id(p), False) or flag
        if step == self.within_steps:
            dead = [
                ", ".join(names.get(id(p), "?") for p in unit)
                for unit in self._units(pl_module, params)
                if not any(self._seen.get(id(p)) for p in unit)
            ]
            if dead:
                self._fail(trainer, step, f"had only zero gradients in all of the first {step} optimizer steps", dead)

    @staticmethod
    def _units(pl_module: LightningModule, params: list) -> list[list]:
        """Adapter layers (their trainable tensors together) and every other trainable tensor alone."""
        in_optimizer = {id(p) for p in params}
        units, taken = [], set()
        for layer in adapter_layers(pl_module).values():
            unit = [p for n, p in layer.named_parameters() if not n.startswith("base.") and id(p) in in_optimizer]
            if unit:
                units.append(unit)
                taken |= {id(p) for p in unit}
        return units + [[p] for p in params if id(p) not in taken]

    def _fail(self, trainer: Trainer, step: int, what: str, names: list[str]) -> None:
        more = f" (+{len(names) - 8} more)" if len(names) > 8 else ""
        raise GradientFlowError(
            f"GradientFlowCheck: after optimizer step {step}, {len(names)} trainable tensor(s) {what}: "
            f"{'; '.join(names[:8])}{more}. The run would train nothing there. Usual causes: gradient "
            "checkpointing with frozen embeddings (call model.enable_input_require_grads(), or checkpoint with "
            "use_reentrant=False); adapters on layers the loss does not use (add them to exclude_modules); a "
            "detach() or torch.no_grad() in forward; every label of the batch ignored (-100); a learning rate of 0 "
            "at the first steps (raise GradientFlowCheck(within_steps=...)). LoRAModule(checks=False) turns this "
            "check off."
        )

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self._steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # a resumed run already passed (or never reached) the check: do not re-check mid-training
        self._steps = max(int(state_dict.get("steps", 0)), self.within_steps)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step > 0:  # resumed: the first steps were checked in the run that took them
            self._steps = self.within_steps


__all__ = ["GradientFlowCheck", "GradientFlowError"]
