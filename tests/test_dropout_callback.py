"""DropoutRemoval: adapter dropout off at fit start; the backbone's (modules, rate attributes, HF config) on request."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertForSequenceClassification

from lora_lightning import AdapterConfig, adapter_layers, inject_adapters
from lora_lightning.callbacks.dropout import DropoutRemoval


class FunctionalAttentionDropout(nn.Module):
    """Like Llama/Qwen2 attention: the rate is a float attribute used in F.dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.attention_dropout = 0.3

    def forward(self, x):
        return F.dropout(self.proj(x), p=self.attention_dropout, training=self.training)


class UserModule(L.LightningModule):
    """A plain user LightningModule: a tiny BERT + a hand-made block, adapters with dropout 0.2."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = BertConfig(
            vocab_size=100, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=12,
            max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.2,
            attn_implementation="eager",
        )
        self.bert = BertForSequenceClassification(config)
        self.block = nn.Sequential(FunctionalAttentionDropout(), DropPath(0.25))
        inject_adapters(self, AdapterConfig(r=2, dropout=0.2, target_modules=["query", "value", "proj"]), verbose=False)

    def forward(self, ids):
        h = self.bert(input_ids=ids).logits  # batch × 2
        return h.sum() + self.block(torch.ones(ids.shape[0], 8)).sum()

    def training_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.0)


def fit(module, callbacks):
    ids = torch.randint(0, 100, (4, 6), generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(
        max_steps=1, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1,
    )
    trainer.fit(module, DataLoader(TensorDataset(ids), batch_size=4))
    return ids


def deterministic(fn) -> bool:
    torch.manual_seed(1)
    a = fn()
    torch.manual_seed(2)
    return torch.equal(a, fn())


def test_include_backbone_makes_training_deterministic_and_lists_exactly_what_changed(caplog):
    module = UserModule()
    ids = fit(UserModule(), [])  # control: without the callback, train mode is stochastic
    control = UserModule().train()
    assert not deterministic(lambda: control(ids))

    adapters = [f"{n}.dropout" for n in adapter_layers(module)]
    inside_adapter = lambda n: any(n.startswith(a + ".") for a in adapter_layers(module))  # noqa: E731
    modules = [f"{n}.p" for n, m in module.named_modules() if isinstance(m, nn.Dropout) and not inside_adapter(n)]
    expected = adapters + modules + [
        "block.0.attention_dropout",
        "block.1.drop_prob",
        "bert.config.hidden_dropout_prob",
        "bert.config.attention_probs_dropout_prob",
    ]
    cb = DropoutRemoval(include_backbone=True)
    with caplog.at_level(logging.INFO, logger="lora_lightning"):
        fit(module, [cb])
    assert sorted(cb.changed) == sorted(expected)
    assert len(adapters) == 3 and len(modules) >= 4
    assert "bert.config.hidden_dropout_prob (0.3)" in caplog.text

    module.train()
    assert all(layer.dropout is None for layer in adapter_layers(module).values())
    assert all(m.p == 0 for m in module.modules() if isinstance(m, nn.Dropout))
    assert module.bert.config.hidden_dropout_prob == 0.0 and module.bert.config.attention_probs_dropout_prob == 0.0
    assert module.bert.config.classifier_dropout is None  # None is not a rate: left alone
    assert deterministic(lambda: module(ids))


def test_adapters_only_leaves_backbone_untouched():
    module = UserModule()
    before = {n: m.p for n, m in module.named_modules() if isinstance(m, nn.Dropout)}
    cb = DropoutRemoval()
    ids = fit(module, [cb])
    assert sorted(cb.changed) == sorted(f"{n}.dropout" for n in adapter_layers(module))
    after = {n: m.p for n, m in module.named_modules() if isinstance(m, nn.Dropout)}
    assert after == {n: p for n, p in before.items() if n in after} and len(after) == len(before) - 3
    assert module.bert.config.hidden_dropout_prob == 0.3 and module.block[0].attention_dropout == 0.3
    module.train()
    x = torch.randn(4, 8)
    for layer in adapter_layers(module).values():  # the adapter path is now deterministic in train mode
        assert deterministic(lambda: layer.adapter_output(x))
    assert not deterministic(lambda: module(ids))  # the backbone still drops


def test_needs_adapters_unless_backbone():
    with pytest.raises(ValueError, match="include_backbone=True"):
        DropoutRemoval().remove(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)))
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
    assert DropoutRemoval(include_backbone=True).remove(model) == ["1.p"] and model[1].p == 0.0
