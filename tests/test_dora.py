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
    """Counts matmuls/convolutions in which the given weight multiplies the given input (the base matmul), and
    records the output sizes of the other products the weight enters (DoRA's W0·Aᵀ for the row norms)."""

    OPERANDS = {aten.mm.default: (0, 1), aten.bmm.default: (0, 1), aten.addmm.default: (1, 2),
                aten.convolution.default: (0, 1)}

    def __init__(self, weight: torch.Tensor, x: torch.Tensor) -> None:
        super().__init__()
        self.ptr, self.x_ptr = weight.untyped_storage().data_ptr(), x.untyped_storage().data_ptr()
        self.count, self.other_sizes = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ptrs = [args[i].untyped_storage().data_ptr() for i in self.OPERANDS.get(func, ())
                if isinstance(args[i], torch.Tensor)]
        if self.ptr in ptrs:
            if self.x_ptr in ptrs:
                self.count += 1
            else:
                self.other_sizes.append(out.numel())
        return out


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_dora_forward_multiplies_by_the_base_weight_once(kind):
    """One base matmul over the tokens; the only other product with W0 is the out×r W0·Aᵀ of the row norms."""
    layer, x = make_layer(kind)
    layer.dropout = nn.Dropout(0.1)  # PEFT's DoRA runs the base twice when dropout is on
    layer.train()
    with CountWeightMatmuls(layer.base.weight, x) as counter:
        layer(x)
    assert counter.count == 1
    assert counter.other_sizes == [layer.out_features * layer.r]  # nothing weight-sized
    with CountWeightMatmuls(layer.base.weight, x) as counter:
        layer.base(x)
    assert counter.count == 1  # the counter does see the base op


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_dora_factored_norm_equals_the_dense_norm(kind):
    """n_i from ‖W0_i‖² (cached) + 2s·rowsum((W0·Aᵀ)⊙B) + s²·rowsum((B·(A·Aᵀ))⊙B) = ‖W0 + s·B·A‖_row to 1e-5
    relative, including an all-zero row (W0_i = 0, B_i = 0) and a large-norm row; the cache follows W0."""
    layer, _ = make_layer(kind)
    w = layer.base.weight
    with torch.no_grad():
        rows = w.T if kind == "conv1d" else w  # row i of the out×in view
        rows[0].zero_()
        layer.lora_B[0].zero_()
        rows[1].mul_(1e4)
    dense = layer._matrix(w) + layer.scaling * layer.lora_B @ layer.lora_A
    want = dense.detach().double().norm(dim=1).clamp_min(1e-12)
    got = layer.weight_norm()
    assert got.dtype == torch.float32 and got[0] == 1e-12 and want[1] > 100 * want[2:].max()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(layer.weight_norm(layer._matrix(w)).double(), want, rtol=1e-5, atol=0)
    with torch.no_grad():  # an in-place change of W0 (a load, a merge) refreshes the cached ‖W0_i‖²
        w.mul_(2.0)
    want2 = (layer._matrix(w) + layer.scaling * layer.lora_B @ layer.lora_A).detach().double().norm(dim=1)
    torch.testing.assert_close(layer.weight_norm().double(), want2.clamp_min(1e-12), rtol=1e-5, atol=0)
    layer.load_state_dict(layer.state_dict())
    assert layer._w0_sq is None  # loads clear it explicitly too


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
