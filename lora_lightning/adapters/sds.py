"""SDS-LoRA: LoRA whose factor gradients do not see the factors' singular values (arXiv 2606.16454).

Sources: the claim (LoRA's factor gradients are weighted by the other factor's singular values; SDS-LoRA lets
the gradient reach the factors only through orthonormal bases) is the paper's abstract [paper]. The
parameterisation below and the warm-up/rebalance are our reading of it [reading]; the truncating refresh is
[ours]; the re-orthonormalise-only refresh is what one third-party implementation does [reading] (tags as in
../shared/METHODS.md). The paper's text available to us gives no equations or listing for any of them.

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

Two ways to refresh the bases of an active layer (the paper's text available to us gives neither; the
callback ``SDSReorthonormalization(refresh=...)`` chooses):

``refresh()`` ("truncate", [ours]): the same retraction applied to the current rank-≤2r ΔW = s·U·D: thin
QRs of U (out×2r) and Dᵀ (in×2r), SVD of the 2r×2r core, keep the top r. It changes ΔW by exactly the
truncation error ‖ΔW_before − ΔW_after‖_F = sqrt(Σ_{i>r} σ_i²), which it returns. It rewrites A and B
(re-balanced, in the SVD's order and signs), so optimiser moments of A and B no longer match their
coordinates.

``reorthonormalize()`` ([reading]: what one third-party implementation does): new bases from the current
factors, A and B untouched:

    Q_A ← orth(Aᵀ),  Q_B ← orth(B)      (thin QR with diag(R) ≥ 0, i.e. Gram–Schmidt order and signs)

so right after a rebalance (B = Q_B·diag(σ/2s) with σ ≥ 0) it returns the same bases, and later ones
that follow the factors' drift; A's and B's coordinates (and their optimiser moments) stay meaningful. ΔW
is not preserved: it changes by s·((Q_B' − Q_B)·A + B·(Q_A' − Q_A)ᵀ), whose Frobenius norm it returns.

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


@torch.no_grad()
def orthonormal_basis(m: Tensor) -> Tensor:
    """Q of the thin QR m = Q·R with diag(R) ≥ 0 (columns in Gram–Schmidt order and sign), in float32
    (float64 stays float64). A zero column of R keeps Householder's column: Q is orthonormal for any m."""
    dtype = torch.float64 if m.dtype == torch.float64 else torch.float32
    q, r = torch.linalg.qr(m.to(dtype))
    sign = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(dtype)
    return q * sign


@torch.no_grad()
def _fro_norm_of_product(up: Tensor, down: Tensor) -> Tensor:
    """‖up·down‖_F from the k×k Gram matrices (up out×k, down k×in): trace(upᵀup · down·downᵀ)."""
    return ((up.T @ up) * (down @ down.T)).sum().clamp_min(0).sqrt()


def _reread_active_flag(module: "SDSLayer", incompatible_keys) -> None:
    """Load post-hook: re-read the loaded ``sds_active`` flag (a hook must return None)."""
    module.active  # noqa: B018 - the property refreshes the cached Python-side value


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
        self.register_load_state_dict_post_hook(_reread_active_flag)

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

    @torch.no_grad()
    def reorthonormalize(self) -> Tensor:
        """Replace the bases by orthonormal bases of the current factors, Q_A ← orth(Aᵀ), Q_B ← orth(B), with A
        and B untouched (module docstring; a [reading], not the paper). Returns ‖ΔW_after − ΔW_before‖_F
        (0-dim float tensor, no device sync)."""
        self._check_unmerged("reorthonormalize")
        if not self.active:
            raise RuntimeError(
                "reorthonormalize() needs an active SDS layer: call rebalance() first (after warm-up)"
            )
        q_a, q_b = orthonormal_basis(self.lora_A.T), orthonormal_basis(self.lora_B)
        dtype = q_a.dtype
        a, b = self.lora_A.to(dtype), self.lora_B.to(dtype)
        up = torch.cat([q_b - self.Q_B.to(dtype), b], dim=1)  # ΔW_after − ΔW_before = s·up·down
        down = torch.cat([a, (q_a - self.Q_A.to(dtype)).T])
        change = abs(self.scaling) * _fro_norm_of_product(up, down)
        self.Q_A.copy_(q_a)
        self.Q_B.copy_(q_b)
        return change

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
