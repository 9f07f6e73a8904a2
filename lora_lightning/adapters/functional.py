"""The adapter path as autograd Functions: the fused LoRA layer and ALLoRA's backward rule. Pure torch.

One layer of the LoRA family (W0 ∈ R^{out×in} frozen, ΔW = s·U·D with D ∈ R^{k×in}, U ∈ R^{out×k}; LoRA: D = A,
U = B, k = r; SDS: D = [A; Q_Aᵀ], U = [Q_B, B], k = 2r), for tokens x (N×in), dropout keep-mask m (1 byte per
element, or none) with keep scale q = 1/(1−p):

    forward     y = x·W0ᵀ + b + s·(q·m⊙x)·Dᵀ·Uᵀ            (the low-rank term added into y in place)
    backward    g = ∂L/∂y,  x̃ = q·m⊙x,  h = x̃·Dᵀ (N×k, recomputed, never saved)
                ∂L/∂x = g·W0 + q·m ⊙ (s·(g·U)·D)
                ∂L/∂U = s·(c⊙g)ᵀ·h,    ∂L/∂D = s·((c⊙g)·U)ᵀ·x̃

with c ≡ 1 for plain LoRA. Saved for backward: x itself (a reference to the layer input, never a copy), the
mask, and references to W0, D, U (parameters, not copies); nothing weight-sized is kept (under autocast an fp32
W0 is cast per use, a transient, as ``F.linear`` does) and W0 never gets a gradient (``LoRAFunction`` is used only
when W0 and b are frozen). This is Unsloth's
``fast_lora`` idea (``out.addmm_(X·A, B, alpha=s)``, only X kept) written for our layer interface.

ALLoRA (Huang & Balestriero 2024, arXiv 2410.09692, §4.2 and the code listing of Appendix F): one coefficient
per output row i of ΔW,

    c_i = 1/√(‖(s·U·D)_{i,:}‖ + 1/η²)        (the norm, not squared: c_i = η while ΔW = 0)

multiplies g per output channel before the gradients of D and U are formed; ∂L/∂x is NOT rescaled (§4.2: "We
only modify the gradients of A and B, but not that of the input"). The norms come from the factors of the
current forward, as in the listing, computed from the k×k Gram D·Dᵀ: ‖(UD)_i‖² = U_i·(D·Dᵀ)·U_iᵀ (no out×in
matrix). The listing has s = 1 (ALLoRA is scale-free); with s ≠ 1 we take the rows of s·U·D [ours].
``norm="squared"`` (c_i = 1/√(‖·‖² + 1/η²)) is an ablation [ours], not the paper's rule.

QLoRA: a 4-bit W0 (``lora_lightning.quantize``) is dequantised to the compute dtype inside forward and again
inside backward, a per-call temporary of one layer (as torchao's ``linear_nf4`` and bitsandbytes do); only the
4-bit tensor is referenced by the saved state, so ∂L/∂x = g·deq(W0) + … flows through the 4-bit matmul.

DoRA (Liu et al. 2024, arXiv 2402.09353; ``dora.py``) on the same path, with k = m/n (here m ∈ R^{out} is DoRA's
magnitude, not the dropout mask, which enters only through x̃ = q·mask⊙x; n = ‖W0 + s·U·D‖_row, a constant in
backward as in the paper's §4.3) multiplying every output row:

    forward     ŷ = k ⊙ (x·W0ᵀ + s·x̃·Dᵀ·Uᵀ),   y = ŷ + b
    backward    the LoRA backward above with g replaced by k⊙g, and
                ∂L/∂m_i = Σ_t g_ti·(W0·x_t + s·U·D·x̃_t)_i / n_i = Σ_t g_ti·ŷ_ti / m_i

so DoRA keeps what LoRA keeps plus ŷ, which IS the output when the layer has no bias (saved by reference: no
extra bytes where the next op keeps its input anyway, e.g. the gated MLP's gate and up outputs or attention's
values; an out-sized extra where it does not, e.g. o_proj / down_proj feeding a residual add, and always with a
bias, where ŷ is a tensor of its own). [ours] A row with m_i = 0 exactly has ŷ_i = 0 and gets ∂L/∂m_i = 0 on
this path (the plain path, ``fused: false``, differentiates it); the initial m is the row norm clamped at 1e-12,
never 0.

Output shape: each Function returns its result as tokens × out (2-D, a fresh tensor); ``unflatten_tokens``
gives it x's leading dims OUTSIDE the Function. A view made inside a custom Function cannot be modified in place
(autograd refuses: it would bypass the custom backward), so returning one broke any in-place op after the layer,
e.g. torchvision's VGG classifier (Linear → ReLU(inplace=True)); a view made outside is ordinary. DoRA without a
bias saves its own output ŷ, so an in-place op on it is an error at backward (``MODIFIED_OUTPUT``, naming the fix),
never a silently wrong ∂L/∂m; with a bias ŷ is private and in-place ops after the layer are fine.

Mixed precision: under autocast the matmuls run in the autocast dtype (as ``F.linear`` would), in backward
too (the casts of x and W0 are redone there, transient, instead of keeping cast copies alive).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..quantize import dequantize, is_quantized

NORMS = ("norm", "squared")


@torch.no_grad()
def allora_coefficients(down: Tensor, up: Tensor, scaling: float, eta: float, norm: str = "norm") -> Tensor:
    """ALLoRA's c_i = 1/√(‖(s·U·D)_{i,:}‖ + 1/η²) for every output row i (module docstring), shape (out,), in
    float32 (float64 for float64 factors), from the k×k Gram of D: no out×in matrix."""
    dtype = torch.float64 if down.dtype == torch.float64 else torch.float32
    with torch.autocast(down.device.type, enabled=False):
        d, u = down.detach().to(dtype), up.detach().to(dtype)
        sq = ((u @ (d @ d.T)) * u).sum(1).clamp_min(0) * (scaling * scaling)
        rows = sq if norm == "squared" else sq.sqrt()
        return (rows + eta**-2).rsqrt()


MODIFIED_OUTPUT = (
    "a fused layer's output that its backward needs (DoRA without a bias keeps its output ŷ for ∂L/∂m; the fused "
    "gated MLP keeps the down projection's) was modified by an in-place op after the layer (e.g. "
    "nn.ReLU(inplace=True), x += …): make that op out-of-place, or use the plain path, AdapterConfig(fused=False) "
    "(config: `fused: false`)"
)


def unflatten_tokens(out: Tensor, x: Tensor) -> Tensor:
    """A Function's tokens × out result as (*x.shape[:-1], out): a view made outside the Function, so the caller may
    modify it in place (module docstring, "Output shape")."""
    return out.view(*x.shape[:-1], out.shape[-1])


def _saved_or_explain(ctx) -> tuple:
    """``ctx.saved_tensors``, with autograd's "modified by an inplace operation" turned into ``MODIFIED_OUTPUT``."""
    try:
        return ctx.saved_tensors
    except RuntimeError as err:
        if "inplace operation" in str(err):
            raise RuntimeError(MODIFIED_OUTPUT) from err
        raise


