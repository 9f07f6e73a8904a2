"""AdapterLayer: one frozen base layer plus a trainable low-rank path.

Every adapter in lora_lightning views its frozen base layer as a matrix W0 ∈ R^{out×in}
(``nn.Linear``: ``weight``; transformers ``Conv1D``: ``weightᵀ``; ``nn.Conv2d``: ``weight`` flattened to
out × (in·kh·kw)) and adds a low-rank update written as two factors

    ΔW = s · U · D,      D ∈ R^{k×in} ("down"),  U ∈ R^{out×k} ("up"),

so that   y = base(x) + s · U · D · dropout(x).

Subclasses only say what D and U are (``factors()``): plain LoRA returns (A, B) with k = r; SDS-LoRA
returns ([A; Q_Aᵀ], [Q_B, B]) with k = 2r. Everything else (forward, ``delta_weight``, ``merge``,
``unmerge``, the monitor's spectra, state I/O) is shared and uses only this interface.

Two training-time options every layer carries (``adapters/functional.py`` has the math):

- ``fused`` (default True): on Linear / Conv1D the whole layer runs as one autograd Function (``LoRAFunction``):
  the low-rank term is added into the base output in place and only the input (plus a 1-byte dropout mask)
  is kept for backward. It applies when W0 is frozen, unsharded and has no hooks of its own; otherwise, with
  ``fused=False`` and on Conv2d, the layer runs the plain path ``base(x) + s·U·D·dropout(x)`` (autograd ops).
- ``allora_eta`` (None = off): ALLoRA's backward rule (arXiv 2410.09692, §4.2, listing F): the gradient of
  the adapter output is multiplied per output row by c_i = 1/√(‖(s·U·D)_i‖ + 1/η²) before the gradients of
  D and U are formed; the input gradient is not rescaled. Method "allora" turns it on with η =
  ``AdapterConfig.eta``; it lives in the layer's backward, so any loop, accumulation, AMP, DDP and FSDP2 get it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quantize import dense_weight, dequantize
from .functional import (
    NORMS, ALLoRAConv2dFunction, LoRAFunction, allora_coefficients, apply_mask, dropout_mask, unflatten_tokens,
)

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - builds without torch.distributed
    DTensor = ()

SUPPORTED_BASE_TYPES = "nn.Linear, transformers Conv1D, nn.Conv2d (groups=1)"


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D`` (weight stored in×out), detected without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def base_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d' or 'conv2d' for a layer an adapter can wrap, else None."""
    if isinstance(module, nn.Linear):
        return "linear"
    if is_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return "conv2d"
    return None


