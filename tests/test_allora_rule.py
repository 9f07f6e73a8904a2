"""ALLoRA's backward rule in the layer (arXiv 2410.09692 §4.2, Appendix F listing), checked against an independent
re-implementation of the paper's listing: grad_A, grad_B and grad_x on Linear, Conv1D and Conv2d, float64, with
gradient accumulation, fused and unfused, and with no callback or optimiser hook."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_lightning import AdapterConfig, adapter_layers, inject_adapters

ETA = 2.0


class ListingALLoRA(torch.autograd.Function):
    """The paper's Listing 1 (Appendix F), written out: output = x·Aᵀ·Bᵀ, norms = ‖B·A‖ per row in forward;
    backward scales grad_output by 1/√(norms + 1/η²) for A and B only, summed over tokens."""

    @staticmethod
    def forward(ctx, x, A, B, eta):
        output = x @ A.t() @ B.t()
        norms = torch.norm(B @ A, dim=1)
        ctx.save_for_backward(x, A, B, norms)
        ctx.rsq_scale = 1.0 / eta**2
        return output

    @staticmethod
    def backward(ctx, grad_output):
        x, A, B, norms = ctx.saved_tensors
        accelerate = 1.0 / torch.sqrt(norms + ctx.rsq_scale)
        grad_input = grad_output @ B @ A
        g = grad_output.reshape(-1, B.shape[0])
        xs = x.reshape(-1, A.shape[1])
        grad_A = ((g * accelerate) @ B).T @ xs
        grad_B = (g * accelerate).T @ (xs @ A.t())
        return grad_input, grad_A, grad_B, None


def reference_output(kind: str, base: nn.Module, A, B, x):
    """base(x) + the listing's adapter, on the layer's own view of x as tokens (Conv2d: im2col patches)."""
    if kind != "conv2d":
        return base(x) + ListingALLoRA.apply(x, A, B, ETA)
    if base.padding_mode != "zeros":
        xp, padding = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode), 0
    else:
        xp, padding = x, base.padding
    patches = F.unfold(xp, base.kernel_size, dilation=base.dilation, padding=padding, stride=base.stride)
    y = ListingALLoRA.apply(patches.transpose(1, 2), A, B, ETA)  # N × L × out
    out = base(x)
    return out + y.transpose(1, 2).reshape(out.shape)


def make(kind: str):
    torch.manual_seed(0)
    if kind == "linear":
        base, shape = nn.Linear(10, 12), (3, 5, 10)
    elif kind == "conv1d":
        base, shape = Conv1D(12, 10), (3, 5, 10)
        nn.init.normal_(base.weight)
    elif kind == "conv2d":
        base, shape = nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 9, 9)
    else:  # conv2d with reflect padding and dilation
        base, shape = nn.Conv2d(4, 6, 3, padding=2, dilation=2, padding_mode="reflect"), (2, 4, 9, 9)
    return base.double(), shape


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d", "conv2d_reflect"])
def test_layer_gradients_equal_the_papers_listing_with_accumulation(kind, fused):
    base, shape = make(kind)
    model = nn.Sequential(base)
    inject_adapters(model, AdapterConfig(method="allora", r=3, target_modules=["0"], fused=fused), verbose=False)
    layer = model[0]
    assert layer.allora_eta == ETA and layer.scaling == 1.0 and layer.dropout is None  # the paper's defaults
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g, dtype=torch.float64))
        layer.lora_B[0].zero_()  # a row with ΔW_i = 0: c_i = η
        layer.lora_B[1].mul_(30.0)  # a large row: c_i ≪ η
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    xs = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2)]
    ours_x = [x.clone().requires_grad_(True) for x in xs]
    ref_x = [x.clone().requires_grad_(True) for x in xs]
    for x_ours, x_ref in zip(ours_x, ref_x):  # two micro-batches, gradients accumulate
        w = torch.randn(layer(x_ours.detach()).shape, generator=g, dtype=torch.float64)
        (layer(x_ours) * w).sum().backward()
        (reference_output(kind.split("_")[0], base, A, B, x_ref) * w).sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, A.grad, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(layer.lora_B.grad, B.grad, rtol=1e-6, atol=1e-10)
    for x_ours, x_ref in zip(ours_x, ref_x):
        torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-6, atol=1e-10)
    assert base.weight.grad is None


def test_the_rule_is_not_plain_lora_and_starts_at_eta():
    """With B = 0 every c_i = η: B's gradient is η × plain LoRA's; away from 0 the rows differ; x's is plain."""
    torch.manual_seed(0)
    base = nn.Linear(8, 6).double()
    plain, allora = nn.Sequential(base), nn.Sequential(nn.Linear(8, 6).double())
    allora[0].load_state_dict(base.state_dict())
    inject_adapters(plain, AdapterConfig(method="lora", r=2, alpha=2, target_modules=["0"]), verbose=False)
    inject_adapters(allora, AdapterConfig(method="allora", r=2, eta=3.0, target_modules=["0"]), verbose=False)
    allora[0].lora_A.data.copy_(plain[0].lora_A)
    x = torch.randn(4, 8, dtype=torch.float64)
    for m in (plain, allora):
        m(x).square().sum().backward()
    assert plain[0].scaling == allora[0].scaling == 1.0
    torch.testing.assert_close(allora[0].lora_B.grad, 3.0 * plain[0].lora_B.grad)
    assert torch.count_nonzero(allora[0].lora_B.grad) > 0


def test_off_for_other_methods_and_eta_validated():
    model = nn.Sequential(nn.Linear(4, 4))
    inject_adapters(model, AdapterConfig(method="lora", r=2, target_modules=["0"]), verbose=False)
    assert model[0].allora_eta is None
    with pytest.raises(ValueError, match="eta must be > 0"):
        AdapterConfig(method="allora", eta=0.0)
    assert AdapterConfig(method="allora", eta=1.5).to_dict()["eta"] == 1.5
    layers = adapter_layers(model)
    assert list(layers) == ["0"]
