"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353).

The adapted weight is split into a trainable magnitude and a LoRA-adapted direction:

    W = m ⊙ (W0 + s·B·A) / n,      n = ‖W0 + s·B·A‖_row ∈ R^{out},   m ∈ R^{out} (``magnitude``),

where ‖V‖_row is the ℓ2 norm of each output row of the out×in view over all input dims (PEFT calls it
the column norm: ``(W0 + ΔW).norm(p=2, dim=1)``; for Conv2d the norm over dims 1..3 of the kernel) and
m is initialised to n, so the layer starts at W0 (at W0 + s·B·A when B ≠ 0 at init). As in the paper
(§4.3), PEFT and torchtune, n is a constant in backward (computed under no_grad).

Forward, with the base matmul done once (PEFT runs the base layer twice when dropout is on); on Linear / Conv1D
by default as one autograd Function (``DoRAFunction``, ``functional.py``: saved are x, the 1-byte dropout mask and
the pre-bias output, and ∂L/∂m_i = Σ g_i·ŷ_i/m_i from the saved output), else (``fused: false``, Conv2d) autograd ops:

    y = (m / n) ⊙ (W0·x + s·B·A·dropout(x)) + bias

Only the low-rank path sees dropout (as in LoRA). PEFT instead adds (m/n − 1)·W0·dropout(x) to base(x);
both have the same expectation and are identical when dropout = 0 or in eval mode.

Gradients (g = ∂L/∂y, n detached): ∂L/∂m_i = Σ g_i·(W0·x + s·B·A·x)_i / n_i; A and B get LoRA's
gradients with g rescaled row-wise by m/n.

The row norm without a weight-sized temporary (a PEFT proposal; our code): per forward, in fp32 (fp64 stays fp64),

    n_i² = ‖W0_i‖² + 2s·Σ_j (W0·Aᵀ)_ij·B_ij + s²·Σ_j (B·(A·Aᵀ))_ij·B_ij

with ‖W0_i‖² cached (W0 is frozen; the cache is keyed on W0's storage and version counter, so a load, merge,
unmerge or ``.to()`` refreshes it, and ``merge``/``unmerge``/loads also clear it explicitly); W0·Aᵀ is out×r, A·Aᵀ
r×r. The base matmul runs once per forward. (For a half-precision W0 the product W0·Aᵀ is taken in W0's dtype;
the dense norm of ``weight_norm(w0)``, used by merge, casts.)

QDoRA (a 4-bit W0, ``lora_lightning.quantize``): ‖W0_i‖² comes from the dequantised W0 (what the layer
computes with), cached under the key of the 4-bit codes; W0·Aᵀ and the base matmul dequantise per call (a
one-layer temporary, as the fused LoRA path does); merging dequantises W0 first (``dense_weight``).

Merge: W0 ← (m/n) ⊙ (W0 + s·B·A) with n from the unmerged W0. Unmerge inverts it from the stored n:
W0 = W·(n/m) − s·B·A; the rows where m_i = 0 (which merge zeroes) are kept aside and put back, so the
round trip is exact up to float rounding for every row. ``delta_weight()`` is merged − W0 (not s·B·A);
``factors()`` stays (A, B), the directional low-rank part only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quantize import compute_dtype, dense_weight, dequantize, is_quantized, linear_4bit, storage_key
from .functional import DoRAFunction, dropout_mask, unflatten_tokens
from .lora import LoRALayer


