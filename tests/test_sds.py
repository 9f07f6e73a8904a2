"""SDS-LoRA: rebalance/refresh keep the function and orthonormal bases, gradients see only the bases,
merge/export/save round trips, and the re-orthonormalisation callback on a plain LightningModule."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_lightning import AdapterConfig, adapter_layers, inject_adapters, load_adapter, save_adapter
from lora_lightning.adapters import SDSLayer, export_as_lora
from lora_lightning.callbacks.sds import RefreshSchedule, SDSReorthonormalization, sds_layers


def make_layer(kind: str, r: int = 3) -> tuple[SDSLayer, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "linear":
        base, x = nn.Linear(12, 10), torch.randn(4, 5, 12)
    elif kind == "conv1d":
        from transformers import GPT2Config, GPT2Model

        base = GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=8)).h[0].attn.c_attn
        x = torch.randn(2, 5, 16)
    else:
        base, x = nn.Conv2d(3, 6, 3, padding=1), torch.randn(2, 3, 7, 7)
    layer = SDSLayer(base, r=r, scaling=1.5)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.5)
    return layer, x


def perturb(layer: SDSLayer, seed: int, std: float = 0.3) -> None:
    """A training-like change of A and B (makes ΔW = s·(Q_B·A + B·Q_Aᵀ) rank 2r)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.add_(std * torch.randn(layer.lora_A.shape, generator=g))
        layer.lora_B.add_(std * torch.randn(layer.lora_B.shape, generator=g))


