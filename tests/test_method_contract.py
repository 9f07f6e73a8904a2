"""The contract every registered method keeps, generated from the registry (ADAPTER_METHODS × layer kinds), so a
new method fails here until it is complete and no method escapes because a hand-picked list left it out:

    zero init = base            a freshly injected adapter leaves the layer's output unchanged
    forward = base(W0 + ΔW)     with every adapter tensor perturbed (SDS also rebalanced to its active form),
                                the output equals the base layer run with weight W0 + delta_weight()
    merge / unmerge             merged output = unmerged output; unmerge restores W0
    save → load                 into a fresh base: bit-identical tensors and outputs
(DDP parity: tests/test_distributed.py runs every registered method the same way.)

float64 throughout, so "equal" means equal up to float64 reduction order (1e-12).
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from lora_lightning import ADAPTER_METHODS, AdapterConfig, inject_adapters, load_adapter, save_adapter
from lora_lightning.adapters import SDSLayer
from lora_lightning.inject import adapter_layers, merge_adapters, unmerge_adapters

KINDS = {
    "linear": (lambda: nn.Linear(12, 10), (5, 12)),
    "conv1d": (lambda: Conv1D(10, 12), (2, 3, 12)),  # transformers' GPT-2 layer: weight stored in×out
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 5, 5)),
}
TOL = dict(rtol=0, atol=1e-12)


def _base(kind: str) -> tuple[nn.Module, torch.Tensor]:
    make, shape = KINDS[kind]
    torch.manual_seed(0)
    base = make().double()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return base, x


def _adapted(method: str, kind: str):
    base, x = _base(kind)
    model = nn.Sequential(OrderedDict(layer=copy.deepcopy(base)))
    config = AdapterConfig(method=method, r=2, alpha=4, target_modules=["layer"], modules_to_save=[])
    inject_adapters(model, config, verbose=False)
    return model.eval(), base.eval(), x


def _perturb(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for name, p in layer.named_parameters():
                if not name.startswith("base."):
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
            if isinstance(layer, SDSLayer):
                layer.rebalance()  # the active SDS parameterisation (bases + A, B)
                layer.lora_A.add_(torch.randn(layer.lora_A.shape, generator=g, dtype=layer.lora_A.dtype) * 0.3)


CASES = [(m, k) for m in sorted(ADAPTER_METHODS) for k in KINDS]


@pytest.mark.parametrize("method,kind", CASES)
def test_zero_init_equals_the_base_layer(method, kind):
    model, base, x = _adapted(method, kind)
    torch.testing.assert_close(model(x), base(x), **TOL)


@pytest.mark.parametrize("method,kind", CASES)
def test_forward_equals_base_with_w0_plus_delta_w(method, kind):
    model, base, x = _adapted(method, kind)
    _perturb(model)
    layer = model.layer
    assert layer.delta_weight().abs().max() > 0.05  # a real ΔW
    want = functional_call(base, {"weight": base.weight + layer.delta_weight()}, (x,))
    torch.testing.assert_close(model(x), want, **TOL)


@pytest.mark.parametrize("method,kind", CASES)
def test_merge_then_unmerge_is_exact(method, kind):
    model, base, x = _adapted(method, kind)
    _perturb(model)
    out = model(x)
    assert merge_adapters(model) == 1
    torch.testing.assert_close(model(x), out, **TOL)
    unmerge_adapters(model)
    torch.testing.assert_close(model.layer.base.weight, base.weight, **TOL)
    torch.testing.assert_close(model(x), out, **TOL)


@pytest.mark.parametrize("method,kind", CASES)
def test_save_then_load_into_a_fresh_base_is_bit_exact(method, kind, tmp_path):
    model, _, x = _adapted(method, kind)
    _perturb(model)
    save_adapter(model, tmp_path / "ad", verify=True)
    fresh_base, _ = _base(kind)
    fresh = load_adapter(nn.Sequential(OrderedDict(layer=fresh_base)), tmp_path / "ad").eval()
    assert type(fresh.layer) is type(model.layer)
    mine, theirs = model.layer.adapter_state_dict(), fresh.layer.adapter_state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(fresh(x), model(x))
