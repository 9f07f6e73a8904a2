"""The fused adapter path (one autograd Function per layer, one per gated MLP) against the plain autograd path:
equal outputs and gradients for every LoRA-family method in the registry, and what it keeps for backward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.pytorch_utils import Conv1D

from lora_lightning import AdapterConfig, adapter_layers, inject_adapters
from lora_lightning.adapters import ADAPTER_METHODS
from lora_lightning.adapters.gated_mlp import is_patched, unpatch_gated_mlps

FUSED_METHODS = sorted(name for name, m in ADAPTER_METHODS.items() if m.layer.fusable)
PRECISIONS = ["fp32", "bf16"]


def test_the_fused_family_is_the_lora_family():
    assert FUSED_METHODS == ["allora", "dora", "lora", "lora_alpha", "rslora", "sds"]


def _randomize(model: nn.Module, method: str, p: float, seed: int = 0) -> None:
    """Non-zero B (SDS: then switched to its bases), and dropout p on every adapter (ALLoRA's config refuses
    dropout; the layer supports it: the paper's ALLoRA+D)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.copy_(0.2 * torch.randn(layer.lora_B.shape, generator=g))
            if method == "sds":
                layer.rebalance()
            if method == "dora":  # m ≠ n, so that m/n and ∂L/∂m are not trivial
                layer.magnitude.mul_(1 + 0.3 * torch.randn(layer.magnitude.shape, generator=g))
            layer.dropout = nn.Dropout(p) if p else None


def _pair(model: nn.Module, method: str, p: float, **config) -> tuple[nn.Module, nn.Module]:
    """(fused, plain) copies of ``model`` with the same adapters."""
    fused, plain = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(1)
    inject_adapters(fused, AdapterConfig(method=method, r=4, **config), verbose=False)
    torch.manual_seed(1)
    inject_adapters(plain, AdapterConfig(method=method, r=4, fused=False, **config), verbose=False)
    for m in (fused, plain):
        _randomize(m, method, p)
        m.train()
    return fused, plain


def _run(model: nn.Module, x: torch.Tensor, probe: torch.Tensor, precision: str):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(7)  # the same dropout masks on both paths
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        y = model(x)
    (y.float() * probe).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return y.float(), x.grad, grads


def _assert_same(fused, plain, precision: str) -> None:
    """Outputs and gradients equal: normwise relative error ‖a − b‖/‖b‖ ≤ 1e-6 in fp32 (summation order differs
    between the paths), ≤ 2e-2 under bf16 autocast (bf16 rounding of the intermediates)."""
    (y_f, dx_f, g_f), (y_p, dx_p, g_p) = fused, plain
    assert g_f.keys() == g_p.keys() and g_f
    tol = 1e-6 if precision == "fp32" else 2e-2
    for name, a, b in [("y", y_f, y_p), ("x", dx_f, dx_p), *((k, g_f[k], g_p[k]) for k in g_p)]:
        assert a.dtype == b.dtype and a.shape == b.shape, name
        err = ((a.double() - b.double()).norm() / b.double().norm()).item()
        assert b.abs().max() > 0 and err <= tol, f"{name}: relative error {err:.2e} > {tol:g}"


def _layer_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Sequential(nn.Linear(16, 12))
    conv = Conv1D(12, 16)  # nf = out, nx = in; weight in × out
    nn.init.normal_(conv.weight, std=0.3)
    nn.init.normal_(conv.bias)
    return nn.Sequential(conv)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("method", FUSED_METHODS)
def test_fused_layer_equals_the_plain_path(method, kind, p, precision):
    fused, plain = _pair(_layer_model(kind), method, p, target_modules=["0"])
    assert fused[0]._fusable_now() and not plain[0]._fusable_now()
    g = torch.Generator().manual_seed(3)
    x, probe = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 12, generator=g)
    _assert_same(_run(fused, x, probe, precision), _run(plain, x, probe, precision), precision)
    assert fused[0].base.weight.grad is None and fused[0].base.bias.grad is None  # W0 frozen: no gradient
    for m in (fused, plain):  # merged: the base layer alone on both paths, same input gradients
        m[0].merge()
        m.zero_grad()
    y_f, dx_f, _ = _run(fused, x, probe, "fp32")
    y_p, dx_p, _ = _run(plain, x, probe, "fp32")
    _assert_same((y_f, dx_f, {"-": y_f}), (y_p, dx_p, {"-": y_p}), "fp32")


def _mlp(bias: bool = False) -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2, hidden_act="silu", mlp_bias=bias)
    return nn.Sequential(LlamaMLP(config))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("method", FUSED_METHODS)
