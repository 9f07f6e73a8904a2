"""SDS-LoRA: LoRA whose factor gradients do not see the factors' singular values (arXiv 2606.16454).

Plain LoRA (ΔW = s·B·A) has ∂L/∂A = s·Bᵀ·G and ∂L/∂B = s·G·Aᵀ (G = ∂L/∂W): the gradient of each factor
is weighted by the other factor's singular values. SDS-LoRA keeps detached orthonormal bases
Q_B ∈ R^{out×r} (of B's column space) and Q_A ∈ R^{in×r} (of A's row space) as buffers and uses

    ΔW = s·(Q_B·A + B·Q_Aᵀ) = s·U·D,    U = [Q_B, B] (out×2r),  D = [A; Q_Aᵀ] (2r×in),

so ∂L/∂A = s·Q_Bᵀ·G and ∂L/∂B = s·G·Q_A: no singular value of A or B enters the gradient. The layer is a
rank-2r LoRA in this form, so forward, merge and export reuse the shared (D, U) machinery.

Warm-up: while the buffer ``sds_active`` is 0 the layer is plain LoRA, factors() = (A, B) (B = 0 at
init has no basis). ``rebalance()`` switches it on without changing ΔW:

    QR(Aᵀ) = Q_A·R_A,  QR(B) = Q_B·R_B,  SVD  s·R_B·R_Aᵀ = U·Σ·Vᵀ,
    Q_B ← Q_B·U,  Q_A ← Q_A·V,  A ← diag(σ/2s)·Q_Aᵀ,  B ← Q_B·diag(σ/2s)
    ⇒ s·(Q_B·A + B·Q_Aᵀ) = Q_B·diag(σ)·Q_Aᵀ = s·B_old·A_old.

``refresh()`` (active layers) is the same retraction applied to the current rank-≤2r ΔW = s·U·D: thin
QRs of U (out×2r) and Dᵀ (in×2r), SVD of the 2r×2r core, keep the top r. It changes ΔW by exactly the
truncation error ‖ΔW_before − ΔW_after‖_F = sqrt(Σ_{i>r} σ_i²), which it returns.

Numerics: QR/SVD run in float32 (float64 stays float64) under no_grad. Householder QR returns an
orthonormal Q even for rank-deficient or zero input (B = 0 gives σ = 0, A = B = 0 and valid bases), so no
NaNs. The signs and order of QR/SVD columns are arbitrary; they do not matter because only the products
Q_B·A and B·Q_Aᵀ enter ΔW. Across DDP ranks the factors are identical, so every rank computes the same
bases.

Hot path: the active factors are concatenated each forward (a copy of r×(in+out) values, negligible next
to the activations); this measured as fast as or faster than four separate small matmuls.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .lora import LoRALayer


@torch.no_grad()
def balanced_svd(up: Tensor, down: Tensor, scaling: float, r: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SVD of ΔW = s·up·down (up out×k, down k×in) through thin QRs and a small core SVD.

    Returns (Q_B out×r, Q_A in×r, σ top r, σ rest) with ΔW = Q_B·diag(σ)·Q_Aᵀ + (the rest)."""
    dtype = torch.float64 if up.dtype == torch.float64 else torch.float32
    q_up, r_up = torch.linalg.qr(up.to(dtype))
    q_down, r_down = torch.linalg.qr(down.T.to(dtype))
    u, sigma, vh = torch.linalg.svd(scaling * (r_up @ r_down.T))
    return q_up @ u[:, :r], q_down @ vh[:r].T, sigma[:r], sigma[r:]