def base_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of the matrix view W0 of a supported base layer."""
    kind = base_kind(module)
    w = module.weight
    if kind == "linear":
        return w.shape[0], w.shape[1]
    if kind == "conv1d":
        return w.shape[1], w.shape[0]
    if kind == "conv2d":
        return w.shape[0], w[0].numel()
    raise TypeError(f"{type(module).__name__} is not a supported base layer ({SUPPORTED_BASE_TYPES})")


class AdapterLayer(nn.Module):
    """Frozen ``base`` + ``s · U · D · dropout(x)``; subclasses define ``factors() -> (D, U)``."""

    #: whether ``forward`` may use a fused Function (``LoRAFunction``; DoRA: ``DoRAFunction``)
    fusable: bool = True

    def __init__(
        self,
        base: nn.Module,
        scaling: float,
        dropout: float = 0.0,
        fused: bool = True,
        allora_eta: Optional[float] = None,
        allora_norm: str = "norm",
    ) -> None:
        super().__init__()
        kind = base_kind(base)
        if kind is None:
            raise TypeError(
                f"cannot adapt a {type(base).__name__}: supported base layers are {SUPPORTED_BASE_TYPES}"
            )
        self.base = base
        self.kind = kind
        self.out_features, self.in_features = base_shape(base)
        self.scaling = float(scaling)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.merged = False
        self.fused = bool(fused)
        self.allora_eta: Optional[float] = None
        self.allora_norm = "norm"
        self.set_allora(allora_eta, allora_norm)
        for p in base.parameters():
            p.requires_grad_(False)

    def set_allora(self, eta: Optional[float], norm: str = "norm") -> None:
        """Turn ALLoRA's backward rule on (η > 0) or off (None); ``norm``: "norm" (the paper) or "squared"."""
        if eta is not None and not eta > 0:
            raise ValueError(f"ALLoRA's eta must be > 0 (got {eta}); the paper's listing uses η = 2 (η² ∈ {{1, 2, 4}})")
        if norm not in NORMS:
            raise ValueError(f"unknown ALLoRA norm {norm!r}; choose one of {', '.join(NORMS)}")
        self.allora_eta = None if eta is None else float(eta)
        self.allora_norm = norm

    # -- what a method defines ------------------------------------------------------------------
    def factors(self) -> tuple[Tensor, Tensor]:
        """(D ∈ R^{k×in}, U ∈ R^{out×k}) with ΔW = s·U·D."""
        raise NotImplementedError

    # -- shared machinery -----------------------------------------------------------------------
    def _down(self, x: Tensor, down: Tensor) -> Tensor:
        if self.kind == "conv2d":
            w = down.view(down.shape[0], *self.base.weight.shape[1:])
            return self.base._conv_forward(x, w, None)  # same stride/padding/dilation/padding_mode
        return F.linear(x, down)

    def _up(self, h: Tensor, up: Tensor) -> Tensor:
        if self.kind == "conv2d":
            return F.conv2d(h, up[:, :, None, None])
        return F.linear(h, up)

    def _dropout_p(self) -> float:
        """The dropout rate in force now (0 in eval mode or without dropout)."""
        d = self.dropout
        return d.p if d is not None and d.training and d.p > 0 else 0.0

    def allora_coefficients(self, down: Optional[Tensor] = None, up: Optional[Tensor] = None) -> Tensor:
        """ALLoRA's c (out,) from the current factors (``allora_eta`` must be set)."""
        if down is None:
            down, up = self.factors()
        return allora_coefficients(down, up, self.scaling, self.allora_eta, self.allora_norm)

    def adapter_output(self, x: Tensor) -> Tensor:
        """s · U · D · dropout(x) (the scale is applied on the k-dim intermediate, the cheapest place)."""
        down, up = self.factors()
        p = self._dropout_p()
        if self.allora_eta is not None and torch.is_grad_enabled():
            coef = self.allora_coefficients(down, up)
            if self.kind == "conv2d":
                return ALLoRAConv2dFunction.apply(apply_mask(x, dropout_mask(x, p), p) if p else x, down, up, coef,
                                                  self.scaling, self.base)
            mask = dropout_mask(x, p) if p else None
            out = LoRAFunction.apply(x, None, None, down, up, mask, coef, self.scaling, p, self.kind)
            return unflatten_tokens(out, x)
        if p:
            x = apply_mask(x, dropout_mask(x, p), p)
        if x.dtype != down.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(down.dtype)
        h = self._down(x, down)
        if self.scaling != 1.0:
            h = h * self.scaling
        return self._up(h, up)

    def output_scale(self) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(m, n) when the layer rescales its output rows by k = m/n (DoRA), else (None, None)."""
        return None, None

    def _fusable_now(self) -> bool:
        """Whether ``forward`` can run the fused Function: Linear / Conv1D with a frozen, unsharded W0 (under
        FSDP2 ``base`` is its own unit and gets gathered only by its own forward) and no hooks on ``base``."""
        if not (self.fused and self.fusable) or self.kind == "conv2d":
            return False
        base, w = self.base, self.base.weight
        if isinstance(w, DTensor) or w.requires_grad or base._forward_hooks or base._forward_pre_hooks:
            return False
        if base_kind(base) is None:  # wrapped (FSDP1)
            return False
        bias = getattr(base, "bias", None)
        return bias is None or not bias.requires_grad

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        if self._fusable_now():
            down, up = self.factors()
            p = self._dropout_p()
            mask = dropout_mask(x, p) if p else None
            coef = None
            if self.allora_eta is not None and torch.is_grad_enabled():
                coef = self.allora_coefficients(down, up)
            out = LoRAFunction.apply(x, self.base.weight, self.base.bias, down, up, mask, coef, self.scaling, p, self.kind)
            return unflatten_tokens(out, x)
        out = self.base(x)
        return out + self.adapter_output(x).to(out.dtype)

    def delta_matrix(self) -> Tensor:
        """ΔW = s·U·D as an out×in matrix (dense: for merging and tests, not for monitoring)."""
        down, up = self.factors()
        return (up @ down) * self.scaling

    def to_base_layout(self, matrix: Tensor) -> Tensor:
        """An out×in matrix in the base layer's weight layout."""
        if self.kind == "conv1d":
            return matrix.T
        return matrix.reshape(self.base.weight.shape)

    def delta_weight(self) -> Tensor:
        """ΔW in the layout of ``base.weight``, so that merged weight = base.weight + delta_weight()."""
        return self.to_base_layout(self.delta_matrix())

    @torch.no_grad()
    def merged_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The merged weight W0 + ΔW in the base layout, computed without touching the layer (what ``merge``
        would write; the base weight itself when already merged), in ``dtype`` (None: the base's compute dtype).
        A 4-bit W0 is dequantised first, straight to ``dtype``, and ΔW added there."""
        w = dequantize(self.base.weight, dtype)
        return w.detach().clone() if self.merged else w + self.delta_weight().to(w.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 ← W0 + ΔW; forward then runs the base layer alone. Idempotent."""
        if not self.merged:
            weight = dense_weight(self.base)  # a 4-bit W0 is dequantised first: ΔW would round away
            weight.add_(self.delta_weight().to(weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 ← W0 − ΔW (the inverse of ``merge``). Idempotent. A W0 that was 4-bit stays dense (the dequantised
        W0 up to float rounding): re-quantising is ``quantize_model``'s job, never a side effect."""
        if self.merged:
            self.base.weight.sub_(self.delta_weight().to(self.base.weight.dtype))
            self.merged = False

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Everything this layer adds to the base (parameters and buffers), without ``base.*``."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}

    def extra_repr(self) -> str:
        allora = f", allora_eta={self.allora_eta:g}" if self.allora_eta is not None else ""
        fused = ", fused" if self.fused and self.fusable and self.kind != "conv2d" else ""
        return f"{self.kind}, in={self.in_features}, out={self.out_features}, scaling={self.scaling:.4g}{allora}{fused}"