def assert_orthonormal(q: torch.Tensor) -> None:
    torch.testing.assert_close(q.T @ q, torch.eye(q.shape[1]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_rebalance_keeps_delta_and_output(kind):
    layer, x = make_layer(kind)
    y, delta = layer(x).detach(), layer.delta_matrix().detach()
    assert not layer.active and delta.abs().max() > 0.1
    layer.rebalance()
    assert layer.active and bool(layer.sds_active)
    assert_orthonormal(layer.Q_A)
    assert_orthonormal(layer.Q_B)
    with torch.no_grad():
        torch.testing.assert_close(layer.delta_matrix(), delta, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        # balanced: A = diag(σ/2s)·Q_Aᵀ and B = Q_B·diag(σ/2s) with the same σ
        a_diag, b_diag = layer.lora_A @ layer.Q_A, layer.Q_B.T @ layer.lora_B
        torch.testing.assert_close(a_diag, torch.diag(torch.diagonal(a_diag)), rtol=0, atol=1e-5)
        torch.testing.assert_close(a_diag, b_diag, rtol=1e-5, atol=1e-5)
        sigma = torch.linalg.svdvals(delta)[: layer.r]
        torch.testing.assert_close(torch.diagonal(a_diag).sort(descending=True).values, sigma / (2 * layer.scaling))


@pytest.mark.parametrize("b_rank", [0, 1])
def test_rebalance_zero_or_rank_deficient_b_has_no_nans(b_rank):
    layer, x = make_layer("linear", r=3)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(10, 1) @ torch.randn(1, 3) if b_rank else torch.zeros(10, 3))
    y, delta = layer(x).detach(), layer.delta_matrix().detach()
    layer.rebalance()
    for t in (layer.Q_A, layer.Q_B, layer.lora_A, layer.lora_B):
        assert torch.isfinite(t).all()
    assert_orthonormal(layer.Q_A)
    assert_orthonormal(layer.Q_B)
    with torch.no_grad():
        torch.testing.assert_close(layer.delta_matrix(), delta, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    if b_rank == 0:
        assert layer.lora_A.abs().max() == 0 and layer.lora_B.abs().max() == 0
    perturb(layer, seed=0)
    assert torch.isfinite(layer.refresh())
    assert_orthonormal(layer.Q_A)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_refresh_is_the_best_rank_r_retraction(kind):
    layer, x = make_layer(kind)
    layer.rebalance()
    with torch.no_grad():
        y = layer(x)
        assert layer.refresh() < 1e-5  # ΔW still rank r: nothing to truncate
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    for step in range(3):
        perturb(layer, seed=step)
        with torch.no_grad():
            delta, y = layer.delta_matrix(), layer(x)
            err = layer.refresh()
            assert_orthonormal(layer.Q_A)
            assert_orthonormal(layer.Q_B)
            change = delta - layer.delta_matrix()
            assert err > 1e-2
            torch.testing.assert_close(torch.linalg.matrix_norm(change), err, rtol=1e-4, atol=1e-5)
            # Eckart–Young: the error is the tail of ΔW's spectrum, so the top-r part was kept
            tail = torch.linalg.svdvals(delta)[layer.r :]
            torch.testing.assert_close(err, tail.norm(), rtol=1e-4, atol=1e-5)
            if kind == "linear":  # ‖(ΔW_before − ΔW_after)·x‖ ≤ ‖·‖_F ‖x‖ for every token
                gap = (y - layer(x)).norm(dim=-1)
                assert (gap <= err * x.norm(dim=-1) + 1e-5).all()


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_reorthonormalize_keeps_a_and_b_and_gives_their_orthonormal_bases(kind):
    layer, x = make_layer(kind)
    layer.rebalance()
    q_a, q_b = layer.Q_A.clone(), layer.Q_B.clone()
    with torch.no_grad():
        y = layer(x)
        assert layer.reorthonormalize() < 1e-5  # right after a rebalance the bases are already orth(Aᵀ), orth(B)
        torch.testing.assert_close(layer.Q_A, q_a, rtol=0, atol=1e-5)
        torch.testing.assert_close(layer.Q_B, q_b, rtol=0, atol=1e-5)
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    perturb(layer, seed=4)
    a, b = layer.lora_A.clone(), layer.lora_B.clone()
    with torch.no_grad():
        before = layer.delta_matrix()
        change = layer.reorthonormalize()
        torch.testing.assert_close(layer.lora_A, a, rtol=0, atol=0)  # the factors are untouched
        torch.testing.assert_close(layer.lora_B, b, rtol=0, atol=0)
        assert_orthonormal(layer.Q_A)
        assert_orthonormal(layer.Q_B)
        # Q_B spans B's columns and Q_A A's rows, in Gram–Schmidt order: Q_Bᵀ·B upper triangular, diagonal ≥ 0
        torch.testing.assert_close(layer.Q_B @ (layer.Q_B.T @ b), b, rtol=0, atol=1e-5)
        torch.testing.assert_close(a @ layer.Q_A @ layer.Q_A.T, a, rtol=0, atol=1e-5)
        for m in (layer.Q_B.T @ b, layer.Q_A.T @ a.T):
            torch.testing.assert_close(m, torch.triu(m), rtol=0, atol=1e-5)
            assert (torch.diagonal(m) >= 0).all()
        # ΔW is not preserved; the returned number is exactly how much it moved
        moved = torch.linalg.matrix_norm(layer.delta_matrix() - before)
        assert moved > 1e-2
        torch.testing.assert_close(change, moved, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.delta_matrix(),
                                   layer.scaling * (layer.Q_B @ a + b @ layer.Q_A.T), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="rebalance"):
        make_layer("linear")[0].reorthonormalize()


def test_refresh_schedules_list_their_steps():
    assert RefreshSchedule(4, refresh_every=5).steps(20) == [9, 14, 19]
    assert RefreshSchedule(4, refresh_every=0).steps(50) == []  # never
    # phased: P = 3 phases of 4 steps after warm-up 2; phase k refreshes every k steps, then every P steps
    assert RefreshSchedule(2, phases=3, phase_steps=4).steps(22) == [3, 4, 5, 6, 8, 10, 13, 16, 19, 22]
    assert RefreshSchedule(0, phases=5, phase_steps=1).steps(15) == [1, 9, 14]  # 1-step phases: then every 5th
    with pytest.raises(ValueError, match="phase_steps"):
        RefreshSchedule(2, phases=3)

    class Run:  # what _build_schedule reads of a Trainer
        estimated_stepping_batches = 60

    cb = SDSReorthonormalization(warmup_steps=10, schedule="phased", phases=5)
    assert cb._build_schedule(Run()) == RefreshSchedule(10, phases=5, phase_steps=10)  # (60 − 10)/5
    Run.estimated_stepping_batches = float("inf")
    with pytest.raises(ValueError, match="phase_steps"):
        cb._build_schedule(Run())
    every = SDSReorthonormalization(warmup_steps=3, refresh_every=7)
    assert every._build_schedule(Run()) == RefreshSchedule(3, refresh_every=7)
    assert SDSReorthonormalization(schedule="phased", phase_steps=8)._build_schedule(Run()).phase_steps == 8


def test_gradients_go_through_the_bases_only():
    """With a loss linear in the output, G = ∂L/∂W is fixed; SDS gives ∂L/∂A = s·Q_Bᵀ·G, ∂L/∂B = s·G·Q_A,
    unchanged by rescaling B's columns (or A's rows), while plain LoRA's gradients change."""
    layer, x = make_layer("linear")
    layer.rebalance()
    perturb(layer, seed=1)
    probe = torch.randn(4, 5, 10, generator=torch.Generator().manual_seed(2))
    s = layer.scaling
    G = probe.reshape(-1, 10).T @ x.reshape(-1, 12)  # ∂L/∂W for L = ⟨probe, W·x⟩

    def grads() -> tuple[torch.Tensor, torch.Tensor]:
        ga, gb = torch.autograd.grad((layer(x) * probe).sum(), (layer.lora_A, layer.lora_B))
        return ga, gb

    ga, gb = grads()
    torch.testing.assert_close(ga, s * layer.Q_B.T @ G, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb, s * G @ layer.Q_A, rtol=1e-5, atol=1e-5)
    d = torch.tensor([0.1, 3.0, 10.0])
    with torch.no_grad():
        layer.lora_B.mul_(d)  # B ← B·diag(d): same column space, other scales
        layer.lora_A.div_(d[:, None])  # A ← diag(1/d)·A
    ga2, gb2 = grads()
    torch.testing.assert_close(ga2, ga, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gb2, gb, rtol=1e-5, atol=1e-5)
    # contrast: plain LoRA (the same factors, warm-up mode) sees the scales
    layer.sds_active.fill_(False)  # the cached flag follows the buffer
    ga3, gb3 = grads()
    torch.testing.assert_close(ga3, s * layer.lora_B.T @ G, rtol=1e-5, atol=1e-5)
    assert (ga3 - ga).abs().max() > 1e-2 and (gb3 - gb).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_merge_and_export_reproduce_the_active_layer(kind):
    layer, x = make_layer(kind)
    a2, b2 = export_as_lora(layer)  # warm-up: padded to 2r
    assert a2.shape == (2 * layer.r, layer.in_features) and b2.shape == (layer.out_features, 2 * layer.r)
    torch.testing.assert_close(layer.scaling * b2 @ a2, layer.delta_matrix().detach(), rtol=1e-5, atol=1e-6)
    layer.rebalance()
    perturb(layer, seed=3)
    a2, b2 = export_as_lora(layer)
    assert a2.shape == (2 * layer.r, layer.in_features) and b2.shape == (layer.out_features, 2 * layer.r)
    with torch.no_grad():
        delta = layer.delta_matrix()
        expected = layer.scaling * (layer.Q_B @ layer.lora_A + layer.lora_B @ layer.Q_A.T)
        torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.scaling * b2 @ a2, delta, rtol=1e-5, atol=1e-6)
        w0, y = layer.base.weight.clone(), layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="unmerge"):
            layer.refresh()
        layer.unmerge()
        torch.testing.assert_close(layer.base.weight, w0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_wrong_order_is_one_clear_error():
    layer, _ = make_layer("linear")
    with pytest.raises(RuntimeError, match="rebalance"):
        layer.refresh()
    layer.rebalance()
    with pytest.raises(RuntimeError, match="refresh"):
        layer.rebalance()


def tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def test_save_load_round_trip_of_an_active_model(tmp_path):
    model = tiny_net()
    inject_adapters(model, AdapterConfig(method="sds", r=2, modules_to_save=[]), verbose=False)
    for i, layer in enumerate(adapter_layers(model).values()):
        perturb(layer, seed=i)
        layer.rebalance()
        perturb(layer, seed=10 + i)
        layer.refresh()
        perturb(layer, seed=20 + i)
    x = torch.randn(5, 6)
    y = model(x).detach()
    save_adapter(model, tmp_path)
    fresh = tiny_net()
    inject_adapters(fresh, AdapterConfig(method="sds", r=2, modules_to_save=[]), verbose=False)
    assert not any(layer.active for layer in adapter_layers(fresh).values())  # read and cached: warm-up
    fresh(x)
    load_adapter(fresh, tmp_path)  # copies into the existing buffers: the cached flag must follow
    layers = adapter_layers(fresh)
    assert all(isinstance(layer, SDSLayer) and layer.active for layer in layers.values())
    for name, layer in layers.items():
        assert {"Q_A", "Q_B", "sds_active"} <= set(layer.adapter_state_dict())
        torch.testing.assert_close(layer.Q_A, model.get_submodule(name).Q_A, rtol=0, atol=0)
    torch.testing.assert_close(fresh(x), y, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# the callback, on a plain user LightningModule


class TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_net()
        inject_adapters(self.net, AdapterConfig(method="sds", r=2, modules_to_save=[]), verbose=False)
        self.offset = nn.Parameter(torch.zeros(3))  # a non-adapter parameter: its Adam state must survive

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x) + self.offset, y)

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=0.05)


class RecordingLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append(dict(metrics))


class Probe(pl.Callback):
    """Runs after SDSReorthonormalization: what happened at each optimizer step."""

    def __init__(self) -> None:
        self.steps: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 0:  # first micro-batch under accumulation: no step yet
            return
        opt = trainer.optimizers[0]
        a = sds_layers(pl_module)[0].lora_A
        self.steps[trainer.global_step] = {
            "active": [layer.active for layer in sds_layers(pl_module)],
            "a_state_step": int(opt.state[a]["step"]) if opt.state.get(a) else None,
            "offset_step": int(opt.state[pl_module.offset]["step"]),
            "calls": list(CALLS),
        }


CALLS: list[tuple[str, float]] = []


@pytest.mark.parametrize("accumulate", [1, 2])
def test_callback_schedule_moment_reset_and_logging(monkeypatch, accumulate):
    CALLS.clear()
    rebalance, refresh = SDSLayer.rebalance, SDSLayer.refresh

    def spy_rebalance(self):
        CALLS.append(("rebalance", 0.0))
        return rebalance(self)

    def spy_refresh(self):
        err = refresh(self)
        CALLS.append(("refresh", float(err)))
        return err

    monkeypatch.setattr(SDSLayer, "rebalance", spy_rebalance)
    monkeypatch.setattr(SDSLayer, "refresh", spy_refresh)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    data = DataLoader(TensorDataset(x, torch.sin(x[:, :3] * 2) + x[:, 3:]), batch_size=8)
    logger, probe = RecordingLogger(), Probe()
    trainer = pl.Trainer(
        max_steps=15, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=1,
        accumulate_grad_batches=accumulate, callbacks=[SDSReorthonormalization(warmup_steps=4, refresh_every=5, reset_moments_on_refresh=True),
                   probe],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    module = TinyModule()
    trainer.fit(module, data)

    steps = probe.steps
    assert sorted(steps) == list(range(1, 16))
    assert steps[3]["active"] == [False, False] and steps[4]["active"] == [True, True]
    kinds = lambda step: [k for k, _ in steps[step]["calls"]]  # noqa: E731
    assert kinds(3) == [] and kinds(4) == ["rebalance"] * 2  # right after the 4th optimizer step
    assert kinds(8) == kinds(4) and kinds(9) == kinds(4) + ["refresh"] * 2
    assert kinds(13) == kinds(9) and kinds(14) == kinds(9) + ["refresh"] * 2 and kinds(15) == kinds(14)
    # Adam moments of A/B are dropped at rebalance and at each refresh; other parameters keep theirs
    assert steps[3]["a_state_step"] == 3
    assert steps[4]["a_state_step"] is None and steps[4]["offset_step"] == 4
    assert steps[5]["a_state_step"] == 1 and steps[8]["a_state_step"] == 4
    assert steps[9]["a_state_step"] is None and steps[10]["a_state_step"] == 1
    assert steps[15]["offset_step"] == 15
    # logged: max and mean of the layers' truncation errors, at the two refreshes only
    logged = [row for row in logger.rows if "sds/truncation_error" in row]
    errors = [err for k, err in CALLS if k == "refresh"]
    assert len(logged) == 2 and all(e > 0 for e in errors)
    for row, pair in zip(logged, (errors[:2], errors[2:])):
        assert row["sds/truncation_error"] == pytest.approx(max(pair), rel=1e-6)
        assert row["sds/truncation_error_mean"] == pytest.approx(sum(pair) / 2, rel=1e-6)
    for layer in sds_layers(module):
        assert_orthonormal(layer.Q_A)
        assert_orthonormal(layer.Q_B)


def test_callback_phased_reorthonormalize_keeps_the_moments(monkeypatch):
    """The [reading] options: re-orthonormalise-only refreshes on the phased schedule, Adam's moments of A and B
    cleared at the warm-up switch only (the default); the logged change is the layers' max and mean."""
    CALLS.clear()
    reorthonormalize = SDSLayer.reorthonormalize

    def spy(self):
        change = reorthonormalize(self)
        CALLS.append(("reorthonormalize", float(change)))
        return change

    monkeypatch.setattr(SDSLayer, "reorthonormalize", spy)
    monkeypatch.setattr(SDSLayer, "refresh", lambda self: pytest.fail("the truncating refresh must not run"))
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(x, torch.sin(x[:, :3] * 2) + x[:, 3:]), batch_size=8)
    logger, probe = RecordingLogger(), Probe()
    sds = SDSReorthonormalization(warmup_steps=2, refresh="reorthonormalize", schedule="phased", phases=2, phase_steps=3)
    trainer = pl.Trainer(
        max_steps=12, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=1, callbacks=[sds, probe],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(TinyModule(), data)

    steps = probe.steps
    refreshed = [t for t in range(1, 13) if len(steps[t]["calls"]) > len(steps[t - 1]["calls"] if t > 1 else [])]
    assert refreshed == [3, 4, 5, 7, 9, 11] == sds.schedule.steps(12)
    assert all(len(steps[t]["calls"]) - len(steps[t - 1]["calls"]) == 2 for t in refreshed)  # both layers
    # moments: cleared once at the rebalance (step 2), then kept through every refresh
    assert steps[1]["a_state_step"] == 1 and steps[2]["a_state_step"] is None
    assert [steps[t]["a_state_step"] for t in range(3, 13)] == list(range(1, 11))
    logged = [row for row in logger.rows if "sds/reorthonormalize_change" in row]
    changes = [c for _, c in CALLS]
    assert len(logged) == 6 and max(changes) > 0
    for row, pair in zip(logged, zip(changes[::2], changes[1::2])):
        assert row["sds/reorthonormalize_change"] == pytest.approx(max(pair), rel=1e-6)
        assert row["sds/reorthonormalize_change_mean"] == pytest.approx(sum(pair) / 2, rel=1e-6)


def test_callback_needs_sds_layers_and_valid_schedule():
    with pytest.raises(ValueError, match="refresh_every=0 disables"):
        SDSReorthonormalization(refresh_every=-1)
    with pytest.raises(ValueError, match="truncate, reorthonormalize"):
        SDSReorthonormalization(refresh="qr")
    with pytest.raises(ValueError, match="every, phased"):
        SDSReorthonormalization(schedule="cosine")
    plain = pl.LightningModule()
    plain.net = tiny_net()
    with pytest.raises(ValueError, match="method='sds'"):
        SDSReorthonormalization().on_train_start(None, plain)


def test_loading_the_flag_is_seen_also_by_compiled_graphs():
    """A load of ``sds_active`` refreshes the Python-side value that torch.compile reads (no eager forward needed)."""
    torch.manual_seed(0)
    src, dst = SDSLayer(torch.nn.Linear(6, 5), r=2, scaling=1.0), SDSLayer(torch.nn.Linear(6, 5), r=2, scaling=1.0)
    with torch.no_grad():
        src.lora_B.normal_()
    src.rebalance()
    assert src._active_value and not dst._active_value
    dst.load_state_dict(src.state_dict())
    assert dst._active_value
