"""The low-rank-teacher task: a frozen linear base W0 and a target y = (W0 + ΔW*)·x with ΔW* of exact rank k.

    W0  ∈ R^{out×in}   i.i.d. N(0, 1/in), seeded by ``seed`` (``base_weight``); the frozen layer an adapter wraps
    ΔW* = U·diag(σ)·Vᵀ  U ∈ R^{out×k}, V ∈ R^{in×k} with orthonormal columns (QR of seeded Gaussians), σ given
                        or geometric:  σ_i = σ_1 · κ^{-(i-1)/(k-1)},  i = 1..k,  so σ_1/σ_k = κ
    x   ~ N(0, I_in)    n_train / n_val samples; ``whiten=True`` makes the training inputs' second moment exactly
                        I (X·Xᵀ/n = I, needs n_train ≥ in), so the training loss is ‖ΔW − ΔW*‖_F²/out: the
                        task is then only about ΔW's conditioning, not the data's
    y   = (W0 + ΔW*)·x + noise·ε

With n_train < in (under-determined) every ΔW = ΔW*·P + N with N·X = 0 fits the training set exactly
(P = X·X⁺, the projector onto the span of the training inputs). The smallest one in Frobenius and in nuclear
norm is ΔW*·P (rank ≤ k); the others add a null-space part N of any rank and size: the two kinds of solution
of Kim, Kim & Ryu (2025). ``LowRankTeacher.min_norm_solution`` returns ΔW*·P.

``TeacherBackbone`` is the frozen base as a model (``linear`` = W0; nothing else); ``TeacherDataModule`` serves
(x, y) batches for LoRAModule with ``task: regression``. Both are seeded by ``seed``, which must agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


def base_weight(d_in: int, d_out: int, seed: int) -> Tensor:
    """W0 ∈ R^{out×in}, entries N(0, 1/in) (float32), the same for the same (d_in, d_out, seed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, d_in, generator=g) / d_in**0.5


def teacher_singular_values(rank: int, condition_number: float = 1.0, top: float = 1.0) -> Tensor:
    """σ_i = top·κ^{-(i-1)/(k-1)}: k values from ``top`` down to ``top/κ`` (all equal to ``top`` for k = 1)."""
    if condition_number < 1:
        raise ValueError(f"condition_number must be ≥ 1 (σ_1/σ_k), got {condition_number}")
    if rank == 1:
        return torch.tensor([float(top)])
    return top * torch.tensor(float(condition_number)) ** (-torch.arange(rank, dtype=torch.float64) / (rank - 1))


