"""ALLoRA (Huang & Balestriero 2024, arXiv 2410.09692): configure, ablate and log its per-row rescaling.

The paper's rule (§4.2 and Listing 1 of Appendix F) is a backward rule of the layer: for output row i of ΔW = B·A
(s = 1: ALLoRA is scale-free, no dropout, LoRA's init),

    c_i = 1 / √(‖(BA)_{i,:}‖ + 1/η²)          (the norm, not squared; c_i = η while BA = 0)

multiplies δ = ∂L/∂(adapter output) per output channel before A's and B's gradients are formed
(grad_B = (c⊙δ)ᵀ·(A·x), grad_A = (Bᵀ·(c⊙δ))ᵀ·x); the gradient to the input x is not rescaled; the norms come
from the weights of the current forward. It lives in the adapter layer (``AdapterLayer.allora_eta``,
``adapters/functional.py``), switched on by ``AdapterConfig(method="allora", eta=2)``, so a plain torch loop,
gradient accumulation, AMP, DDP and FSDP2 get it with no callback. Whatever optimiser follows sees these
gradients (the paper does not name it). Note that Adam(W) divides a gradient by its running RMS, so a factor
c that stayed constant would cancel; under Adam only the change of c over training acts.

This callback configures it and logs it:

    mode="backward" (default: the paper's rule)  sets η (and ``norm``) on every adapter layer at fit start (the
                         layers' own η when ``eta`` is None) and restores the previous setting at teardown; on
                         layers of another method (e.g. "lora" with dropout 0.05: the paper's "ALLoRA+D") it
                         switches the rule on. Needs ``rows="product"`` (the paper's rows).

Ablations [ours, not the paper's rule], applied by the callback while the layers' backward rule is switched off
for the fit (restored at teardown):

    rows="factors"       c_i from the rows of A (r×in) and of B (out×r) separately (A starts at c ≈ 1, not η).
    rows="product"       c_i from the rows of ΔW = s·B·A (from the r×r Gram, no out×in matrix); B's row i gets
                         c_i, A (whose rows feed every row of ΔW) one scalar, mean_i c_i.
    mode="update"        c applied to the optimiser's update: θ_new = θ_old + c ⊙ (θ_stepped − θ_old), via torch
                         optimizer step pre/post hooks (any loop, accumulation, manual optimisation; the moments see
                         the raw gradients): c is a per-row learning-rate factor.
    mode="gradient"      grad ← c ⊙ grad just before the step (``on_before_optimizer_step``: after accumulation and
                         AMP unscaling, before clipping), from the weights after the last micro-batch.
    norm="squared"       c_i = 1/√(‖θ_i‖² + 1/η²) (any mode).

Weight decay (``weight_decay``, "update" mode only):
    "scaled" (default)   decoupled decay (AdamW) is part of the update, so it is rescaled by c_i too;
                         coupled L2 decay (Adam, SGD) is in the gradient anyway.
    "unscaled"           the decay step −lr·λ·θ_old is kept at full size and only the rest is rescaled:
                         θ_new = θ_old − lr·λ·θ_old + c ⊙ (θ_stepped − θ_old + lr·λ·θ_old). Exact only when
                         the decay is separable from the update: decoupled decay (AdamW,
                         Adam(decoupled_weight_decay=True)) or SGD without momentum; anything else with
                         weight_decay > 0 is refused at fit start.

Logs ``allora/coef_mean`` and ``allora/coef_min`` once per optimizer step: over every row of ΔW of every layer
(backward mode; from the weights the step's forward passes used) or over every rescaled row (ablations).

Multi-device: under DDP every rank rescales identical parameters identically. Under FSDP2 the backward rule runs
inside each layer's forward/backward on the gathered factors; the logged coefficients and "product" rows gather
A and B (r×(in+out) values); "factors" works on the local rows (whole rows: FSDP2 shards along dim 0). FSDP1's
flattened shards are refused (use FSDP2 or DDP).
"""

from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from typing_extensions import override

from ..distributed import check_not_flat_sharded, full_tensor, local_part, local_rows
from ..inject import adapter_layers

ROWS = ("factors", "product")
NORMS = ("norm", "squared")
MODES = ("backward", "update", "gradient")
WEIGHT_DECAY = ("scaled", "unscaled")
DEFAULT_ETA = 2.0  # the paper's listing


def _check(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"ALLoRARescaling: unknown {name}={value!r}; choose one of {', '.join(choices)}")


def _decay_is_separable(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    if isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False):
        return True
    return isinstance(optimizer, torch.optim.SGD) and group.get("momentum", 0) == 0


