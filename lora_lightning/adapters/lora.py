"""LoRA and its scaling rules (LoRA, rsLoRA, LoRA-α, scale-free): one layer class, four scales.

    y = W0·x + s · B · A · dropout(x),    A ∈ R^{r×in} (kaiming-uniform, as PEFT),  B ∈ R^{out×r} (zero)

Scaling rules (``scaling_for``):

    "lora"        s = α / r                 (Hu et al. 2021)
    "rslora"      s = α / √r                (Kalajdzievski 2023, rank-stabilised)
    "lora_alpha"  s = C·√r / r = C / √r     (LoRA-α: α = C·√r, C default 256)
    "none"        s = 1                     (ALLoRA: scale-free; its per-row rule is in the backward, see
                                             ``AdapterLayer.allora_eta`` and ``functional.py``)

Gradients (G = ∂L/∂W): ∂L/∂B = s·G·Aᵀ and ∂L/∂A = s·Bᵀ·G. B = 0 at init gives ΔW = 0, so the adapted
model starts exactly at the base model.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..quantize import is_quantized
from .base import AdapterLayer

SCALING_RULES = ("lora", "rslora", "lora_alpha", "none")
INITS = ("kaiming", "gaussian")


def scaling_for(rule: str, r: int, alpha: float, C: float = 256.0) -> float:
    """The scale s of ΔW = s·B·A under a scaling rule (see module docstring)."""
    if rule == "lora":
        return alpha / r
    if rule == "rslora":
        return alpha / math.sqrt(r)
    if rule == "lora_alpha":
        return C / math.sqrt(r)
    if rule == "none":
        return 1.0
    raise ValueError(f"unknown scaling rule {rule!r}; choose one of {', '.join(SCALING_RULES)}")


class LoRALayer(AdapterLayer):
    """Low-rank adapter ΔW = s·B·A around a frozen Linear / Conv1D / Conv2d (see module docstring).

    ``init`` sets A: "kaiming" (kaiming-uniform with a=√5, PEFT's default) or "gaussian" (N(0, 1/r²),
    PEFT's "gaussian"). ``init_b_std`` > 0 draws B ~ N(0, init_b_std²) instead of zeros (for the
    loss-landscape experiments; the model then no longer starts at the base). ``dtype``: the factors' dtype
    (None = the base weight's, float32 over a 4-bit base; e.g. float32 factors over a bf16 base). ``fused``,
    ``allora_eta`` and ``allora_norm``: see ``AdapterLayer``.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        scaling: float,
        dropout: float = 0.0,
        init: str = "kaiming",
        init_b_std: float = 0.0,
        dtype: torch.dtype | None = None,
        fused: bool = True,
        allora_eta: Optional[float] = None,
        allora_norm: str = "norm",
    ) -> None:
        super().__init__(base, scaling, dropout, fused=fused, allora_eta=allora_eta, allora_norm=allora_norm)
        self.r = r
        if dtype is None:  # QLoRA: fp32 factors over a 4-bit base; otherwise the base weight's dtype
            dtype = torch.float32 if is_quantized(base.weight) else base.weight.dtype
        factory = {"device": base.weight.device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.init = init
        self.init_b_std = init_b_std
        self.reset_parameters()

    @classmethod
    def from_config(cls, base: nn.Module, config) -> "LoRALayer":
        """Build from an ``AdapterConfig`` (how ``inject_adapters`` creates every layer)."""
        return cls(
            base, config.r, config.scale, config.dropout, config.init, config.init_b_std, config.torch_dtype,
            fused=config.fused, allora_eta=config.allora_eta,
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif self.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            raise ValueError(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}")
        if self.init_b_std > 0:
            nn.init.normal_(self.lora_B, std=self.init_b_std)
        else:
            nn.init.zeros_(self.lora_B)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_A, self.lora_B

    def extra_repr(self) -> str:
        return f"r={self.r}, " + super().extra_repr()
