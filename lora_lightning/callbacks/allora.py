"""ALLoRA's per-row learning-rate rescaling (Huang & Balestriero 2024, arXiv 2410.09692).

For every row θ_i of an adapter factor, with the weights *before* the step,

    c_i = 1 / √(‖θ_i‖ + 1/η²)          (norm="norm", default)
    c_i = 1 / √(‖θ_i‖² + 1/η²)         (norm="squared")

so c_i = η at θ_i = 0 (LoRA's starting step with η = α/r, default 2) and c_i shrinks as the row grows.

Rows (``rows``):
    "factors" (default)  rows of A (r×in: r rows of length in) and rows of B (out×r: out rows of length r),
                         each with its own c_i.
    "product"            θ_i = row i of ΔW = s·B·A (= B·A under ALLoRA's s = 1), its norm from the r×r Gram
                         ‖(BA)_i‖² = B_i·(A·Aᵀ)·B_iᵀ (no out×in matrix). Row i of B only feeds row i of ΔW,
                         so B's row i gets c_i. Every row of A feeds every row of ΔW, so no per-row choice is
                         exact; A gets one scalar, mean_i c_i (= η at init, where all c_i = η). [ours]

Where c is applied (``mode``) [ours]:
    "update" (default)   on the optimiser's update: θ_new = θ_old + c ⊙ (θ_stepped − θ_old), via torch
                         optimizer step pre/post hooks (works with any loop, gradient accumulation, manual
                         optimisation; the pre-hook fires before Lightning's closure runs forward/backward,
                         which does not move the weights). The optimiser's state (Adam moments) sees the raw
                         gradients and gradient clipping the raw norm; only the step taken is rescaled, i.e.
                         c is a per-row learning-rate factor.
    "gradient"           grad ← c ⊙ grad just before the step (Lightning's ``on_before_optimizer_step``,
                         after accumulation and AMP unscaling, before gradient clipping, so clipping sees
                         the rescaled gradient; the moments then accumulate c ⊙ grad). Equal to "update"
                         for plain SGD; with Adam a row-constant factor largely cancels in m/√v, which is
                         why "update" is the default.

Weight decay (``weight_decay``, "update" mode only):
    "scaled" (default)   decoupled decay (AdamW) is part of the update, so it is rescaled by c_i too;
                         coupled L2 decay (Adam, SGD) is in the gradient anyway.
    "unscaled"           the decay step −lr·λ·θ_old is kept at full size and only the rest is rescaled:
                         θ_new = θ_old − lr·λ·θ_old + c ⊙ (θ_stepped − θ_old + lr·λ·θ_old). Exact only when
                         the decay is separable from the update: decoupled decay (AdamW,
                         Adam(decoupled_weight_decay=True)) or SGD without momentum; anything else with
                         weight_decay > 0 is refused at fit start.
    In "gradient" mode the optimiser applies its own decay after the rescaled gradient (AdamW: unscaled;
    L2: added to the rescaled gradient, so unscaled too); the option is ignored there.

Only ``lora_A`` and ``lora_B`` are rescaled (DoRA's ``magnitude`` and any head keep the plain update).
Logs ``allora/coef_mean``: the mean of the coefficients of every rescaled row at the last step.

Multi-device: under DDP every rank rescales identical parameters identically. Under FSDP2 the factors are
DTensors sharded along dim 0, so every rank holds whole rows of A (r×in) and B (out×r): with "factors" the
coefficients and the rescaled update are computed on the local rows (no communication; ``coef_mean`` is
then over rank 0's rows); "product" gathers A and B (r×(in+out) values) for the Gram and the mean. FSDP1's
flattened shards are refused (use FSDP2 or DDP).
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn

from ..distributed import check_not_flat_sharded, full_tensor, local_part, local_rows
from ..inject import adapter_layers

ROWS = ("factors", "product")
NORMS = ("norm", "squared")
MODES = ("update", "gradient")
WEIGHT_DECAY = ("scaled", "unscaled")


def _check(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"ALLoRARescaling: unknown {name}={value!r}; choose one of {', '.join(choices)}")


def _decay_is_separable(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    if isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False):
        return True
    return isinstance(optimizer, torch.optim.SGD) and group.get("momentum", 0) == 0


class ALLoRARescaling(Callback):
    """Per-row rescaling c_i = 1/√(‖θ_i‖ + 1/η²) of the adapter updates (see module docstring)."""

    def __init__(
        self,
        eta: float = 2.0,
        rows: str = "factors",
        norm: str = "norm",
        mode: str = "update",
        weight_decay: str = "scaled",
    ) -> None:
        if not eta > 0:
            raise ValueError(f"ALLoRARescaling: eta must be > 0 (got {eta}); the paper's default is 2")
        _check("rows", rows, ROWS)
        _check("norm", norm, NORMS)
        _check("mode", mode, MODES)
        _check("weight_decay", weight_decay, WEIGHT_DECAY)
        self.eta, self.rows, self.norm, self.mode, self.weight_decay = float(eta), rows, norm, mode, weight_decay
        self._targets: dict[int, list[tuple[nn.Parameter, nn.Module, int, dict]]] = {}
        self._handles: list = []
        self._pending: dict[int, list] = {}
        self._coef_mean: Tensor | None = None

    # -- the math -------------------------------------------------------------------------------
    @torch.no_grad()
    def coefficients(self, layer: nn.Module) -> tuple[Tensor, Tensor]:
        """(c_A of shape r×1, c_B of shape out×1) from the layer's current lora_A, lora_B (under FSDP2: for
        the rows this rank holds)."""
        dtype = torch.float64 if layer.lora_A.dtype == torch.float64 else torch.float32
        if self.rows == "factors":
            A, B = local_rows(layer.lora_A.detach()).to(dtype), local_rows(layer.lora_B.detach()).to(dtype)
            sq_a, sq_b = A.square().sum(1), B.square().sum(1)
        else:  # the Gram needs every row of A, the mean every row of B: whole matrices
            A, B = full_tensor(layer.lora_A.detach()).to(dtype), full_tensor(layer.lora_B.detach()).to(dtype)
            sq_b = ((B @ (A @ A.T)) * B).sum(1).clamp_min(0) * layer.scaling**2
        coef = lambda sq: (sq if self.norm == "squared" else sq.sqrt()).add(self.eta**-2).rsqrt()  # noqa: E731
        c_b = coef(sq_b)
        if self.rows == "factors":
            return coef(sq_a)[:, None], c_b[:, None]
        c_a = c_b.mean().expand(A.shape[0]).contiguous()
        return local_part(c_a, layer.lora_A)[:, None], local_part(c_b, layer.lora_B)[:, None]

    def _coefficients_for(self, optimizer: torch.optim.Optimizer) -> list[tuple[nn.Parameter, Tensor, dict]]:
        cache: dict[int, tuple[Tensor, Tensor]] = {}
        out = []
        for p, layer, i, group in self._targets.get(id(optimizer), []):
            if id(layer) not in cache:
                cache[id(layer)] = self.coefficients(layer)
            out.append((p, cache[id(layer)][i].to(p.dtype), group))
        if out:
            self._coef_mean = torch.cat([c.flatten().float() for _, c, _ in out]).mean()
        return out

    # -- "update" mode: torch optimizer step hooks ------------------------------------------------
    def _pre_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        self._pending[id(optimizer)] = [
            (p, local_rows(p.detach()).clone(), c, float(group["lr"]) * group.get("weight_decay", 0.0))
            for p, c, group in self._coefficients_for(optimizer)
        ]

    @torch.no_grad()
    def _post_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        for p, old, c, decay in self._pending.pop(id(optimizer), []):
            if p.grad is None:  # the optimiser skipped it: nothing to rescale
                continue
            rows = local_rows(p.detach())  # p itself, or its local shard (a view: copy_ writes into p)
            new = old + c * (rows - old)
            if self.weight_decay == "unscaled" and decay:
                new -= (1 - c) * decay * old
            rows.copy_(new)

    # -- "gradient" mode ------------------------------------------------------------------------
    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if self.mode != "gradient":
            return
        for p, c, _ in self._coefficients_for(getattr(optimizer, "_optimizer", optimizer)):
            if p.grad is not None:
                local_rows(p.grad).mul_(c)

    # -- Lightning hooks ------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()
        check_not_flat_sharded(pl_module, "ALLoRARescaling")
        layers = {n: m for n, m in adapter_layers(pl_module).items() if hasattr(m, "lora_A") and hasattr(m, "lora_B")}
        if not layers:
            raise ValueError(
                f"ALLoRARescaling found no adapter layers with lora_A/lora_B in {type(pl_module).__name__}; "
                "call inject_adapters(...) on the model (or use LoRAModule) before fitting"
            )
        for opt in trainer.optimizers:
            group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
            targets = [
                (p, layer, i, group_of[id(p)])
                for layer in layers.values()
                for i, p in enumerate((layer.lora_A, layer.lora_B))
                if id(p) in group_of
            ]
            for _, _, _, group in targets:
                if self.mode == "update" and self.weight_decay == "unscaled" and group.get("weight_decay", 0):
                    if not _decay_is_separable(opt, group):
                        raise ValueError(
                            "ALLoRARescaling(weight_decay='unscaled') needs weight decay that is separable from "
                            f"the update (AdamW, Adam(decoupled_weight_decay=True), SGD without momentum); "
                            f"{type(opt).__name__} with weight_decay={group['weight_decay']} mixes it into the "
                            "gradient or moments. Use weight_decay='scaled' or AdamW."
                        )
            if targets:
                self._targets[id(opt)] = targets
                if self.mode == "update":
                    self._handles += [
                        opt.register_step_pre_hook(self._pre_step),
                        opt.register_step_post_hook(self._post_step),
                    ]
        if not self._targets:
            raise ValueError(
                "ALLoRARescaling: no lora_A/lora_B parameter is in any of trainer.optimizers; "
                "pass the adapter parameters to the optimizer in configure_optimizers"
            )

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._coef_mean is not None:
            pl_module.log("allora/coef_mean", self._coef_mean, on_step=True, on_epoch=False)
            self._coef_mean = None

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._targets, self._pending = [], {}, {}