class ALLoRARescaling(Callback):
    """ALLoRA's per-row coefficients c_i = 1/√(‖θ_i‖ + 1/η²): the paper's backward rule (default) or an ablation
    (see module docstring).

    Args:
        eta: η; None = each layer's own (``AdapterConfig.eta`` for method "allora"), else 2 (the paper's listing).
        rows: "product" (rows of ΔW: the paper) or "factors" (rows of A and B; ablation modes only).
        norm: "norm" (the paper) or "squared".
        mode: "backward" (the paper: in the layers' backward), "update" or "gradient" (ablations).
        weight_decay: "scaled" or "unscaled" (mode "update" only).

    Example::

        trainer = L.Trainer(callbacks=[ALLoRARescaling(eta=2.0)])                 # the paper's rule
        trainer = L.Trainer(callbacks=[ALLoRARescaling(rows="factors", mode="update")])  # an ablation
    """

    def __init__(
        self,
        eta: Optional[float] = None,
        rows: str = "product",
        norm: str = "norm",
        mode: str = "backward",
        weight_decay: str = "scaled",
    ) -> None:
        if eta is not None and not eta > 0:
            raise ValueError(f"ALLoRARescaling: eta must be > 0 (got {eta}); the paper's default is 2")
        _check("rows", rows, ROWS)
        _check("norm", norm, NORMS)
        _check("mode", mode, MODES)
        _check("weight_decay", weight_decay, WEIGHT_DECAY)
        if mode == "backward" and rows != "product":
            raise ValueError(
                "ALLoRARescaling: mode='backward' (the paper's rule) scales the gradient per row of ΔW = B·A, i.e. "
                f"rows='product'; rows={rows!r} is an ablation for mode='update' or mode='gradient'"
            )
        self.eta = None if eta is None else float(eta)
        self.rows, self.norm, self.mode, self.weight_decay = rows, norm, mode, weight_decay
        self._targets: dict[int, list[tuple[nn.Parameter, nn.Module, int, dict]]] = {}
        self._layers: list[tuple[nn.Module, Optional[float], str]] = []  # (layer, its η, its norm) at fit start
        self._handles: list = []
        self._pending: dict[int, list] = {}
        self._logged: Optional[tuple[Tensor, Tensor]] = None

    def _eta_for(self, layer: nn.Module) -> float:
        if self.eta is not None:
            return self.eta
        for saved, eta, _ in self._layers:
            if saved is layer:
                return eta if eta is not None else DEFAULT_ETA
        eta = getattr(layer, "allora_eta", None)
        return eta if eta is not None else DEFAULT_ETA

    # -- the math -------------------------------------------------------------------------------
    @torch.no_grad()
    def coefficients(self, layer: nn.Module) -> tuple[Tensor, Tensor]:
        """(c_A of shape r×1, c_B of shape out×1) from the layer's current lora_A, lora_B (under FSDP2: for
        the rows this rank holds). With rows="product", c_B are the paper's coefficients (rows of s·B·A)."""
        dtype = torch.float64 if layer.lora_A.dtype == torch.float64 else torch.float32
        if self.rows == "factors":
            A, B = local_rows(layer.lora_A.detach()).to(dtype), local_rows(layer.lora_B.detach()).to(dtype)
            sq_a, sq_b = A.square().sum(1), B.square().sum(1)
        else:  # the Gram needs every row of A, the mean every row of B: whole matrices
            A, B = full_tensor(layer.lora_A.detach()).to(dtype), full_tensor(layer.lora_B.detach()).to(dtype)
            sq_b = ((B @ (A @ A.T)) * B).sum(1).clamp_min(0) * layer.scaling**2
        eta = self._eta_for(layer)
        coef = lambda sq: (sq if self.norm == "squared" else sq.sqrt()).add(eta**-2).rsqrt()  # noqa: E731
        c_b = coef(sq_b)
        if self.rows == "factors":
            return coef(sq_a)[:, None], c_b[:, None]
        c_a = c_b.mean().expand(A.shape[0]).contiguous()
        return local_part(c_a, layer.lora_A)[:, None], local_part(c_b, layer.lora_B)[:, None]

    def _remember(self, coefs: list[Tensor]) -> None:
        if coefs:
            flat = torch.cat([c.flatten().float() for c in coefs])
            self._logged = (flat.mean(), flat.min())

    def _coefficients_for(self, optimizer: torch.optim.Optimizer) -> list[tuple[nn.Parameter, Tensor, dict]]:
        cache: dict[int, tuple[Tensor, Tensor]] = {}
        out = []
        for p, layer, i, group in self._targets.get(id(optimizer), []):
            if id(layer) not in cache:
                cache[id(layer)] = self.coefficients(layer)
            out.append((p, cache[id(layer)][i].to(p.dtype), group))
        self._remember([c for _, c, _ in out])
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

    # -- "gradient" mode; "backward" mode logging -------------------------------------------------
    @override
    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if self.mode == "backward":  # the step's forward passes used these weights: log their coefficients
            self._remember([self.coefficients(layer)[1] for layer, _, _ in self._layers])
        elif self.mode == "gradient":
            for p, c, _ in self._coefficients_for(getattr(optimizer, "_optimizer", optimizer)):
                if p.grad is not None:
                    local_rows(p.grad).mul_(c)

    # -- Lightning hooks ------------------------------------------------------------------------
    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._remove_hooks()
        check_not_flat_sharded(pl_module, "ALLoRARescaling")
        layers = {n: m for n, m in adapter_layers(pl_module).items() if hasattr(m, "lora_A") and hasattr(m, "lora_B")}
        if not layers:
            raise ValueError(
                f"ALLoRARescaling found no adapter layers with lora_A/lora_B in {type(pl_module).__name__}; "
                "call inject_adapters(...) on the model (or use LoRAModule) before fitting"
            )
        self._layers = [(layer, layer.allora_eta, layer.allora_norm) for layer in layers.values()]
        for layer in layers.values():  # backward: the layers apply the rule; ablations: the callback does
            layer.set_allora(self._eta_for(layer) if self.mode == "backward" else None, self.norm)
        if self.mode == "backward":
            return
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

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._logged is not None:
            mean, low = self._logged
            pl_module.log("allora/coef_mean", mean, on_step=True, on_epoch=False)
            pl_module.log("allora/coef_min", low, on_step=True, on_epoch=False)
            self._logged = None

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        for layer, eta, norm in self._layers:  # the layers' own setting, as before the fit
            layer.set_allora(eta, norm)
        self._handles, self._targets, self._pending, self._layers = [], {}, {}, []
