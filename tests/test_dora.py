"""DoRA: parity with PEFT, dense reference formula for Linear / Conv1D / Conv2d, one base matmul, exact merge."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lora_lightning import AdapterConfig, adapter_layers, inject_adapters
from lora_lightning.adapters import DoRALayer

aten = torch.ops.aten


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=100,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )
    return BertForSequenceClassification(cfg)


def tiny_gpt2_conv1d():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    return GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=16)).h[0].attn.c_attn


def randomize(layer: DoRALayer, seed: int = 1) -> None:
    """Non-zero A, B and a magnitude away from the norm, so that every term of the formula matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(0.3 * torch.randn(layer.lora_A.shape, generator=g))
        layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=g))
        layer.magnitude.mul_(1 + 0.2 * torch.randn(layer.magnitude.shape, generator=g))


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_dora_matches_peft(arch):
    peft = pytest.importorskip("peft")
    if arch == "bert":
        base, targets, save = tiny_bert(), ["query", "value"], ["classifier"]
    else:
        from transformers import GPT2Config, GPT2ForSequenceClassification

        torch.manual_seed(0)
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=16, num_labels=3,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)
        base, targets, save = GPT2ForSequenceClassification(cfg), ["c_attn"], ["score"]
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    inject_adapters(ours, AdapterConfig(method="dora", r=4, alpha=8, target_modules=targets, modules_to_save=save),
                    verbose=False)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_dora=True, modules_to_save=save, lora_dropout=0.0,
        fan_in_fan_out=arch == "gpt2"))
    layers = adapter_layers(ours)
    assert len(layers) == (4 if arch == "bert" else 2)
    pairs = []
    for i, (name, layer) in enumerate(layers.items()):
        peft_layer = theirs.base_model.model.get_submodule(name)
        mag = peft_layer.lora_magnitude_vector["default"].weight
        torch.testing.assert_close(layer.magnitude, mag, rtol=1e-6, atol=1e-6)  # same init: ‖W0‖_row
        randomize(layer, seed=i)
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
            mag.copy_(layer.magnitude)
        pairs.append((layer, peft_layer))

    ids = torch.randint(1, 100, (3, 7), generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([0, 2, 1])
    out_ours, out_theirs = ours(input_ids=ids, labels=labels), theirs(input_ids=ids, labels=labels)
    assert out_ours.logits.abs().max() > 1e-2
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=1e-5, atol=1e-5)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    for layer, peft_layer in pairs:
        for mine, other in (
            (layer.lora_A, peft_layer.lora_A["default"].weight),
            (layer.lora_B, peft_layer.lora_B["default"].weight),
            (layer.magnitude, peft_layer.lora_magnitude_vector["default"].weight),
        ):
            assert mine.grad.abs().max() > 0
            torch.testing.assert_close(mine.grad, other.grad, rtol=1e-5, atol=1e-5)


