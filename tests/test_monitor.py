"""spectra (ΔW singular values, ranks, norms, signal/drift from factors) and the AdapterMonitor callback."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers.pytorch_utils import Conv1D

from lora_lightning import AdapterConfig, AdapterLayer, LoRALayer, adapter_layers, inject_adapters
from lora_lightning.callbacks.monitor import AdapterMonitor
from lora_lightning.spectra import delta_singular_values, signal_drift, spectrum_stats

BASES = {
    "linear": lambda: nn.Linear(20, 12),
    "conv1d": lambda: Conv1D(12, 20),  # in=20 → out=12, weight stored in×out
    "conv2d": lambda: nn.Conv2d(3, 6, 3),  # out=6, in=3·3·3=27
}


def random_layer(kind: str, r: int, rank: int | None = None, scale: float = 0.7, seed: int = 0) -> LoRALayer:
    """A LoRA layer with random A and non-zero B; B has rank ``rank`` (< r: ΔW rank-deficient)."""
    g = torch.Generator().manual_seed(seed)
    layer = LoRALayer(BASES[kind](), r=r, scaling=scale)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
        k = rank or r
        b = torch.randn(layer.out_features, k, generator=g) @ torch.randn(k, r, generator=g)
        layer.lora_B.copy_(b)
    return layer


def dense(layer: AdapterLayer) -> torch.Tensor:
    return layer.delta_matrix().detach().double()


@pytest.mark.parametrize("kind", list(BASES))
@pytest.mark.parametrize("r,rank", [(1, None), (4, None), (5, 2), (6, 1)])
def test_singular_values_and_stats_match_dense(kind, r, rank):
    layer = random_layer(kind, r, rank)
    W = dense(layer)
    ref = torch.linalg.svdvals(W)
    sigma = delta_singular_values(layer).double()
    assert sigma.shape == (min(r, *W.shape),)
    torch.testing.assert_close(sigma, ref[: sigma.numel()], rtol=0, atol=1e-5 * ref[0].item())
    assert torch.all(ref[sigma.numel() :] < 1e-5 * ref[0])  # the rest of the dense spectrum is zero

    stats = spectrum_stats(layer)
    fro, spec = torch.linalg.matrix_norm(W).item(), torch.linalg.matrix_norm(W, ord=2).item()
    assert stats["fro_norm"] == pytest.approx(fro, rel=1e-5)
    assert stats["spectral_norm"] == pytest.approx(spec, rel=1e-5)
    assert stats["nuclear_norm"] == pytest.approx(torch.linalg.matrix_norm(W, ord="nuc").item(), rel=1e-5)
    assert stats["stable_rank"] == pytest.approx(fro**2 / spec**2, rel=1e-5)
    # numerical rank: the designed rank, and torch.linalg.matrix_rank's answer on the float32 dense ΔW
    assert stats["numerical_rank"] == (rank or r) == torch.linalg.matrix_rank(layer.delta_matrix().detach()).item()
    sq = layer.lora_A.detach().double().square().sum() + layer.lora_B.detach().double().square().sum()
    assert stats["factor_sq_norm"] == pytest.approx(sq.item(), rel=1e-6)


def test_numerical_rank_tolerance_is_relative():
    layer = random_layer("linear", r=4)
    sigma = delta_singular_values(layer)
    rtol = float((sigma[1] + sigma[2]) / 2 / sigma[0])  # between σ_2 and σ_3 (relative to σ_max)
    assert spectrum_stats(layer, rtol=rtol)["numerical_rank"] == 2
    assert torch.linalg.matrix_rank(dense(layer), rtol=rtol).item() == 2


def test_zero_delta():
    layer = LoRALayer(nn.Linear(20, 12), r=4, scaling=2.0)  # B = 0
    stats = spectrum_stats(layer)
    assert stats["stable_rank"] == stats["numerical_rank"] == stats["fro_norm"] == stats["nuclear_norm"] == 0.0
    assert stats["factor_sq_norm"] == pytest.approx(layer.lora_A.detach().square().sum().item(), rel=1e-6)


class TwoSided(AdapterLayer):
    """factors() with k = 2r > out, like SDS-LoRA's [A; Q_Aᵀ], [Q_B, B]: the spectrum uses factors()."""

    def __init__(self, base, r):
        super().__init__(base, scaling=0.5)
        g = torch.Generator().manual_seed(3)
        self.down = nn.Parameter(torch.randn(2 * r, self.in_features, generator=g))
        self.up = nn.Parameter(torch.randn(self.out_features, 2 * r, generator=g))

    def factors(self):
        return self.down, self.up


def test_spectrum_uses_factors_for_other_layers():
    layer = TwoSided(nn.Conv2d(3, 6, 3), r=4)  # k = 8 > out = 6
    ref = torch.linalg.svdvals(dense(layer))
    sigma = delta_singular_values(layer).double()
    torch.testing.assert_close(sigma, ref, rtol=0, atol=1e-5 * ref[0].item())


