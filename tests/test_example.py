"""examples/own_module.py: a user's own LightningModule (own model, label-smoothed loss, own optimiser) with
adapters injected by hand and lora_lightning's callbacks; it learns, and its adapter file reloads exactly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lora_lightning import load_adapter
from lora_lightning.callbacks import AdapterMonitor

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_module.py"


@pytest.fixture
def example():
    spec = importlib.util.spec_from_file_location("own_module", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest on a shared machine
    yield mod
    torch.set_num_threads(threads)


def test_own_module_example_learns_and_its_adapter_reloads_exactly(example, tmp_path):
    module, trainer, adapters = example.main(["--steps", "60", "--out", str(tmp_path)])

    losses = torch.tensor(module.train_losses)
    assert len(losses) == 60
    assert losses[-10:].mean() < losses[:10].mean() - 0.1  # 0.70 -> 0.42 measured
    assert float(trainer.callback_metrics["val_acc"]) > 0.75  # 0.91 measured; chance 0.5
    coef = float(trainer.callback_metrics["allora/coef_mean"])  # the layers' ALLoRA coefficients, logged
    assert 0 < coef < 2.0  # η = 2 at zero rows; rows grew, so their gradient scale shrank
    monitor = next(cb for cb in trainer.callbacks if isinstance(cb, AdapterMonitor))
    assert len(monitor.last_stats) == len(module.report.adapted) == 13  # 2 × 6 Linear + the pooler
    assert all(s["stable_rank"] >= 1 for s in monitor.last_stats.values())

    # AdapterCheckpoint: best/ (val_acc) and last/ (= the final weights) into a fresh copy of the base model
    assert (adapters / "best" / "adapter_model.safetensors").is_file()
    fresh = example.build_model(seed=0)
    load_adapter(fresh, adapters / "last")
    batch = torch.utils.data.default_collate(example.make_data(8, seed=3))
    module.eval()
    fresh.eval()
    with torch.no_grad():
        want = module(batch)
        got = fresh(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        base = example.build_model(seed=0).eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (base.logits - want).abs().max() > 1e-2  # the adapter carries what was learned
