"""Parity with PEFT: same base, same A/B → same logits and same A/B gradients (LoRA and rsLoRA)."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import randomize_adapters, tiny_bert, tiny_gpt2, token_batch
from torch import nn

from lora_lightning import AdapterConfig, adapter_layers, inject_adapters


def _pair(model, targets, method, r=4, alpha=8):
    ours = copy.deepcopy(model)
    inject_adapters(ours, AdapterConfig(method=method, r=r, alpha=alpha, target_modules=targets, modules_to_save=[]),
                    verbose=False)
    randomize_adapters(ours)
    peft_cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                          use_rslora=method == "rslora")
    theirs = get_peft_model(copy.deepcopy(model), peft_cfg)
    pairs = []
    for name, layer in adapter_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        a, b = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
        with torch.no_grad():
            a.copy_(layer.lora_A.view(a.shape))
            b.copy_(layer.lora_B.view(b.shape))
        assert layer.scaling == pytest.approx(peft_layer.scaling["default"])
        pairs.append((layer, a, b))
    return ours, theirs, pairs


def _check(ours, theirs, pairs, run):
    y_ours, y_theirs = run(ours), run(theirs)
    torch.testing.assert_close(y_ours, y_theirs, atol=1e-5, rtol=1e-5)
    (y_ours ** 2).mean().backward()
    (y_theirs ** 2).mean().backward()
    for layer, a, b in pairs:
        torch.testing.assert_close(layer.lora_A.grad.view(a.shape), a.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(layer.lora_B.grad.view(b.shape), b.grad, atol=1e-6, rtol=1e-4)
        assert torch.count_nonzero(a.grad) > 0


@pytest.mark.parametrize("method", ["lora", "rslora"])
def test_bert_parity(method):
    batch = token_batch()
    ours, theirs, pairs = _pair(tiny_bert(), ["query", "value"], method)
    _check(ours, theirs, pairs, lambda m: m(**batch).logits)


@pytest.mark.parametrize("method", ["lora", "rslora"])
def test_gpt2_conv1d_parity(method):
    batch = token_batch()
    ours, theirs, pairs = _pair(tiny_gpt2(), ["c_attn", "c_fc"], method)
    assert all(layer.kind == "conv1d" for layer, _, _ in pairs)
    _check(ours, theirs, pairs, lambda m: m(**batch).logits)


def test_conv2d_parity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1))
    x = torch.randn(2, 3, 12, 12)
    ours, theirs, pairs = _pair(model, ["0", "2"], "lora", r=2)
    _check(ours, theirs, pairs, lambda m: m(x))