@pytest.mark.parametrize("step", [1e-3, 1.0])
def test_signal_drift_match_dense(step):
    layer = random_layer("conv1d", r=3)
    g = torch.Generator().manual_seed(5)
    A0, B0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    A1 = A0 + step * torch.randn(A0.shape, generator=g)
    B1 = B0 + step * torch.randn(B0.shape, generator=g)
    s = layer.scaling
    signal = s * ((B1 - B0) @ A0 + B0 @ (A1 - A0))
    drift = s * (B1 - B0) @ (A1 - A0)
    torch.testing.assert_close(signal + drift, s * (B1 @ A1 - B0 @ A0), rtol=1e-5, atol=1e-5)  # the decomposition
    out = signal_drift(A0, B0, A1, B1, s)
    assert out["signal"] == pytest.approx(torch.linalg.matrix_norm(signal.double()).item(), rel=1e-5)
    assert out["drift"] == pytest.approx(torch.linalg.matrix_norm(drift.double()).item(), rel=1e-5)
    assert out["drift_ratio"] == pytest.approx(out["drift"] / out["signal"], rel=1e-12)
    assert signal_drift(A0, B0, A0, B0, s) == {"signal": 0.0, "drift": 0.0, "drift_ratio": 0.0}


# -- the callback on a plain user LightningModule ------------------------------------------------------------


class RecordingLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append({**metrics, "_step": step})

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class UserModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3))
        inject_adapters(self.net, AdapterConfig(r=2, alpha=4.0, init_b_std=0.2), verbose=False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.05)


class Snapshots(L.Callback):
    """Test helper: the factors at the start of each batch (= before that batch's optimiser step)."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before[trainer.global_step + 1] = {
            n: (l.lora_A.detach().clone(), l.lora_B.detach().clone()) for n, l in adapter_layers(pl_module).items()
        }


def run_monitor(monitor: AdapterMonitor, steps: int = 6, accumulate: int = 1):
    g = torch.Generator().manual_seed(1)
    data = DataLoader(TensorDataset(torch.randn(32, 6, generator=g), torch.randn(32, 3, generator=g)), batch_size=4)
    module, logger, snaps = UserModule(), RecordingLogger(), Snapshots()
    trainer = L.Trainer(
        max_steps=steps, accumulate_grad_batches=accumulate, callbacks=[monitor, snaps], logger=logger,
        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", devices=1,
    )
    trainer.fit(module, data)
    return module, logger, snaps


STATS = ("stable_rank", "numerical_rank", "fro_norm", "spectral_norm", "nuclear_norm", "factor_sq_norm")
SIGNAL = ("signal", "drift", "drift_ratio")


def test_monitor_logs_expected_keys_and_values():
    monitor = AdapterMonitor(every_n_steps=2, signal_drift_every=3)
    module, logger, snaps = run_monitor(monitor, steps=6)
    layers = adapter_layers(module)
    assert list(layers) == ["net.0", "net.2"]
    by_step = {row.pop("_step"): row for row in logger.rows}
    assert sorted(by_step) == [2, 3, 4, 6]  # every_n_steps=2 and signal_drift_every=3; nothing in between
    def keys(names):
        per_layer = {f"monitor/{l}/{k}" for l in layers for k in names}
        return per_layer | {f"monitor/{k}_{agg}" for k in names for agg in ("mean", "max")}

    assert set(by_step[2]) == set(by_step[4]) == keys(STATS)
    assert set(by_step[3]) == keys(SIGNAL)
    assert set(by_step[6]) == keys(STATS + SIGNAL)

    last = by_step[6]
    for name, layer in layers.items():  # values at the last step, against dense computations
        W = dense(layer)
        fro, spec = torch.linalg.matrix_norm(W).item(), torch.linalg.matrix_norm(W, ord=2).item()
        assert last[f"monitor/{name}/fro_norm"] == pytest.approx(fro, rel=1e-5)
        assert last[f"monitor/{name}/stable_rank"] == pytest.approx(fro**2 / spec**2, rel=1e-5)
        assert last[f"monitor/{name}/numerical_rank"] == 2
        A0, B0 = (t.double() for t in snaps.before[6][name])
        A1, B1 = layer.lora_A.detach().double(), layer.lora_B.detach().double()
        s = layer.scaling
        signal = torch.linalg.matrix_norm(s * ((B1 - B0) @ A0 + B0 @ (A1 - A0))).item()
        drift = torch.linalg.matrix_norm(s * (B1 - B0) @ (A1 - A0)).item()
        assert signal > 0 and drift > 0
        assert last[f"monitor/{name}/signal"] == pytest.approx(signal, rel=1e-4)
        assert last[f"monitor/{name}/drift"] == pytest.approx(drift, rel=1e-4)
        assert monitor.last_stats[name]["signal"] == pytest.approx(signal, rel=1e-4)
        sigma = monitor.last_singular_values[name].double()
        torch.testing.assert_close(sigma, torch.linalg.svdvals(W)[:2], rtol=1e-5, atol=0)
    values = [last[f"monitor/{n}/nuclear_norm"] for n in layers]
    assert last["monitor/nuclear_norm_mean"] == pytest.approx(sum(values) / 2)
    assert last["monitor/nuclear_norm_max"] == pytest.approx(max(values))


def test_monitor_aggregates_only_with_accumulation_and_bad_input():
    _, logger, _ = run_monitor(AdapterMonitor(every_n_steps=2, per_layer=False), steps=4, accumulate=2)
    assert [row["_step"] for row in logger.rows] == [2, 4]  # once per optimiser step, not per micro-batch
    for row in logger.rows:
        assert set(row) - {"_step"} == {f"monitor/{k}_{agg}" for k in STATS + SIGNAL for agg in ("mean", "max")}
        assert row["monitor/signal_max"] > 0
    with pytest.raises(ValueError, match="positive integer"):
        AdapterMonitor(every_n_steps=0)
    zero_a, zero_b = torch.zeros(1, 2), torch.zeros(2, 1)  # A = B = 0: a step has no signal, only drift
    assert math.isinf(signal_drift(zero_a, zero_b, zero_a + 1, zero_b + 1, 1.0)["drift_ratio"])
