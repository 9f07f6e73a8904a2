"""The low-rank-teacher task: ΔW* has the rank and singular values it claims, targets are exactly (W0 + ΔW*)·x,
everything is seeded; the data module and backbone agree; LoRAModule learns ΔW* with the regression task."""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_trainer

from lora_lightning import AdapterConfig, LoRAModule, adapter_layers
from lora_lightning.data.synthetic import (
    TeacherBackbone,
    TeacherDataModule,
    base_weight,
    make_teacher,
    teacher_singular_values,
)


def test_delta_has_exact_rank_and_geometric_singular_values():
    t = make_teacher(d_in=24, d_out=16, rank=5, condition_number=100.0, top_singular_value=2.0, seed=3)
    sigma = torch.linalg.svdvals(t.delta.double())
    assert t.delta.shape == (16, 24)
    assert torch.linalg.matrix_rank(t.delta.double(), rtol=1e-5).item() == 5  # float32 entries
    assert sigma[5:].max() < 1e-6  # exactly rank 5 up to float32 rounding
    expected = 2.0 * 100.0 ** (-torch.arange(5) / 4)  # 2, 0.632, 0.2, 0.0632, 0.02
    torch.testing.assert_close(sigma[:5].float(), expected.float(), rtol=1e-5, atol=1e-6)
    assert sigma[0] / sigma[4] == pytest.approx(100.0, rel=1e-4)
    # the factors are orthonormal, so ΔW* = U diag(σ) Vᵀ is its SVD
    torch.testing.assert_close(t.U.T @ t.U, torch.eye(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(t.V.T @ t.V, torch.eye(5), atol=1e-6, rtol=0)


def test_explicit_singular_values_and_their_validation():
    t = make_teacher(d_in=8, d_out=8, singular_values=[3.0, 1.0, 0.5], seed=0)
    assert t.rank == 3
    torch.testing.assert_close(torch.linalg.svdvals(t.delta)[:3], torch.tensor([3.0, 1.0, 0.5]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="descending"):
        make_teacher(d_in=8, d_out=8, singular_values=[1.0, 2.0])
    with pytest.raises(ValueError, match="min\\(d_in, d_out\\) = 4"):
        make_teacher(d_in=4, d_out=8, rank=5)
    with pytest.raises(ValueError, match="condition_number must be ≥ 1"):
        teacher_singular_values(3, condition_number=0.5)
    with pytest.raises(ValueError, match="n_train ≥ d_in"):
        make_teacher(d_in=16, d_out=8, n_train=8, whiten=True)
    assert teacher_singular_values(1, 50.0, top=0.7).tolist() == [pytest.approx(0.7)]


def test_targets_are_exactly_the_teacher_applied_to_the_inputs():
    t = make_teacher(d_in=12, d_out=10, rank=3, n_train=20, n_val=30, seed=1)
    W0 = base_weight(12, 10, seed=1)
    assert torch.equal(t.W0, W0)
    target = (W0 + t.delta).double()
    torch.testing.assert_close(t.y_train.double(), t.x_train.double() @ target.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t.y_val.double(), t.x_val.double() @ target.T, atol=1e-5, rtol=1e-5)
    noisy = make_teacher(d_in=12, d_out=10, rank=3, n_train=20, n_val=30, seed=1, noise=0.1)
    residual = noisy.y_train - noisy.x_train @ target.T.float()
    assert 0.05 < residual.std() < 0.15  # the noise is what was asked for


def test_seeded_determinism():
    a, b = make_teacher(seed=5), make_teacher(seed=5)
    for name in ("W0", "U", "sigma", "V", "x_train", "y_train", "x_val", "y_val"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    c = make_teacher(seed=6)
    assert not torch.equal(a.delta, c.delta) and not torch.equal(a.x_train, c.x_train)


def test_whitened_inputs_have_identity_second_moment():
    t = make_teacher(d_in=16, d_out=8, n_train=40, whiten=True, seed=0)
    torch.testing.assert_close(t.x_train.T @ t.x_train / 40, torch.eye(16), atol=1e-5, rtol=0)


def test_underdetermined_min_norm_solution_fits_and_is_smallest():
    t = make_teacher(d_in=32, d_out=16, rank=4, n_train=10, seed=2)
    m = t.min_norm_solution()
    x = t.x_train
    torch.testing.assert_close(x @ m.T, x @ t.delta.T, atol=1e-4, rtol=1e-4)  # fits the training targets
    assert torch.linalg.matrix_rank(m.double(), rtol=1e-5).item() == 4
    assert torch.linalg.matrix_norm(m) < torch.linalg.matrix_norm(t.delta)  # n < d_in: ΔW* itself is not minimal
    # any other interpolant ΔW*·P + N (N·X = 0) has a larger Frobenius and nuclear norm
    q = torch.linalg.qr(x.T.double(), mode="complete")[0][:, 10:]  # basis of the inputs' null space
    other = m.double() + torch.randn(16, 22, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) @ q.T
    torch.testing.assert_close(x.double() @ other.T, x.double() @ m.double().T, atol=1e-4, rtol=1e-4)
    assert torch.linalg.matrix_norm(other) > torch.linalg.matrix_norm(m.double())
    assert torch.linalg.matrix_norm(other, "nuc") > torch.linalg.matrix_norm(m.double(), "nuc")


def test_datamodule_serves_the_teacher_and_checks_the_backbone():
    dm = TeacherDataModule(d_in=8, d_out=6, rank=2, n_train=12, n_val=5, seed=4, batch_size=None, num_classes=6)
    dm.setup()
    t = make_teacher(d_in=8, d_out=6, rank=2, n_train=12, n_val=5, seed=4)
    x, y = next(iter(dm.val_dataloader()))
    assert torch.equal(x, t.x_val) and torch.equal(y, t.y_val)
    assert torch.equal(TeacherBackbone(8, 6, seed=4).linear.weight, t.W0)
    with pytest.raises(ValueError, match="must equal the teacher's d_out"):
        TeacherDataModule(d_out=6, num_classes=5)

    module = LoRAModule(TeacherBackbone(8, 6, seed=9), num_classes=6, task="regression",
                        adapter=AdapterConfig(r=2, target_modules=["linear"], modules_to_save=[]))
    with pytest.raises(ValueError, match="does not match the TeacherDataModule"):
        cpu_trainer(max_steps=1).fit(module, datamodule=dm)


def test_lora_module_learns_the_teacher_with_the_regression_task():
    dm = TeacherDataModule(d_in=16, d_out=16, rank=2, n_train=64, n_val=64, seed=0, batch_size=16, num_classes=16)
    module = LoRAModule(
        TeacherBackbone(16, 16, seed=0), num_classes=16, task="regression", lr=0.02, weight_decay=0.0, warmup=0,
        scheduler="constant", adapter=AdapterConfig(r=2, alpha=2, target_modules=["linear"], modules_to_save=[]),
        init_seed=0,
    )
    trainer = cpu_trainer(max_steps=200, limit_val_batches=1.0)
    trainer.fit(module, datamodule=dm)
    (layer,) = adapter_layers(module).values()
    delta = make_teacher(d_in=16, d_out=16, rank=2, seed=0).delta
    error = torch.linalg.matrix_norm(layer.delta_matrix().detach() - delta) / torch.linalg.matrix_norm(delta)
    assert error < 0.02  # ΔW reached ΔW* (rank 2 = r)
    assert trainer.callback_metrics["val_mse"] < 1e-3 * dm.teacher.y_val.var()