def make_layer(kind: str) -> tuple[DoRALayer, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "linear":
        base, x = nn.Linear(12, 10), torch.randn(4, 5, 12)
    elif kind == "conv1d":
        base, x = tiny_gpt2_conv1d(), torch.randn(2, 5, 32)
    else:
        base, x = nn.Conv2d(3, 6, 3, stride=2, padding=1), torch.randn(2, 3, 9, 9)
    layer = DoRALayer(base, r=3, scaling=1.5)
    randomize(layer)
    return layer, x


def dense_reference(layer: DoRALayer, x: torch.Tensor) -> torch.Tensor:
    """W = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row (norm detached), applied with the base op."""
    base = layer.base
    w0 = base.weight.T if layer.kind == "conv1d" else base.weight.reshape(layer.out_features, -1)
    v = w0 + layer.scaling * layer.lora_B @ layer.lora_A
    w = layer.magnitude[:, None] * v / v.norm(dim=1, keepdim=True).detach()
    if layer.kind == "linear":
        return F.linear(x, w, base.bias)
    if layer.kind == "conv1d":
        return x @ w.T + base.bias
    return F.conv2d(x, w.reshape(base.weight.shape), base.bias, base.stride, base.padding)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_dora_matches_dense_formula_and_its_gradients(kind):
    layer, x = make_layer(kind)
    assert layer.kind == kind
    probe = torch.randn_like(layer(x))
    grads = []
    for fn in (layer, lambda inp: dense_reference(layer, inp)):
        y = fn(x)
        params = (layer.lora_A, layer.lora_B, layer.magnitude)
        grads.append((y, torch.autograd.grad((y * probe).sum(), params)))
    (y, g), (y_ref, g_ref) = grads
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_dora_starts_at_base_and_magnitude_is_the_row_norm(kind):
    layer, x = make_layer(kind)
    layer.reset_parameters()  # B = 0, m = ‖W0‖_row
    w0 = layer.base.weight.T if kind == "conv1d" else layer.base.weight.reshape(layer.out_features, -1)
    torch.testing.assert_close(layer.magnitude, w0.norm(dim=1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), layer.base(x), rtol=1e-5, atol=1e-6)
    assert layer.magnitude.shape == (layer.out_features,)


class CountWeightMatmuls(TorchDispatchMode):
    """Counts matmuls/convolutions in which the given weight multiplies something (not as an addend)."""

    OPERANDS = {aten.mm.default: (0, 1), aten.bmm.default: (0, 1), aten.addmm.default: (1, 2),
                aten.convolution.default: (1,)}

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.ptr, self.count = weight.untyped_storage().data_ptr(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for i in self.OPERANDS.get(func, ()):
            if isinstance(args[i], torch.Tensor) and args[i].untyped_storage().data_ptr() == self.ptr:
                self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_dora_forward_multiplies_by_the_base_weight_once(kind):
    layer, x = make_layer(kind)
    layer.dropout = nn.Dropout(0.1)  # PEFT's DoRA runs the base twice when dropout is on
    layer.train()
    with CountWeightMatmuls(layer.base.weight) as counter:
        layer(x)
    assert counter.count == 1
    with CountWeightMatmuls(layer.base.weight) as counter:
        layer.base(x)
    assert counter.count == 1  # the counter does see the base op


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_dora_merge_unmerge_exact(kind):
    layer, x = make_layer(kind)
    with torch.no_grad():
        layer.magnitude[0] = 0.0  # a row that merge zeroes must still come back
    w0 = layer.base.weight.detach().clone()
    with torch.no_grad():
        y = layer(x)
        delta = layer.delta_weight()
        layer.merge()
        assert layer.merged
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.base.weight, w0 + delta, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.delta_weight(), delta, rtol=1e-5, atol=1e-5)  # also while merged
        layer.merge()  # idempotent
        layer.unmerge()
        layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base.weight, w0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_dora_dropout_only_on_low_rank_path_in_training_and_off_in_eval():
    layer, x = make_layer("linear")
    reference = layer(x).detach()
    layer.dropout = nn.Dropout(0.5)
    layer.eval()
    torch.testing.assert_close(layer(x), reference)
    layer.train()
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    x_drop = layer.dropout(x)
    w0 = layer.base.weight
    expected = (layer.magnitude / (w0 + layer.scaling * layer.lora_B @ layer.lora_A).norm(dim=1)) * (
        x @ w0.T + layer.scaling * (x_drop @ layer.lora_A.T) @ layer.lora_B.T
    ) + layer.base.bias
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_inject_dora_registers_method_and_trains_magnitude():
    model = tiny_bert()
    cfg = AdapterConfig(method="dora", r=4, alpha=8, target_modules=["query", "value"])
    assert cfg.scaling_rule == "lora" and cfg.scale == 2.0
    inject_adapters(model, cfg, verbose=False)
    layers = adapter_layers(model)
    assert all(isinstance(layer, DoRALayer) for layer in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name in layers:
        assert {f"{name}.lora_A", f"{name}.lora_B", f"{name}.magnitude"} <= trainable
        assert f"{name}.base.weight" not in trainable


def test_dora_runs_in_float64_and_matches_the_base_at_init():
    from lora_lightning.adapters import DoRALayer

    base = torch.nn.Linear(6, 5).double()
    layer = DoRALayer(base, r=2, scaling=2.0)
    x = torch.randn(3, 6, dtype=torch.float64)
    assert layer.weight_norm().dtype == torch.float64
    torch.testing.assert_close(layer(x), base(x), rtol=1e-12, atol=1e-12)
