"""LoRALayer math: zero-init identity, scaling rules, gradients, merge/unmerge, every base type."""

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_lightning import LoRALayer, scaling_for

torch.manual_seed(0)


def _bases():
    conv1d = Conv1D(12, 10)  # nf=12 (out), nx=10 (in); weight stored in×out
    nn.init.normal_(conv1d.weight)
    return {
        "linear": (nn.Linear(10, 12), torch.randn(3, 5, 10)),
        "conv1d": (conv1d, torch.randn(3, 5, 10)),
        "conv2d": (nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1), torch.randn(2, 4, 9, 9)),
        "conv2d_reflect": (nn.Conv2d(4, 6, 3, padding=2, dilation=2, padding_mode="reflect"), torch.randn(2, 4, 9, 9)),
    }


def _randomized(layer: LoRALayer) -> LoRALayer:
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
    return layer


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "conv2d_reflect"])
def test_zero_init_equals_base(kind):
    base, x = _bases()[kind]
    layer = LoRALayer(base, r=3, scaling=2.0)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "conv2d_reflect"])
def test_forward_equals_dense_delta_and_merge_is_exact(kind):
    base, x = _bases()[kind]
    w0 = base.weight.detach().clone()
    layer = _randomized(LoRALayer(base, r=3, scaling=1.7))
    y = layer(x)
    # The adapter path equals the base layer with weight W0 + ΔW.
    with torch.no_grad():
        base.weight.add_(layer.delta_weight())
        dense = base(x)
        base.weight.copy_(w0)
    torch.testing.assert_close(y, dense, atol=1e-5, rtol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    layer.merge()  # idempotent: merging twice must not add ΔW twice
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)


def test_delta_weight_layouts():
    for kind, (base, _) in _bases().items():
        layer = _randomized(LoRALayer(base, r=2, scaling=1.0))
        assert layer.delta_weight().shape == base.weight.shape, kind
        dense = layer.lora_B @ layer.lora_A
        if kind == "conv1d":
            torch.testing.assert_close(layer.delta_weight(), dense.T)
        else:
            torch.testing.assert_close(layer.delta_weight().reshape(dense.shape), dense)


def test_factor_gradients_match_lora_formulas():
    """∂L/∂B = s·G·Aᵀ and ∂L/∂A = s·Bᵀ·G with G = ∂L/∂W the full-weight gradient."""
    base = nn.Linear(10, 12)
    layer = _randomized(LoRALayer(base, r=4, scaling=0.75))
    x, target = torch.randn(7, 10), torch.randn(7, 12)
    nn.functional.mse_loss(layer(x), target).backward()
    w = (base.weight + layer.delta_matrix()).detach().requires_grad_(True)
    nn.functional.mse_loss(nn.functional.linear(x, w, base.bias), target).backward()
    G, s = w.grad, layer.scaling
    torch.testing.assert_close(layer.lora_B.grad, s * G @ layer.lora_A.detach().T, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad, s * layer.lora_B.detach().T @ G, atol=1e-6, rtol=1e-5)
    assert base.weight.grad is None and base.bias.grad is None


def test_scaling_rules():
    assert scaling_for("lora", 8, 16) == 2.0
    assert scaling_for("rslora", 16, 16) == 4.0
    assert scaling_for("lora_alpha", 16, 999, C=256) == 64.0  # α = C·√r → s = C/√r
    assert scaling_for("none", 8, 16) == 1.0
    with pytest.raises(ValueError, match="choose one of"):
        scaling_for("nope", 8, 16)


def test_init_matches_peft_kaiming_and_gaussian():
    layer = LoRALayer(nn.Linear(64, 32), r=8, scaling=1.0)
    bound = 1.0 / math.sqrt(64)  # kaiming_uniform(a=√5) on fan_in=in gives U(-1/√in, 1/√in)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound
    g = LoRALayer(nn.Linear(2000, 2000), r=4, scaling=1.0, init="gaussian")
    assert abs(g.lora_A.std().item() - 1 / 4) < 0.01
    b = LoRALayer(nn.Linear(2000, 2000), r=4, scaling=1.0, init_b_std=0.3)
    assert abs(b.lora_B.std().item() - 0.3) < 0.01


def test_dropout_only_on_adapter_path_in_training():
    base = nn.Linear(10, 12)
    layer = _randomized(LoRALayer(base, r=3, scaling=1.0, dropout=0.5))
    x = torch.randn(64, 10)
    layer.train()
    torch.manual_seed(0)
    y1 = layer(x)
    torch.manual_seed(1)
    y2 = layer(x)
    assert not torch.allclose(y1, y2)
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + x @ layer.delta_matrix().T)


def test_unsupported_base_is_one_clear_error():
    with pytest.raises(TypeError, match="supported base layers are"):
        LoRALayer(nn.LayerNorm(8), r=2, scaling=1.0)
    with pytest.raises(TypeError, match="groups=1"):
        LoRALayer(nn.Conv2d(4, 4, 3, groups=4), r=2, scaling=1.0)
