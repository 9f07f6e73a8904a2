"""NonFiniteGuard: what to do when the loss or a gradient turns NaN/inf (``mode``).

    "stop" (default)  end the run with one error naming the first bad optimizer step, its loss, the tensors
                      whose gradients were non-finite, the likely causes (learning rate, precision, a data
                      row) and the last good checkpoint.
    "skip"            drop that optimizer step: every gradient of the optimizer is set to None before
                      ``optimizer.step``, which torch optimizers treat as "no update", so the weights AND the
                      optimiser state (Adam's moments and step counter) stay bit-identical. The LR schedule and
                      ``global_step`` still advance (as with GradScaler's skipped steps). ``nonfinite/skipped``
                      (total) is logged at every skip; more than ``max_consecutive_skips`` skips in a row end
                      the run as "stop" does.
    "ignore"          today's behaviour: nothing is checked.

What is checked, once per optimizer step: the loss of every micro-batch (``on_before_backward``) and every
gradient the optimizer will use (``on_before_optimizer_step``: after gradient accumulation, DDP's all-reduce
and AMP unscaling, before clipping). One fused reduction: ``torch._foreach_norm(grads, inf)`` (max |g| per
tensor: NaN/inf propagate, a finite gradient can never overflow it), stacked with the loss, ``isfinite``.

Cost. The flag stays on the device. "stop" reads it on the host only where Lightning synchronises anyway:
every ``check_every_n_steps`` optimizer steps (default ``trainer.log_every_n_steps``, when the logger
connector reads the logged values), before validation, before any checkpoint is written (so a checkpoint is
never taken after an undetected bad step), and at epoch end; the error therefore comes up to that many steps
after the bad step, and names the first one (recorded on the device). "skip" must decide before the step:
one host read of the flag per optimizer step (measured in ``benchmarks/nonfinite_guard.py``).

Mixed precision: with a GradScaler (fp16), inf/NaN gradients are the scaler's business (it skips the step and
lowers the scale while it calibrates); they are expected and not counted. A non-finite *loss* still counts.

Multi-device: under DDP the gradients are all-reduced before the check, so every rank sees the same flag; the
losses differ per rank, so the decision is reduced across ranks ("any rank bad"); under FSDP2 each rank checks
its local gradient shards and the decision is reduced the same way. Every rank stops or skips together.

Works on any LightningModule (it looks at the optimizer's parameters, not at adapter layers).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = ()  # type: ignore[assignment]

MODES = ("stop", "skip", "ignore")


class NonFiniteLossError(RuntimeError):
    """Raised by ``NonFiniteGuard`` when a run produced a NaN/inf loss or gradient."""


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _params_with_grad(optimizer: torch.optim.Optimizer) -> list[tuple[int, Tensor]]:
    return [(id(p), p) for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


class NonFiniteGuard(Callback):
    """Stop (default), skip, or ignore optimizer steps whose loss or gradients are NaN/inf (module docstring).

    Args:
        mode: "stop", "skip" or "ignore".
        max_consecutive_skips: in "skip" mode, this many skipped steps in a row end the run.
        check_every_n_steps: in "stop" mode, read the device-side flag every this many optimizer steps
            (None = ``trainer.log_every_n_steps``); it is also read before validation, checkpoints and at
            epoch end.

    Raises:
        NonFiniteLossError: in "stop" mode at the first check after a bad step; in "skip" mode after too many
            consecutive skips.

    Example::

        trainer = Trainer(callbacks=[NonFiniteGuard(mode="skip", max_consecutive_skips=5)])
    """

    def __init__(self, mode: str = "stop", max_consecutive_skips: int = 10, check_every_n_steps: Optional[int] = None):
        if mode not in MODES:
            raise ValueError(f"NonFiniteGuard: unknown mode={mode!r}; choose one of {', '.join(MODES)}")
        for name, value, optional in (
            ("max_consecutive_skips", max_consecutive_skips, False),
            ("check_every_n_steps", check_every_n_steps, True),
        ):
            if optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                none = "None or " if optional else ""
                raise ValueError(f"NonFiniteGuard: {name} must be {none}an integer ≥ 1 (got {value!r})")
        self.mode = mode
        self.max_consecutive_skips = max_consecutive_skips
        self.check_every_n_steps = check_every_n_steps
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._reset_pending()

    def _reset_pending(self) -> None:
        self._loss: Optional[Tensor] = None  # sum of this step's micro-batch losses (NaN/inf propagate)
        self._bad: Optional[Tensor] = None  # stop mode: number of bad steps since the last check (device)
        self._first: Optional[Tensor] = None  # stop mode: [loss, max|g| per tensor] of the first bad step
        self._first_index: Optional[Tensor] = None  # stop mode: which step since the last check it was
        self._steps: list[tuple[int, int, int, list[int]]] = []  # host: (global_step, epoch, batch_idx, param ids)
        self._last_checked_step = -1

    # -- per micro-batch / per step --------------------------------------------------------------
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        if self.mode == "ignore":
            return
        loss = loss.detach().float()
        self._loss = loss if self._loss is None else self._loss + loss

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def _scaler_active(self, trainer: Trainer) -> bool:
        return getattr(trainer.precision_plugin, "scaler", None) is not None

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self.mode == "ignore":
            return
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # Lightning's wrapper
        params = _params_with_grad(optimizer)
        loss = self._loss
        self._loss = None
        if not params and loss is None:
            return
        device = params[0][1].grad.device if params else loss.device
        values = []
        if loss is not None:
            values.append(loss.reshape(1).to(device))
        else:
            values.append(torch.zeros(1, device=device))
        if params and not self._scaler_active(trainer):  # with a GradScaler, inf gradients are its business
            norms = torch._foreach_norm([_local(p.grad) for _, p in params], math.inf)
            values.append(torch.stack(norms).to(values[0].dtype))
        vector = torch.cat(values)
        bad = ~torch.isfinite(vector).all()
        ids = [i for i, _ in params] if len(vector) > 1 else []
        if self.mode == "skip":
            self._skip_or_step(trainer, pl_module, optimizer, bad, vector, ids)
        else:
            self._record(trainer, bad, vector, ids)

    def _any_rank(self, trainer: Trainer, bad: Tensor) -> bool:
        flag = bool(bad)  # the one host read per step that "skip" needs
        if trainer.world_size > 1:
            flag = trainer.strategy.reduce_boolean_decision(flag, all=False)
        return flag

    def _skip_or_step(self, trainer, pl_module, optimizer, bad: Tensor, vector: Tensor, ids: list[int]) -> None:
        if not self._any_rank(trainer, bad):
            self.consecutive_skips = 0
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # torch optimizers leave parameters without a gradient (and their state) untouched
        self.skipped_steps += 1
        self.consecutive_skips += 1
        step = trainer.global_step
        if self.consecutive_skips > self.max_consecutive_skips:
            raise NonFiniteLossError(
                self._message(trainer, step, vector, ids, f"{self.consecutive_skips} optimizer steps in a row "
                              f"(max_consecutive_skips={self.max_consecutive_skips}) had")
            )
        rank_zero_warn(
            f"NonFiniteGuard: skipped optimizer step {step} (loss {float(vector[0]):.4g}, "
            f"{self._bad_names(trainer, vector, ids) or 'no gradient'} non-finite); {self.skipped_steps} skipped so far"
        )
        for logger in trainer.loggers:
            logger.log_metrics({"nonfinite/skipped": float(self.skipped_steps)}, step=step)

    def _record(self, trainer: Trainer, bad: Tensor, vector: Tensor, ids: list[int]) -> None:
        """Stop mode: remember (on the device) the first bad step since the last check."""
        index = len(self._steps)
        self._steps.append((trainer.global_step, trainer.current_epoch, getattr(self, "_batch_idx", -1), ids))
        if self._bad is None or self._first is None or self._first.shape != vector.shape:
            if self._bad is not None and self._first is not None:  # the parameter list changed: check now
                self.check(trainer)
            self._bad = torch.zeros((), dtype=torch.long, device=vector.device)
            self._first = torch.zeros_like(vector)
            self._first_index = torch.zeros((), dtype=torch.long, device=vector.device)
        first = bad & (self._bad == 0)
        self._first = torch.where(first, vector, self._first)
        self._first_index = torch.where(first, index, self._first_index)
        self._bad += bad.long()

    # -- host checks (stop mode) ------------------------------------------------------------------
    def check(self, trainer: Trainer) -> None:
        """Read the device-side flag (a host sync) and raise if a bad step happened since the last check."""
        if self.mode != "stop":
            return
        bad = self._bad is not None and int(self._bad) > 0
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            self._steps = []
            if self._bad is not None:
                self._bad.zero_()
            return
        if self._bad is None or int(self._bad) == 0:
            raise NonFiniteLossError(
                "NonFiniteGuard: another rank had a NaN/inf loss or gradient (see its error); stopping every rank. "
                + self._advice(trainer)
            )
        step, epoch, batch_idx, ids = self._steps[int(self._first_index)]
        vector = self._first.cpu()
        where = f" (epoch {epoch}, batch {batch_idx})" if batch_idx >= 0 else ""
        count = int(self._bad)
        raise NonFiniteLossError(
            self._message(trainer, step, vector, ids, f"optimizer step {step}{where} had", count)
        )

    def _bad_names(self, trainer: Trainer, vector: Tensor, ids: list[int]) -> str:
        named = {id(p): n for n, p in trainer.lightning_module.named_parameters()}
        bad = [named.get(i, "<unnamed>") for i, g in zip(ids, vector[1:].tolist()) if not math.isfinite(g)]
        more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
        return ", ".join(bad[:5]) + more

    def _message(self, trainer, step: int, vector: Tensor, ids: list[int], what: str, count: int = 1) -> str:
        loss = float(vector[0])
        grads = self._bad_names(trainer, vector, ids)
        grads = f"non-finite gradients in {grads}" if grads else "finite gradients"
        later = f" ({count} bad steps since the previous check)" if count > 1 else ""
        return (
            f"NonFiniteGuard: {what} a non-finite loss or gradient: loss {loss:.6g}, {grads}{later}. "
            + self._advice(trainer)
        )

    def _advice(self, trainer: Trainer) -> str:
        lrs = sorted({g.get("initial_lr", g["lr"]) for opt in trainer.optimizers for g in opt.param_groups})
        lr = ", ".join(f"{x:.3g}" for x in lrs) or "?"
        return (
            f"Likely causes: a learning rate too high (lr={lr}: try 3-10× lower or a longer warm-up), the "
            f"numeric precision (precision={trainer.precision}: fp16 overflows, prefer bf16-mixed or 32), or a bad "
            f"data row in that batch (empty text, a label outside 0..C-1). Last good checkpoint: "
            f"{last_good_checkpoint(trainer) or 'none saved yet'}. Resume from it with "
            "`lora-lightning fit ... --ckpt_path last` after the fix, or let the run drop such steps with "
            "NonFiniteGuard(mode='skip') (LoRAModule(nonfinite='skip'))."
        )

    def _check_due(self, trainer: Trainer) -> None:
        n = self.check_every_n_steps or trainer.log_every_n_steps or 1
        step = trainer.global_step
        if step != self._last_checked_step and step % n == 0:
            self._last_checked_step = step
            self.check(trainer)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.mode == "stop":
            self._check_due(trainer)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit":
            self.check(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check(trainer)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == "fit":
            self.check(trainer)  # never write a checkpoint taken after an undetected bad step

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset_pending()

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "consecutive_skips": self.consecutive_skips}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.consecutive_skips = int(state_dict.get("consecutive_skips", 0))


def last_good_checkpoint(trainer: Trainer) -> str:
    """The newest checkpoint file of the Trainer's ModelCheckpoints and adapter folders of AdapterCheckpoints."""
    from .adapter_checkpoint import AdapterCheckpoint

    found = []
    for cb in trainer.checkpoint_callbacks:
        for path in (getattr(cb, "last_model_path", ""), getattr(cb, "best_model_path", "")):
            if path:
                found.append(str(path))
    for cb in trainer.callbacks:
        if isinstance(cb, AdapterCheckpoint) and cb.dirpath is not None and (cb.dirpath / "last").is_dir():
            found.append(f"{cb.dirpath / 'last'} (adapter)")
    return ", ".join(dict.fromkeys(found))


__all__ = ["MODES", "NonFiniteGuard", "NonFiniteLossError", "last_good_checkpoint"]
