"""Spectra of low-rank updates, from the factors only (pure torch; used by AdapterMonitor and benchmarks).

An adapter's update is ΔW = s·U·D with U ∈ R^{out×k}, D ∈ R^{k×in} (``AdapterLayer.factors()``). With thin
QRs U = Q_U·R_U and Dᵀ = Q_D·R_D,

    ΔW = Q_U · (s·R_U·R_Dᵀ) · Q_Dᵀ,

and Q_U, Q_D have orthonormal columns, so ΔW has the singular values of the small core s·R_U·R_Dᵀ
(at most k×k). Cost O((out + in)·k²); the dense out×in matrix is never built.

From σ (descending):
    stable rank     ‖ΔW‖_F² / ‖ΔW‖_2² = Σσ² / σ_max²   (0 when ΔW = 0)
    numerical rank  #{σ > tol},  tol = rtol·σ_max, rtol = max(out, in)·eps by default
                    (``torch.linalg.matrix_rank``'s default)
    ‖ΔW‖_F = √Σσ²,  ‖ΔW‖_2 = σ_max,  ‖ΔW‖_* = Σσ (nuclear: weight decay λ on A and B acts as λ·‖ΔW‖_*
    at the balanced optimum, Kim, Kim & Ryu 2025)
    ‖A‖_F² + ‖B‖_F²  (from ``lora_A``/``lora_B``; ``factors()`` for layers without them)

Signal and drift of one optimiser step (LoRA-α reading). With the factors before (A, B) and after
(A + δA, B + δB) the step,

    ΔW_after − ΔW_before = s·(δB·A + B·δA)  +  s·δB·δA
                           └── signal ──┘     └ drift ┘

The signal is itself a product of factors, s·[δB, B]·[A; δA] (rank ≤ 2r), so both Frobenius norms come
from the same QR core as the spectrum. Defined on ``lora_A``/``lora_B`` (the LoRA family), not on
``factors()``: for SDS-LoRA the fixed bases are not trained, so the step moves only A and B.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _compute_dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def lowrank_core(up: Tensor, down: Tensor, scale: float = 1.0) -> Tensor:
    """The small matrix C = scale·R_U·R_Dᵀ whose singular values are those of scale·up·down
    (up: out×k, down: k×in). Computed in float32 at least."""
    dtype = _compute_dtype(up)
    up, down = up.detach().to(dtype), down.detach().to(dtype)
    r_up = torch.linalg.qr(up, mode="r")[1]  # min(out, k) × k
    r_down = torch.linalg.qr(down.T, mode="r")[1]  # min(in, k) × k
    return scale * (r_up @ r_down.T)


def lowrank_fro(up: Tensor, down: Tensor, scale: float = 1.0) -> float:
    """‖scale·up·down‖_F without forming the product."""
    return float(torch.linalg.matrix_norm(lowrank_core(up, down, scale)))


@torch.no_grad()
def delta_singular_values(layer: nn.Module) -> Tensor:
    """Singular values (descending) of the layer's ΔW = s·U·D, from ``factors()``; length min(k, out, in)."""
    down, up = layer.factors()
    return torch.linalg.svdvals(lowrank_core(up, down, layer.scaling))


def trained_factors(layer: nn.Module) -> tuple[Tensor, Tensor]:
    """(A, B): ``lora_A``/``lora_B`` when the layer has them, else ``factors()``."""
    if hasattr(layer, "lora_A") and hasattr(layer, "lora_B"):
        return layer.lora_A, layer.lora_B
    return layer.factors()


@torch.no_grad()
def spectrum_stats(layer: nn.Module, rtol: float | None = None, sigma: Tensor | None = None) -> dict[str, float]:
    """Stable rank, numerical rank, ‖ΔW‖_F, ‖ΔW‖_2, ‖ΔW‖_* of the layer's ΔW and ‖A‖²+‖B‖² (see module doc).

    ``rtol``: numerical-rank threshold relative to σ_max; None = max(out, in)·eps of the compute dtype
    (float32, or float64 for float64 factors).
    ``sigma``: the layer's ``delta_singular_values`` if already computed.
    """
    if sigma is None:
        sigma = delta_singular_values(layer)
    a, b = trained_factors(layer)
    if rtol is None:
        rtol = max(layer.out_features, layer.in_features) * torch.finfo(sigma.dtype).eps
    smax = float(sigma.max()) if sigma.numel() else 0.0
    sq = float((sigma**2).sum())
    return {
        "stable_rank": sq / smax**2 if smax > 0 else 0.0,
        "numerical_rank": float((sigma > rtol * smax).sum()) if smax > 0 else 0.0,
        "fro_norm": sq**0.5,
        "spectral_norm": smax,
        "nuclear_norm": float(sigma.sum()),
        "factor_sq_norm": float(a.detach().float().square().sum() + b.detach().float().square().sum()),
    }


@torch.no_grad()
def signal_drift(A0: Tensor, B0: Tensor, A1: Tensor, B1: Tensor, scale: float) -> dict[str, float]:
    """‖signal‖_F, ‖drift‖_F and drift ratio of the step (A0, B0) → (A1, B1) of ΔW = scale·B·A.

    signal = scale·(δB·A0 + B0·δA) = scale·[δB, B0]·[A0; δA],  drift = scale·δB·δA.
    drift_ratio = ‖drift‖/‖signal‖ (0 when both vanish, inf when only the signal does).
    """
    dtype = _compute_dtype(A0)
    A0, B0, A1, B1 = (t.detach().to(dtype) for t in (A0, B0, A1, B1))
    dA, dB = A1 - A0, B1 - B0
    signal = lowrank_fro(torch.cat([dB, B0], dim=1), torch.cat([A0, dA], dim=0), scale)
    drift = lowrank_fro(dB, dA, scale)
    ratio = drift / signal if signal > 0 else (0.0 if drift == 0 else float("inf"))
    return {"signal": signal, "drift": drift, "drift_ratio": ratio}