def test_fused_gated_mlp_equals_the_plain_path(method, p, precision):
    fused, plain = _pair(_mlp(), method, p)
    assert is_patched(fused[0]) and not is_patched(plain[0])
    g = torch.Generator().manual_seed(3)
    x, probe = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    _assert_same(_run(fused, x, probe, precision), _run(plain, x, probe, precision), precision)


def test_fused_gated_mlp_with_bias_gelu_and_fallbacks():
    """Any activation (GELU-tanh: differentiated by autograd), biases; merged layers and hooks fall back to the
    module's own forward; a module whose formula differs is not patched."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2, hidden_act="gelu_pytorch_tanh",
                         mlp_bias=True)
    fused, plain = _pair(nn.Sequential(LlamaMLP(config)), "lora", 0.1)
    assert is_patched(fused[0])
    g = torch.Generator().manual_seed(3)
    x, probe = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    _assert_same(_run(fused, x, probe, "fp32"), _run(plain, x, probe, "fp32"), "fp32")
    calls = []
    fused[0].up_proj.register_forward_hook(lambda *a: calls.append(1))  # a hook on a projection must still run
    fused.zero_grad()
    plain.zero_grad()
    _assert_same(_run(fused, x, probe, "fp32"), _run(plain, x, probe, "fp32"), "fp32")
    assert calls == [1]
    assert unpatch_gated_mlps(fused) == 1 and not is_patched(fused[0])

    class SwappedMLP(LlamaMLP):  # same attribute names, another formula
        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)) * self.gate_proj(x))

    report = inject_adapters(nn.Sequential(SwappedMLP(config)), AdapterConfig(r=2, init_b_std=0.1), verbose=False)
    assert report.fused_mlps == []
    report = inject_adapters(_mlp(), AdapterConfig(r=2, fused_mlp=False), verbose=False)
    assert report.fused_mlps == []


class SavedTensors(torch.autograd.graph.saved_tensors_hooks):
    """Records the tensors autograd keeps for backward, leaving out the model's parameters (kept by reference)."""

    def __init__(self, model: nn.Module) -> None:
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.saved: list[torch.Tensor] = []

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                self.saved.append(t)
            return t

        super().__init__(pack, lambda t: t)

    @property
    def nbytes(self) -> int:
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.saved}.values())


def test_fused_layer_keeps_the_input_and_a_one_byte_mask():
    fused, plain = _pair(_layer_model("linear"), "lora", 0.1, target_modules=["0"])
    x = torch.randn(4, 64, 16, requires_grad=True)
    with (kept := SavedTensors(fused)):
        fused(x)
    assert sorted((str(t.dtype), tuple(t.shape)) for t in kept.saved) == [
        ("torch.bool", (4, 64, 16)), ("torch.float32", (4, 64, 16))
    ]
    assert any(t is x for t in kept.saved)  # the input itself, not a copy
    assert kept.nbytes == x.numel() * 5  # 4 bytes of input + 1 byte of mask per element, nothing weight-sized
    with (kept_plain := SavedTensors(plain)):
        plain(x)
    assert kept_plain.nbytes > 1.7 * kept.nbytes  # the plain path also keeps the dropped-out copy of x, ...


def test_fused_gated_mlp_keeps_its_input_and_the_gate_and_up_outputs():
    fused, plain = _pair(_mlp(), "lora", 0.0)
    x = torch.randn(4, 64, 16, requires_grad=True)
    with (kept := SavedTensors(fused)):
        fused(x)
    tokens, inter = 4 * 64, 24
    assert sorted(tuple(t.shape) for t in kept.saved) == [(4, 64, 16), (tokens, inter), (tokens, inter)]
    assert kept.nbytes == 4 * (x.numel() + 2 * tokens * inter)
    with (kept_plain := SavedTensors(plain)):
        plain(x)
    # layer by layer: also act(e), the product and the r-sized adapter intermediates
    assert kept_plain.nbytes >= kept.nbytes + 4 * 2 * tokens * inter


