"""AdapterLayer: one frozen base layer plus a trainable low-rank path.

Every adapter in lora_lightning views its frozen base layer as a matrix W0 ∈ R^{out×in}
(``nn.Linear``: ``weight``; transformers ``Conv1D``: ``weightᵀ``; ``nn.Conv2d``: ``weight`` flattened to
out × (in·kh·kw)) and adds a low-rank update written as two factors

    ΔW = s · U · D,      D ∈ R^{k×in} ("down"),  U ∈ R^{out×k} ("up"),

so that   y = base(x) + s · U · D · dropout(x).

Subclasses only say what D and U are (``factors()``): plain LoRA returns (A, B) with k = r; SDS-LoRA
returns ([A; Q_Aᵀ], [Q_B, B]) with k = 2r. Everything else (forward, ``delta_weight``, ``merge``,
``unmerge``, the monitor's spectra, state I/O) is shared and uses only this interface.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quantize import dense_weight

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

    def __init__(self, base: nn.Module, scaling: float, dropout: float = 0.0) -> None:
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
        for p in base.parameters():
            p.requires_grad_(False)

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

    def adapter_output(self, x: Tensor) -> Tensor:
        """s · U · D · dropout(x) (the scale is applied on the k-dim intermediate, the cheapest place)."""
        down, up = self.factors()
        if self.dropout is not None:
            x = self.dropout(x)
        if x.dtype != down.dtype and not torch.is_autocast_enabled():
            x = x.to(down.dtype)
        h = self._down(x, down)
        if self.scaling != 1.0:
            h = h * self.scaling
        return self._up(h, up)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self.merged:
            return out
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
    def merged_weight(self) -> Tensor:
        """The merged weight W0 + ΔW in the base layout and dtype, computed without touching the layer (what
        ``merge`` would write; the base weight itself when already merged)."""
        w = self.base.weight
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
        """W0 ← W0 − ΔW (the inverse of ``merge``). Idempotent."""
        if self.merged:
            self.base.weight.sub_(self.delta_weight().to(self.base.weight.dtype))
            self.merged = False

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Everything this layer adds to the base (parameters and buffers), without ``base.*``."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}

    def extra_repr(self) -> str:
        return f"{self.kind}, in={self.in_features}, out={self.out_features}, scaling={self.scaling:.4g}"