def _orthonormal(rows: int, cols: int, g: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # a fixed sign convention: the same Q on every platform


@dataclass
class LowRankTeacher:
    """The task's tensors (see module docstring). ``delta`` = ΔW* = U·diag(sigma)·Vᵀ (out×in)."""

    W0: Tensor
    U: Tensor
    sigma: Tensor
    V: Tensor
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor

    @property
    def delta(self) -> Tensor:
        return (self.U * self.sigma) @ self.V.T

    @property
    def rank(self) -> int:
        return int(self.sigma.numel())

    def min_norm_solution(self) -> Tensor:
        """ΔW*·P, P the projector onto the span of the training inputs: the smallest ΔW (Frobenius and nuclear
        norm) that fits the noise-free training targets; equals ΔW* when the inputs span R^in."""
        x = self.x_train.double().T  # in × n
        projector = x @ torch.linalg.pinv(x)
        return (self.delta.double() @ projector).to(self.W0.dtype)


def make_teacher(
    d_in: int = 64,
    d_out: int = 64,
    rank: int = 4,
    singular_values: Optional[Sequence[float]] = None,
    condition_number: float = 1.0,
    top_singular_value: float = 1.0,
    n_train: int = 256,
    n_val: int = 512,
    noise: float = 0.0,
    whiten: bool = False,
    seed: int = 0,
) -> LowRankTeacher:
    """Build the task (module docstring). ``singular_values`` (k values, descending, > 0) overrides
    ``rank``/``condition_number``/``top_singular_value``."""
    if singular_values is not None:
        sigma = torch.tensor([float(s) for s in singular_values], dtype=torch.float64)
        if sigma.numel() == 0 or (sigma <= 0).any() or (sigma[1:] > sigma[:-1]).any():
            raise ValueError(f"singular_values must be positive and descending, got {list(singular_values)}")
        rank = sigma.numel()
    else:
        sigma = teacher_singular_values(rank, condition_number, top_singular_value).double()
    if not 1 <= rank <= min(d_in, d_out):
        raise ValueError(f"rank must be in 1..min(d_in, d_out) = {min(d_in, d_out)}, got {rank}")
    if whiten and n_train < d_in:
        raise ValueError(f"whiten=True needs n_train ≥ d_in ({n_train} < {d_in}); set whiten: false")
    g = torch.Generator().manual_seed(seed + 1)  # W0 uses seed itself (base_weight)
    U, V = _orthonormal(d_out, rank, g), _orthonormal(d_in, rank, g)
    x_train = torch.randn(n_train, d_in, generator=g, dtype=torch.float64)
    x_val = torch.randn(n_val, d_in, generator=g, dtype=torch.float64)
    if whiten:  # X·Xᵀ/n = I exactly: x_train = √n·Q with Q (n×in) orthonormal columns
        x_train = _orthonormal(n_train, d_in, g) * n_train**0.5
    W0 = base_weight(d_in, d_out, seed).double()
    target = W0 + (U * sigma) @ V.T
    y_train = x_train @ target.T + noise * torch.randn(n_train, d_out, generator=g, dtype=torch.float64)
    y_val = x_val @ target.T + noise * torch.randn(n_val, d_out, generator=g, dtype=torch.float64)
    tensors = (W0, U, sigma, V, x_train, y_train, x_val, y_val)
    return LowRankTeacher(*(t.to(torch.float32) for t in tensors))


class TeacherBackbone(nn.Module):
    """The frozen base of the teacher task: ``linear`` (bias-free) with weight W0 = ``base_weight(d_in, d_out,
    seed)``. Adapt it with ``target_modules: [linear]`` and ``modules_to_save: []``."""

    def __init__(self, d_in: int = 64, d_out: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.d_in, self.d_out, self.seed = d_in, d_out, seed
        self.linear = nn.Linear(d_in, d_out, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(base_weight(d_in, d_out, seed))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


class TeacherDataModule(LightningDataModule):
    """(x, y) batches of ``make_teacher(...)`` (same arguments); ``batch_size`` None = the whole set per batch.

    Pair it with ``TeacherBackbone`` of the same ``d_in``, ``d_out`` and ``seed``; this is checked when training
    starts. ``num_classes`` (linked from ``model.num_classes`` by the CLI) must equal ``d_out`` if given.
    """

    def __init__(
        self,
        d_in: int = 64,
        d_out: int = 64,
        rank: int = 4,
        singular_values: Optional[list[float]] = None,
        condition_number: float = 1.0,
        top_singular_value: float = 1.0,
        n_train: int = 256,
        n_val: int = 512,
        noise: float = 0.0,
        whiten: bool = False,
        seed: int = 0,
        batch_size: Optional[int] = 32,
        num_classes: Optional[int] = None,
    ) -> None:
        super().__init__()
        if num_classes is not None and num_classes != d_out:
            raise ValueError(f"model.num_classes ({num_classes}) must equal the teacher's d_out ({d_out})")
        self.save_hyperparameters()
        self.teacher: Optional[LowRankTeacher] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.teacher is None:
            h = self.hparams
            self.teacher = make_teacher(
                h.d_in, h.d_out, h.rank, h.singular_values, h.condition_number, h.top_singular_value,
                h.n_train, h.n_val, h.noise, h.whiten, h.seed,
            )

    def _check_backbone(self) -> None:
        trainer = getattr(self, "trainer", None)
        module = trainer.lightning_module if trainer is not None else None
        for m in module.modules() if module is not None else ():
            if isinstance(m, TeacherBackbone) and (m.d_in, m.d_out, m.seed) != (
                self.hparams.d_in, self.hparams.d_out, self.hparams.seed
            ):
                raise ValueError(
                    f"TeacherBackbone(d_in={m.d_in}, d_out={m.d_out}, seed={m.seed}) does not match the "
                    f"TeacherDataModule (d_in={self.hparams.d_in}, d_out={self.hparams.d_out}, "
                    f"seed={self.hparams.seed}): "
                    "its W0 would not be the teacher's base; give both the same values"
                )

    def _loader(self, x: Tensor, y: Tensor, shuffle: bool) -> DataLoader:
        return DataLoader(TensorDataset(x, y), batch_size=self.hparams.batch_size or len(x), shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        self._check_backbone()
        return self._loader(self.teacher.x_train, self.teacher.y_train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.teacher.x_val, self.teacher.y_val, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


__all__ = [
    "LowRankTeacher",
    "TeacherBackbone",
    "TeacherDataModule",
    "base_weight",
    "make_teacher",
    "teacher_singular_values",
]