def dropout_mask(x: Tensor, p: float) -> Tensor:
    """A keep-mask (bool, 1 byte per element) with P(keep) = 1 − p. On CPU it draws exactly what ``F.dropout``
    draws from the same generator state."""
    return torch.empty_like(x, dtype=torch.bool).bernoulli_(1.0 - p)


def apply_mask(x: Tensor, mask: Optional[Tensor], p: float) -> Tensor:
    """x ⊙ m / (1 − p) (``F.dropout``'s arithmetic), or x when there is no mask."""
    if mask is None:
        return x
    return x * mask.to(x.dtype).div_(1.0 - p)


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _base_matrix(weight: Tensor, layout: str, dtype: Optional[torch.dtype] = None) -> Tensor:
    """W0 as out×in in ``dtype`` (None: as stored): ``nn.Linear`` stores out×in, transformers' ``Conv1D`` in×out.
    A 4-bit W0 (QLoRA) is dequantised here, per call, into a temporary that the caller drops after its matmul."""
    if is_quantized(weight):
        return dequantize(weight, dtype)
    w = weight.T if layout == "conv1d" else weight
    return w if dtype is None else w.to(dtype)


def _masked(x2: Tensor, mask2: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """m⊙x in ``dtype`` (the keep scale q is folded into the r-sized products by the callers)."""
    x2 = x2.to(dtype)
    return x2 if mask2 is None else x2 * mask2


def _lowrank_forward(x2, weight, bias, down, up, mask2, scaling: float, p: float, layout: str, dtype):
    """[x·W0ᵀ + b] + s·(q·m⊙x)·Dᵀ·Uᵀ for 2-D x (N×in), autocast off; ``dtype``: the autocast dtype or None."""
    adapter_dtype = dtype or down.dtype
    scale = scaling / (1.0 - p) if mask2 is not None else scaling
    h = _masked(x2, mask2, adapter_dtype) @ down.to(adapter_dtype).T  # N×k
    if scale != 1.0:
        h = h * scale
    up_t = up.to(adapter_dtype).T
    if weight is None:
        return h @ up_t
    if is_quantized(weight):  # QLoRA: a one-layer dense temporary in the compute dtype, dropped below
        weight = dequantize(weight, dtype)
    elif dtype is not None:
        weight = weight.to(dtype)
    if dtype is not None and bias is not None:
        bias = bias.to(dtype)
    xb = x2 if dtype is None else x2.to(dtype)
    # the base layer's own op: F.linear for nn.Linear, addmm(b, x, W) for Conv1D (W stored in×out)
    if layout == "conv1d":
        out = xb @ weight if bias is None else torch.addmm(bias, xb, weight)
    else:
        out = torch.nn.functional.linear(xb, weight, bias)
    del xb, weight
    if out.dtype == adapter_dtype:
        return out.addmm_(h, up_t)
    out += (h @ up_t).to(out.dtype)
    return out


def _lowrank_backward(g2, x2, weight, down, up, mask2, coef, scaling: float, p: float, layout: str, dtype,
                      need_x: bool, need_down: bool, need_up: bool):
    """(∂L/∂x, ∂L/∂D, ∂L/∂U) of ``_lowrank_forward`` for the output gradient g2 (N×out), module docstring; x2 as
    in forward (its mask reapplied here). ∂L/∂x is in the compute dtype; None where not needed."""
    adapter_dtype = dtype or down.dtype
    scale = scaling / (1.0 - p) if mask2 is not None else scaling
    d, u = down.to(adapter_dtype), up.to(adapter_dtype)
    ga = g2.to(adapter_dtype)
    dx = d_down = d_up = gu = None
    if need_x:
        gu = ga @ u  # N×k
        w = None if weight is None else _base_matrix(weight, layout, dtype)  # 4-bit: dequantised, transient
        if w is None:
            dx = (gu * scale) @ d
            if mask2 is not None:
                dx.mul_(mask2)
        elif mask2 is None and w.dtype == adapter_dtype:
            dx = (g2.to(w.dtype) @ w).addmm_(gu, d, alpha=scale)  # g·W0 + s·(g·U)·D, no N×in temporary
        else:
            dx = g2.to(w.dtype) @ w
            low = (gu * scale) @ d  # N×in, masked
            if mask2 is not None:
                low.mul_(mask2)
            dx += low.to(dx.dtype)
            del low
    if need_down or need_up:
        xm = _masked(x2, mask2, adapter_dtype)
        gc = ga if coef is None else ga * coef.to(adapter_dtype)
        if need_up:
            d_up = (gc.T @ (xm @ d.T)) * scale
        if need_down:
            gcu = gu if (coef is None and gu is not None) else gc @ u
            d_down = (gcu.T @ xm) * scale
    return dx, d_down, d_up


def _post_scale(magnitude: Tensor, norm: Tensor) -> Tensor:
    """DoRA's k = m/n per output row, in n's dtype (float32, float64 for float64 factors), detached."""
    return magnitude.detach().to(norm.dtype) / norm


def _dora_forward(x2, weight, bias, down, up, mask2, post, scaling: float, p: float, layout: str, dtype):
    """(y, ŷ): ŷ = k ⊙ (x·W0ᵀ + s·(q·m⊙x)·Dᵀ·Uᵀ), y = ŷ + b (y is ŷ itself without a bias); module docstring."""
    y_pre = _lowrank_forward(x2, weight, None, down, up, mask2, scaling, p, layout, dtype)
    y_pre.mul_(post.to(y_pre.dtype))
    return (y_pre if bias is None else y_pre + bias.to(y_pre.dtype)), y_pre


def _magnitude_grad(g2: Tensor, y_pre: Tensor, magnitude: Tensor) -> Tensor:
    """∂L/∂m_i = Σ_t g_ti·ŷ_ti / m_i (0 where m_i = 0), accumulated in at least float32; module docstring."""
    acc = torch.promote_types(magnitude.dtype, torch.float32)
    dot = (g2.to(y_pre.dtype) * y_pre).sum(0, dtype=acc)
    m = magnitude.detach().to(acc)
    return torch.where(m != 0, dot / torch.where(m != 0, m, 1), 0).to(magnitude.dtype)


def _proj_forward(x2, tensors, spec, dtype):
    """One projection of the family: (y, ŷ or None). ``tensors`` = (W0, b, D, U, mask, c, m, n): m, n (DoRA's
    magnitude and row norm) None for the LoRA family; ``spec`` = (s, p, layout)."""
    weight, bias, down, up, mask2, coef, magnitude, norm = tensors
    if magnitude is None:
        return _lowrank_forward(x2, weight, bias, down, up, mask2, *spec, dtype), None
    return _dora_forward(x2, weight, bias, down, up, mask2, _post_scale(magnitude, norm), *spec, dtype)


def _proj_backward(g2, x2, tensors, spec, dtype, y_pre, need_x: bool, need_down: bool, need_up: bool,
                   need_magnitude: bool):
    """(∂L/∂x, ∂L/∂D, ∂L/∂U, ∂L/∂m) of ``_proj_forward``; None where not needed."""
    weight, bias, down, up, mask2, coef, magnitude, norm = tensors
    d_mag = None
    if magnitude is not None:
        if need_magnitude:
            d_mag = _magnitude_grad(g2, y_pre, magnitude)
        g2 = g2 * _post_scale(magnitude, norm).to(g2.dtype)
    return (*_lowrank_backward(g2, x2, weight, down, up, mask2, coef, *spec, dtype, need_x, need_down, need_up),
            d_mag)


class LoRAFunction(torch.autograd.Function):
    """y = [x·W0ᵀ + b] + s·(q·m⊙x)·Dᵀ·Uᵀ with the backward of the module docstring; ``weight=None`` gives the
    low-rank term alone (the ALLoRA rule on the unfused path). Inputs after the tensors: ``scaling`` s,
    ``p`` (the dropout rate of ``mask``), ``layout`` ("linear" | "conv1d"). Returns tokens × out (``unflatten_tokens``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, mask, coef, scaling: float, p: float, layout: str):
        dtype = _autocast_dtype(x.device.type)
        n_in = down.shape[1]
        with torch.autocast(x.device.type, enabled=False):
            out = _lowrank_forward(x.reshape(-1, n_in), weight, bias, down, up,
                                   None if mask is None else mask.reshape(-1, n_in), scaling, p, layout, dtype)
        ctx.save_for_backward(x, weight, down, up, mask, coef)
        ctx.scaling, ctx.p, ctx.layout, ctx.dtype = scaling, p, layout, dtype
        return out  # tokens × out: ``unflatten_tokens`` outside

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, down, up, mask, coef = ctx.saved_tensors
        need_x, _, _, need_down, need_up = ctx.needs_input_grad[:5]
        n_in = down.shape[1]
        with torch.autocast(x.device.type, enabled=False):
            dx, d_down, d_up = _lowrank_backward(
                grad_out.reshape(-1, up.shape[0]), x.reshape(-1, n_in), weight, down, up,
                None if mask is None else mask.reshape(-1, n_in), coef, ctx.scaling, ctx.p, ctx.layout, ctx.dtype,
                need_x, need_down, need_up,
            )
        if dx is not None:
            dx = dx.to(x.dtype).view(x.shape)
        return dx, None, None, d_down, d_up, None, None, None, None, None


class DoRAFunction(torch.autograd.Function):
    """DoRA's layer y = k ⊙ (x·W0ᵀ + s·(q·m⊙x)·Dᵀ·Uᵀ) + b, k = m/n, with the backward of the module docstring:
    saved are x, the mask and ŷ (the output itself when there is no bias), nothing weight-sized. Inputs after x,
    W0, b, D, U, mask: ``magnitude`` m (trainable), ``norm`` n (detached, from ``DoRALayer.weight_norm``), then
    ``scaling``, ``p``, ``layout``. Returns tokens × out (``unflatten_tokens``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, mask, magnitude, norm, scaling: float, p: float, layout: str):
        dtype = _autocast_dtype(x.device.type)
        tensors = _flat_masks((weight, bias, down, up, mask, None, magnitude, norm))
        with torch.autocast(x.device.type, enabled=False):
            y, y_pre = _proj_forward(x.reshape(-1, down.shape[1]), tensors, (scaling, p, layout), dtype)
        ctx.save_for_backward(x, weight, down, up, mask, magnitude, norm, y_pre)
        ctx.spec, ctx.dtype = (scaling, p, layout), dtype
        return y  # tokens × out (ŷ itself without a bias): ``unflatten_tokens`` outside

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, down, up, mask, magnitude, norm, y_pre = _saved_or_explain(ctx)
        need = ctx.needs_input_grad
        tensors = _flat_masks((weight, None, down, up, mask, None, magnitude, norm))
        with torch.autocast(x.device.type, enabled=False):
            dx, d_down, d_up, d_mag = _proj_backward(
                grad_out.reshape(-1, up.shape[0]), x.reshape(-1, down.shape[1]), tensors, ctx.spec, ctx.dtype, y_pre,
                need[0], need[3], need[4], need[6],
            )
        if dx is not None:
            dx = dx.to(x.dtype).view(x.shape)
        return dx, None, None, d_down, d_up, None, d_mag, None, None, None, None


def _silu_grad(e: Tensor, grad: Tensor) -> Tensor:
    """∂L/∂e for a = silu(e) = e·σ(e): grad·σ(e)·(1 + e·(1 − σ(e))), as one kernel (aten's silu_backward)."""
    return torch.ops.aten.silu_backward(grad, e)


def is_silu(act) -> bool:
    """``nn.SiLU`` or transformers' ``SiLUActivation`` (its ``silu``/``swish``), whose derivative is written out."""
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


class GatedMLPFunction(torch.autograd.Function):
    """A Llama/Qwen-style gated MLP, y = down(act(gate(x)) ⊙ up(x)), with an adapter on each of the three
    projections, as one Function (Unsloth's ``LoRA_MLP`` idea, our own code):

        e = gate(x),  u = up(x)                     (each: a projection of ``_proj_forward``: LoRA family or DoRA)
        y = down(act(e) ⊙ u)

    Saved for backward: x, e and u (and the dropout masks; for DoRA projections ŷ too, which is e, u or y itself
    when the projection has no bias); act(e) and the product are recomputed in backward.
    Backward: with z = act(e) ⊙ u recomputed, (∂L/∂z, the down factors' gradients) from ``_proj_backward``;
    ∂L/∂e = act'(e)·u·∂L/∂z, ∂L/∂u = act(e)·∂L/∂z; then gate and up as single layers, ∂L/∂x their sum.
    ``act``: any activation module; SiLU's derivative is written out, others are differentiated by autograd
    on the recomputed e. Inputs: x, then (W0, b, D, U, mask, c, m, n) for gate, up and down (m, n: DoRA's
    magnitude and row norm, None for the LoRA family), then the non-tensor ``specs`` ((s, p, layout) three
    times) and ``act``. Returns tokens × hidden (``unflatten_tokens``)."""

    @staticmethod
    def forward(ctx, x, *args):
        tensors, specs, act = args[:24], args[24], args[25]
        dtype = _autocast_dtype(x.device.type)
        projections = [_flat_masks(tensors[i:i + 8]) for i in (0, 8, 16)]
        x2 = x.reshape(-1, projections[0][2].shape[1])
        with torch.autocast(x.device.type, enabled=False):
            e, e_pre = _proj_forward(x2, projections[0], specs[0], dtype)
            u, u_pre = _proj_forward(x2, projections[1], specs[1], dtype)
            z = act(e) * u
            y, y_pre = _proj_forward(z, projections[2], specs[2], dtype)
        del z
        ctx.save_for_backward(x, e, u, e_pre, u_pre, y_pre, *tensors)
        ctx.specs, ctx.act, ctx.dtype = specs, act, dtype
        return y  # tokens × hidden: ``unflatten_tokens`` outside

    @staticmethod
    def backward(ctx, grad_out):
        x, e, u, e_pre, u_pre, y_pre, *tensors = _saved_or_explain(ctx)
        specs, act, dtype = ctx.specs, ctx.act, ctx.dtype
        gate, up, down = (_flat_masks(tensors[i:i + 8]) for i in (0, 8, 16))
        needs = ctx.needs_input_grad
        need = lambda i: (needs[1 + i + 2], needs[1 + i + 3], needs[1 + i + 6])  # noqa: E731 - D, U, m at i
        x2 = x.reshape(-1, gate[2].shape[1])
        grads: list = [None] * 24
        with torch.autocast(x.device.type, enabled=False):
            if is_silu(act):
                a = torch.nn.functional.silu(e)
            else:
                with torch.enable_grad():
                    e_leaf = e.detach().requires_grad_(True)
                    a_graph = act(e_leaf)
                a = a_graph.detach()
            z = a * u
            g2 = grad_out.reshape(-1, down[3].shape[0])
            dz, grads[18], grads[19], grads[22] = _proj_backward(g2, z, down, specs[2], dtype, y_pre, True, *need(16))
            del z
            du = dz * a
            if is_silu(act):
                de = _silu_grad(e, dz * u)
            else:
                (de,) = torch.autograd.grad(a_graph, e_leaf, dz * u)
            del dz, a
            need_x = needs[0]
            dx_u, grads[10], grads[11], grads[14] = _proj_backward(du, x2, up, specs[1], dtype, u_pre, need_x, *need(8))
            del du
            dx_g, grads[2], grads[3], grads[6] = _proj_backward(de, x2, gate, specs[0], dtype, e_pre, need_x, *need(0))
            dx = None
            if need_x:
                dx = (dx_g + dx_u.to(dx_g.dtype)).to(x.dtype).view(x.shape)
        return (dx, *grads, None, None)


def _flat_masks(tensors) -> tuple:
    """A projection's (W0, b, D, U, mask, c, m, n) with the mask as 2-D (tokens × in)."""
    mask = tensors[4]
    return (*tensors[:4], None if mask is None else mask.reshape(-1, mask.shape[-1]), *tensors[5:])


class ALLoRAConv2dFunction(torch.autograd.Function):
    """ALLoRA's rule on a Conv2d adapter path: y = s·conv1×1(conv(x, D), U), the gradients of D and U from c⊙g,
    the gradient of x from g (module docstring). ``conv`` is the base ``nn.Conv2d`` (for stride, padding,
    dilation and padding mode); D arrives as its k×(in·kh·kw) matrix view."""

    @staticmethod
    def forward(ctx, x, down, up, coef, scaling: float, conv):
        kernel = down.view(down.shape[0], *conv.weight.shape[1:])
        h = conv._conv_forward(x, kernel, None)
        out = torch.nn.functional.conv2d(h, up[:, :, None, None]) * scaling
        ctx.save_for_backward(x, down, up, coef)
        ctx.scaling, ctx.conv = scaling, conv
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, down, up, coef = ctx.saved_tensors
        s, conv = ctx.scaling, ctx.conv
        need_x, need_down, need_up = ctx.needs_input_grad[:3]
        g = grad_out.to(up.dtype)
        gc = g * coef.to(g.dtype)[None, :, None, None]
        with torch.enable_grad():
            xr = x.detach().requires_grad_(need_x)
            dr = down.detach().view(down.shape[0], *conv.weight.shape[1:]).requires_grad_(need_down)
            h = conv._conv_forward(xr, dr, None)  # recomputed: N×k×H'×W'
        d_up = torch.einsum("nohw,nkhw->ok", gc, h.detach()) * s if need_up else None
        dx = d_down = None
        if need_x:
            dh = torch.einsum("nohw,ok->nkhw", g, up) * s
            (dx,) = torch.autograd.grad(h, xr, dh, retain_graph=need_down)
        if need_down:
            dh_c = torch.einsum("nohw,ok->nkhw", gc, up) * s
            (d_down,) = torch.autograd.grad(h, dr, dh_c)
            d_down = d_down.reshape(down.shape)
        return dx, d_down, d_up, None, None, None