class SDSLayer(LoRALayer):
    """SDS-LoRA around a frozen Linear / Conv1D / Conv2d (see module docstring). Takes LoRALayer's
    arguments; adds the persistent buffers ``Q_A`` (in×r), ``Q_B`` (out×r) and ``sds_active`` (bool)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        factory = {"device": self.lora_A.device, "dtype": self.lora_A.dtype}
        self.register_buffer("Q_A", torch.zeros(self.in_features, self.r, **factory))
        self.register_buffer("Q_B", torch.zeros(self.out_features, self.r, **factory))
        self.register_buffer("sds_active", torch.zeros((), dtype=torch.bool, device=self.lora_A.device))
        self._active_key: tuple[int, int] | None = None
        self._active_value = False
        self.register_load_state_dict_post_hook(SDSLayer._reread_active)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "sds_active"):
            self.Q_A.zero_()
            self.Q_B.zero_()
            self.sds_active.fill_(False)
            self._reread_active()

    def _reread_active(self, *_) -> None:
        """Refresh the Python-side copy of ``sds_active`` (after a load, a rebalance, a reset)."""
        self.active  # noqa: B018

    @property
    def active(self) -> bool:
        """Whether the SDS parameterisation is on. Read from the ``sds_active`` buffer, which is cached on
        the Python side and re-read (one device sync) only when the buffer was written or moved, so a load
        of the buffer is seen while forward does not sync on every call. Under torch.compile the Python value
        is used as is (a guard: a change recompiles); ``rebalance``, ``reset_parameters`` and loads refresh it."""
        if torch.compiler.is_compiling():
            return self._active_value
        flag = self.sds_active
        key = (flag.data_ptr(), flag._version) if not flag.is_inference() else None  # no version counter
        if key is None or key != self._active_key:
            self._active_value = bool(flag)
            self._active_key = key
        return self._active_value

    def factors(self) -> tuple[Tensor, Tensor]:
        if not self.active:
            return self.lora_A, self.lora_B
        return torch.cat([self.lora_A, self.Q_A.T]), torch.cat([self.Q_B, self.lora_B], dim=1)

    @torch.no_grad()
    def _install(self, q_b: Tensor, q_a: Tensor, sigma: Tensor) -> None:
        half = sigma / (2 * self.scaling)
        self.Q_B.copy_(q_b)
        self.Q_A.copy_(q_a)
        self.lora_A.copy_(half[:, None] * q_a.T)
        self.lora_B.copy_(q_b * half)

    def _check_unmerged(self, what: str) -> None:
        if self.merged:
            raise RuntimeError(f"{what}() changes the factors of a merged layer; call unmerge() first")

    @torch.no_grad()
    def rebalance(self) -> None:
        """Switch plain LoRA to SDS with ΔW unchanged (module docstring). Resetting the optimiser moments of
        A and B is the caller's job (``SDSReorthonormalization`` does it)."""
        self._check_unmerged("rebalance")
        if self.active:
            raise RuntimeError("rebalance() is for a layer in plain-LoRA warm-up; this one is active: use refresh()")
        q_b, q_a, sigma, _ = balanced_svd(self.lora_B, self.lora_A, self.scaling, self.r)
        self._install(q_b, q_a, sigma)
        self.sds_active.fill_(True)
        self._reread_active()  # compiled graphs read the Python-side value

    @torch.no_grad()
    def refresh(self) -> Tensor:
        """Re-orthonormalise an active layer from its rank-≤2r ΔW, keeping the top r directions. Returns the
        truncation error ‖ΔW_before − ΔW_after‖_F (0-dim float tensor, no device sync)."""
        self._check_unmerged("refresh")
        if not self.active:
            raise RuntimeError("refresh() needs an active SDS layer: call rebalance() first (after warm-up)")
        down, up = self.factors()
        q_b, q_a, sigma, rest = balanced_svd(up, down, self.scaling, self.r)
        self._install(q_b, q_a, sigma)
        return torch.linalg.vector_norm(rest)

    def extra_repr(self) -> str:
        return f"active={self.active}, " + super().extra_repr()


@torch.no_grad()
def export_as_lora(layer: SDSLayer) -> tuple[Tensor, Tensor]:
    """(A2 2r×in, B2 out×2r) with s·B2·A2 = ΔW: [A; Q_Aᵀ] and [Q_B, B] when active, [A; 0] and [B, 0]
    during warm-up (so the exported rank is always 2r)."""
    down, up = layer.factors()
    if not layer.active:
        down = torch.cat([down, torch.zeros_like(down)])
        up = torch.cat([up, torch.zeros_like(up)], dim=1)
    return down.detach().clone(), up.detach().clone()