class DoRALayer(LoRALayer):
    """W = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row around a frozen Linear / Conv1D / Conv2d (see module docstring).

    Takes LoRALayer's arguments; adds ``magnitude`` (out,), initialised to the row norm.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._w0_sq: tuple[tuple, Tensor] | None = None  # (key of W0's storage/version, ‖W0_i‖²)
        self.magnitude = nn.Parameter(self.weight_norm().to(self.lora_A.dtype))
        self._merge_state: tuple[Tensor, Tensor, Tensor] | None = None
        self.register_load_state_dict_post_hook(lambda module, keys: module.clear_norm_cache())

    def clear_norm_cache(self) -> None:
        """Forget the cached ‖W0_i‖² (recomputed at the next forward)."""
        self._w0_sq = None

    @torch.no_grad()
    def _w0_row_sq(self, dtype: torch.dtype) -> Tensor:
        """‖W0_i‖² per output row, cached while W0's storage and version counter stay the same."""
        w = self.base.weight
        dim = 0 if self.kind == "conv1d" else tuple(range(1, w.dim()))
        if torch.compiler.is_compiling():  # no storage/version keys in a graph: the cache as it is, else compute
            if self._w0_sq is not None and self._w0_sq[1].dtype == dtype:
                return self._w0_sq[1]
            return torch.linalg.vector_norm(dequantize(w), dim=dim, dtype=dtype).square()
        key = (*storage_key(w), dtype)  # a 4-bit W0: the key of its codes, the norm of its dequantised values
        if self._w0_sq is None or self._w0_sq[0] != key:
            self._w0_sq = (key, torch.linalg.vector_norm(dequantize(w), dim=dim, dtype=dtype).square())
        return self._w0_sq[1]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "magnitude"):
            self.magnitude.copy_(self.weight_norm())

    def _matrix(self, weight: Tensor) -> Tensor:
        """A weight in the base layout as its out×in view."""
        return weight.T if self.kind == "conv1d" else weight.reshape(self.out_features, -1)

    @torch.no_grad()
    def weight_norm(self, w0: Tensor | None = None) -> Tensor:
        """n = ‖W0 + s·B·A‖ per output row, shape (out,), at least float32, detached, autocast off; clamped at 1e-12
        so that an all-zero row (m = n = 0) gives a zero output row instead of 0/0. Without ``w0``: the factored
        form of the module docstring (no out×in temporary); with ``w0`` (an out×in matrix): dense."""
        if w0 is None:
            return self._factored_norm()
        with torch.autocast(w0.device.type, enabled=False):
            w = torch.addmm(w0, self.lora_B.to(w0.dtype), self.lora_A.to(w0.dtype), alpha=self.scaling)
            dtype = torch.promote_types(w.dtype, torch.float32)  # bf16/fp16 → fp32; fp64 stays fp64
            return torch.linalg.vector_norm(w, dim=1, dtype=dtype).clamp_min(1e-12)

    @torch.no_grad()
    def _factored_norm(self) -> Tensor:
        w = self.base.weight
        dtype = torch.promote_types(compute_dtype(w), torch.float32)
        with torch.autocast(w.device.type, enabled=False):
            a, b = self.lora_A.to(dtype), self.lora_B.to(dtype)
            w = dequantize(w)  # QDoRA: a 4-bit W0 as a temporary, like the base matmul's own
            a_w = a.to(w.dtype)
            if self.kind == "conv1d":  # W0 = weightᵀ: W0·Aᵀ = (A·weight)ᵀ
                w0_at = (a_w @ w).T
            else:
                w0_at = w.reshape(w.shape[0], -1) @ a_w.T
            s = self.scaling
            sq = self._w0_row_sq(dtype) + (2 * s) * (w0_at.to(dtype) * b).sum(1) + (s * s) * ((b @ (a @ a.T)) * b).sum(1)
            return sq.clamp_min(0).sqrt().clamp_min(1e-12)

    def _base_no_bias(self, x: Tensor) -> Tensor:
        w0 = self.base.weight
        if self.kind == "linear":
            return linear_4bit(x, w0) if is_quantized(w0) else F.linear(x, w0)
        if self.kind == "conv1d":
            return x @ w0
        return self.base._conv_forward(x, w0, None)

    def output_scale(self) -> tuple[Tensor, Tensor]:
        """(m, n): the magnitude and the detached row norm of the current factors (k = m/n)."""
        return self.magnitude, self.weight_norm()

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        if self._fusable_now():  # one Function, x (+ mask) and ŷ kept: functional.py
            down, up = self.factors()
            p = self._dropout_p()
            mask = dropout_mask(x, p) if p else None
            out = DoRAFunction.apply(x, self.base.weight, self.base.bias, down, up, mask, self.magnitude,
                                     self.weight_norm(), self.scaling, p, self.kind)
            return unflatten_tokens(out, x)
        out = self._base_no_bias(x)
        out = out + self.adapter_output(x).to(out.dtype)
        norm = self.weight_norm()
        scale = (self.magnitude.to(norm.dtype) / norm).to(out.dtype)
        bias = self.base.bias
        if self.kind == "conv2d":
            scale = scale.view(-1, 1, 1)
            bias = None if bias is None else bias.view(-1, 1, 1)
        out = out * scale
        return out if bias is None else out + bias.to(out.dtype)

    @torch.no_grad()
    def _merged_matrix(self, w0: Tensor) -> Tensor:
        """(m/n) ⊙ (W0 + s·B·A) as out×in."""
        w = torch.addmm(w0, self.lora_B.to(w0.dtype), self.lora_A.to(w0.dtype), alpha=self.scaling)
        norm = self.weight_norm(w0)
        return w * (self.magnitude.to(norm.dtype) / norm).to(w.dtype)[:, None]

    @torch.no_grad()
    def _unmerged_w0(self) -> Tensor:
        """W0 as out×in; when merged, reconstructed as W·(n/m) − s·B·A plus the rows kept aside."""
        w = self._matrix(dequantize(self.base.weight))
        if not self.merged:
            return w
        norm, rows, kept = self._merge_state
        w0 = w * (norm / self.magnitude.to(norm.dtype)).to(w.dtype)[:, None]
        w0 = torch.addmm(w0, self.lora_B.to(w.dtype), self.lora_A.to(w.dtype), alpha=-self.scaling)
        w0[rows] = kept
        return w0

    def delta_matrix(self) -> Tensor:
        """Merged − W0 = (m/n) ⊙ (W0 + s·B·A) − W0 as out×in (dense; detached)."""
        w0 = self._unmerged_w0()
        return self._merged_matrix(w0) - w0

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """(m/n) ⊙ (W0 + s·B·A) in the base layout, computed without touching the layer, in ``dtype`` (None: the
        base's compute dtype; a 4-bit W0 is dequantised straight to it)."""
        if self.merged:
            return dequantize(self.base.weight, dtype).detach().clone()
        return self.to_base_layout(self._merged_matrix(self._matrix(dequantize(self.base.weight, dtype))))

    @torch.no_grad()
    def merge(self) -> None:
        """W0 ← (m/n) ⊙ (W0 + s·B·A); stores n and the rows with m = 0 so ``unmerge`` is exact. Idempotent."""
        if self.merged:
            return
        w0 = self._matrix(dense_weight(self.base))  # QDoRA: a 4-bit W0 is dequantised before merging
        rows = (self.magnitude == 0).nonzero().flatten()
        self._merge_state = (self.weight_norm(w0), rows, w0[rows].clone())
        self.base.weight.copy_(self.to_base_layout(self._merged_matrix(w0)))
        self.merged = True
        self.clear_norm_cache()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore W0 from the merged weight (the inverse of ``merge``). Idempotent."""
        if self.merged:
            self.base.weight.copy_(self.to_base_layout(self._unmerged_w0()))
            self.merged = False
            self._merge_state = None
            self.clear_norm_cache()