def test_fused_dora_layer_keeps_the_input_the_mask_and_its_own_output():
    """DoRA's Function keeps x, the 1-byte mask and ŷ, which is the layer's output itself (no bias): nothing
    weight-sized, and no second out-sized tensor (PEFT and the plain path keep W0·x and more)."""
    fused, plain = _pair(nn.Sequential(nn.Linear(16, 12, bias=False)), "dora", 0.1, target_modules=["0"])
    x = torch.randn(4, 64, 16, requires_grad=True)
    with (kept := SavedTensors(fused)):
        y = fused(x)
    assert sorted((str(t.dtype), tuple(t.shape)) for t in kept.saved) == [
        ("torch.bool", (4, 64, 16)), ("torch.float32", (4, 64, 16)), ("torch.float32", (12,)),
        ("torch.float32", (256, 12)),
    ]  # mask, x, the row norm n, ŷ
    assert any(t is x for t in kept.saved)
    out = next(t for t in kept.saved if tuple(t.shape) == (256, 12))
    assert out.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()  # ŷ = the output, by reference
    assert kept.nbytes == x.numel() * 5 + 4 * (y.numel() + 12)
    with (kept_plain := SavedTensors(plain)):
        plain(x)
    assert kept_plain.nbytes > kept.nbytes + 4 * x.numel()


def test_fused_dora_gated_mlp_keeps_what_the_lora_block_keeps_plus_its_output():
    fused, _ = _pair(_mlp(), "dora", 0.0)
    assert is_patched(fused[0])
    x = torch.randn(4, 64, 16, requires_grad=True)
    with (kept := SavedTensors(fused)):
        y = fused(x)
    tokens, inter = 4 * 64, 24
    assert kept.nbytes == 4 * (x.numel() + 2 * tokens * inter + y.numel() + 2 * inter + 16)  # x, e, u, y; 3 norms


def test_fused_dora_zero_magnitude_row_has_zero_output_and_finite_gradients():
    """[ours] m_i = 0 exactly: the row's output is b_i on both paths; the fused path gives ∂L/∂m_i = 0 there
    (module docstring of functional.py), every other gradient equals the plain path's."""
    fused, plain = _pair(_layer_model("linear"), "dora", 0.0, target_modules=["0"])
    for m in (fused, plain):
        with torch.no_grad():
            m[0].magnitude[3] = 0.0
    g = torch.Generator().manual_seed(3)
    x, probe = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 12, generator=g)
    (y_f, dx_f, g_f), (y_p, dx_p, g_p) = _run(fused, x, probe, "fp32"), _run(plain, x, probe, "fp32")
    torch.testing.assert_close(y_f, y_p, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y_f[..., 3], fused[0].base.bias[3].expand(2, 5).detach())
    torch.testing.assert_close(dx_f, dx_p, rtol=1e-6, atol=1e-6)
    mag = "0.magnitude"
    assert g_f[mag][3] == 0 and g_p[mag][3] != 0
    keep = torch.arange(12) != 3
    torch.testing.assert_close(g_f[mag][keep], g_p[mag][keep], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", FUSED_METHODS)
def test_fused_layer_output_can_be_modified_in_place(method):
    """An in-place op on the layer's output (torchvision's VGG / AlexNet classifiers: Linear → ReLU(inplace=True))
    works as on the plain path, with the same gradients: the Functions return a fresh tensor, not a view made
    inside the Function (autograd forbids in-place ops on those)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(inplace=True))
    fused, plain = _pair(model, method, 0.1, target_modules=["0"])
    g = torch.Generator().manual_seed(3)
    x, probe = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 12, generator=g)
    _assert_same(_run(fused, x, probe, "fp32"), _run(plain, x, probe, "fp32"), "fp32")


def test_fused_gated_mlp_output_can_be_modified_in_place():
    fused, plain = _pair(_mlp(bias=True), "dora", 0.1)
    assert is_patched(fused[0])
    g = torch.Generator().manual_seed(3)
    x, probe = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    results = []
    for model in (fused, plain):
        model.zero_grad()
        xx = x.clone().requires_grad_(True)
        torch.manual_seed(7)
        (model(xx).mul_(2) * probe).sum().backward()
        results.append((xx.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (dx_f, g_f), (dx_p, g_p) = results
    torch.testing.assert_close(dx_f, dx_p)
    for name in g_p:
        torch.testing.assert_close(g_f[name], g_p[name])


def test_fused_dora_without_bias_refuses_an_in_place_change_of_its_output_naming_the_fix():
    """Without a bias DoRA's Function keeps its output ŷ itself for ∂L/∂m: an in-place op on it afterwards is an
    error at backward (never a silently wrong ∂L/∂m) that names the fix."""
    torch.manual_seed(0)
    fused, _ = _pair(nn.Sequential(nn.Linear(16, 12, bias=False), nn.ReLU(inplace=True)), "dora", 0.0,
                     target_modules=["0"])
    y = fused(torch.randn(2, 5, 16, requires_grad=True))
    with pytest.raises(RuntimeError, match="fused=False"):
        y.sum().backward()
