"""Llama/Qwen-style gated MLPs with all three projections adapted run as one autograd Function.

A gated MLP (transformers' ``LlamaMLP``, ``Qwen2MLP``, ``MistralMLP`` ...) computes

    y = down_proj(act_fn(gate_proj(x)) ⊙ up_proj(x)).

Run layer by layer, autograd keeps for backward x (twice with dropout: once per adapter input), the gate
output e, act(e), the up output u and the product (four intermediate-sized tensors), plus the r-sized
adapter intermediates. ``GatedMLPFunction`` (``functional.py``) keeps x, e and u only and recomputes act(e) and
the product in backward (Unsloth's ``LoRA_MLP`` idea, our own code, with dropout and ALLoRA's rule included).

``patch_gated_mlps(model)`` (called by ``inject_adapters`` when ``AdapterConfig.fused`` and ``fused_mlp`` are
on) replaces, on the instance, the ``forward`` of every module that has ``gate_proj``, ``up_proj``,
``down_proj`` (all three fusable adapter layers: the LoRA family or DoRA) and ``act_fn``, after checking on a probe input that
the fused computation equals the module's own forward (so a module with these names but another formula is
left alone). At every call the patched forward falls back to the module's own forward when the Function cannot
apply: a merged or unfusable layer (W0 trainable, sharded, hooked), hooks on the projections (FSDP2 units
register theirs), or factors that are DTensors. ``unpatch_gated_mlps`` restores the class forward.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor, nn

from .base import DTensor, AdapterLayer
from .functional import GatedMLPFunction, dropout_mask, unflatten_tokens

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _ready(layer: nn.Module) -> bool:
    return (
        isinstance(layer, AdapterLayer)
        and not layer.merged
        and layer._fusable_now()
        and not layer._forward_hooks
        and not layer._forward_pre_hooks
        and not any(isinstance(p, DTensor) for p in layer.parameters(recurse=False))
    )


def _projection_inputs(layer: AdapterLayer, x_shape, device, p: float, coef_on: bool) -> tuple:
    down, up = layer.factors()
    mask = torch.empty(*x_shape[:-1], down.shape[1], dtype=torch.bool, device=device).bernoulli_(1.0 - p) if p else None
    coef = layer.allora_coefficients(down, up) if coef_on and layer.allora_eta is not None else None
    magnitude, norm = layer.output_scale()
    return (layer.base.weight, layer.base.bias, down, up, mask, coef, magnitude, norm), (layer.scaling, p, layer.kind)


def fused_gated_mlp(module: nn.Module, x: Tensor, dropout: bool = True) -> Tensor:
    """y = down(act(gate(x)) ⊙ up(x)) through ``GatedMLPFunction`` (the layers must be ready). Dropout masks
    are drawn in the order the module's own forward draws them (gate, up, down)."""
    coef_on = torch.is_grad_enabled()
    tensors, specs = [], []
    for name in PROJECTIONS:
        layer = getattr(module, name)
        p = layer._dropout_p() if dropout else 0.0
        if name == "down_proj" and p:  # the product's shape: x's leading dims × intermediate size
            t, spec = _projection_inputs(layer, (*x.shape[:-1], layer.in_features), x.device, p, coef_on)
        else:
            t, spec = _projection_inputs(layer, x.shape, x.device, p, coef_on)
        tensors += t
        specs.append(spec)
    return unflatten_tokens(GatedMLPFunction.apply(x, *tensors, tuple(specs), module.act_fn), x)


def forward(self: nn.Module, x: Tensor) -> Tensor:
    """The patched forward of a gated MLP (module docstring)."""
    if all(_ready(getattr(self, name)) for name in PROJECTIONS):
        return fused_gated_mlp(self, x)
    return type(self).forward(self, x)


def is_gated_mlp(module: nn.Module) -> bool:
    """Has ``gate_proj``, ``up_proj``, ``down_proj`` (fusable adapter layers: LoRA family, DoRA) and ``act_fn``."""
    layers = [getattr(module, name, None) for name in PROJECTIONS]
    return (
        hasattr(module, "act_fn")
        and all(isinstance(layer, AdapterLayer) and layer.fusable and layer.fused for layer in layers)
        and all(layer.kind in ("linear", "conv1d") for layer in layers)
    )


@torch.no_grad()
def _probe_matches(module: nn.Module) -> bool:
    """The fused computation equals the module's own forward on a random probe (dropout off)."""
    gate = module.gate_proj
    w = gate.base.weight
    if w.is_meta or not all(_ready(getattr(module, name)) for name in PROJECTIONS):
        return False
    modes = [m.training for m in module.modules()]
    module.eval()
    try:
        g = torch.Generator(device=w.device).manual_seed(0)
        x = torch.randn(2, gate.in_features, generator=g, device=w.device, dtype=w.dtype)
        want = type(module).forward(module, x)
        got = fused_gated_mlp(module, x, dropout=False)
    finally:
        for m, mode in zip(module.modules(), modes):
            m.training = mode
    tol = 1e-4 if w.dtype in (torch.float32, torch.float64) else 3e-2
    return got.shape == want.shape and torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item())


def patch_gated_mlps(model: nn.Module) -> list[str]:
    """Give every gated MLP of ``model`` whose three projections are fusable adapter layers the fused forward
    (module docstring). Returns the names of the patched modules."""
    patched = []
    for name, module in model.named_modules():
        if is_gated_mlp(module) and not is_patched(module) and _probe_matches(module):
            module.forward = types.MethodType(forward, module)
            patched.append(name)
    return patched


def is_patched(module: nn.Module) -> bool:
    bound = module.__dict__.get("forward")
    return isinstance(bound, types.MethodType) and bound.__func__ is forward


def unpatch_gated_mlps(model: nn.Module) -> int:
    """Remove the fused forward again (the class forward runs). Returns how many modules were unpatched."""
    count = 0
    for module in model.modules():
        if is_patched(module):
            del module.forward
            count += 1
    return count
