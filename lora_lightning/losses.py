"""Target-only, chunked causal-LM loss: lm_head + cross-entropy without ever holding N×V logits.

A causal LM predicts token t+1 from the final hidden state at position t. With labels ``y`` (B×T, -100 =
no target: prompt, padding), HF shifts them, ``ŷ_t = y_{t+1}`` (the last position has no target), and

    loss_sum = Σ_{t: ŷ_t ≠ -100}  [ logsumexp_v(z_t,v) − z_t,ŷ_t ],    z_t = W·h_t (+ b)  ∈ R^V,
    n        = #{t: ŷ_t ≠ -100}

(HF's loss is loss_sum / n). Only the n selected rows of h ever reach the lm_head, in chunks of
``chunk_size`` tokens; per chunk the gradient of the summed loss w.r.t. the logits is

    ∂loss_sum/∂z_t = softmax(z_t) − onehot(ŷ_t),   so   ∂/∂h_t = (softmax(z_t) − onehot(ŷ_t))·W,
    ∂/∂W = Σ_t (softmax(z_t) − onehot(ŷ_t))ᵀ·h_t,   ∂/∂b = Σ_t softmax(z_t) − onehot(ŷ_t).

[our choice, as Liger-Kernel's fused linear cross-entropy, not a recompute in backward] these gradients
are formed in the forward pass, chunk by chunk, while the chunk's logits exist; backward only scales them
by the incoming gradient. What is kept for backward is ∂/∂h (n×H, the size of the selected hidden states
a recomputing backward would keep instead) and, only when the lm_head is trained, ∂/∂W in fp32 (the
gradient W gets anyway). It costs one n×V×H matmul less than recomputing the logits in backward.

Precision follows HF: logits are computed in the hidden states' dtype (bf16 stays bf16, as HF's lm_head)
and upcast to at least fp32 for the softmax (fp64 stays fp64); ∂/∂W and ∂/∂b accumulate in that dtype.

On CUDA, when ``liger-kernel`` is installed (extra ``liger``), ``backend="auto"`` uses its fused linear
cross-entropy (Triton) on the same selected rows instead. Pure torch; no Lightning.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
DEFAULT_CHUNK_SIZE = 256  # tokens per lm_head chunk: 256 × V fp32 logits (155 MiB at V = 151,936)
BACKENDS = ("auto", "torch", "liger")


def shifted_targets(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """(mask B×T bool, targets n) for next-token prediction: position t predicts ``labels[:, t+1]``;
    the last position and every position whose next label is ``ignore_index`` have no target."""
    shifted = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    mask = shifted != ignore_index
    return mask, shifted[mask]


def _chunked_loss_and_grads(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, chunk_size: int,
    need_h: bool, need_w: bool, need_b: bool,
) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(loss_sum, n_correct, and the gradients asked for), one chunk of logits at a time (see module
    docstring); n_correct counts the rows whose argmax is the target."""
    acc = torch.promote_types(hidden.dtype, torch.float32)  # bf16/fp16 → fp32; fp64 stays fp64
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
    loss = torch.zeros((), dtype=acc, device=hidden.device)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        logits = F.linear(h, weight, bias).to(acc)  # C×V, the only vocabulary-sized buffer
        target_logit = logits.gather(1, y[:, None])
        correct += (logits.argmax(1) == y).sum()
        row_max = logits.amax(1, keepdim=True)
        probs = logits.sub_(row_max).exp_()  # in place: exp(z − max)
        row_sum = probs.sum(1, keepdim=True)
        loss += (row_sum.log() + row_max - target_logit).sum()
        if need_h or need_w or need_b:
            probs.div_(row_sum)
            probs.scatter_add_(1, y[:, None], probs.new_full((y.shape[0], 1), -1.0))  # softmax − onehot
            g = probs.to(h.dtype) if h.dtype != acc else probs  # HF: the grad re-enters in h's dtype
            if need_h:
                grad_h[start : start + chunk_size] = g @ weight.to(g.dtype)
            if need_w:
                grad_w += (g.T @ h.to(g.dtype)).to(acc)
            if need_b:
                grad_b += probs.sum(0)
        del logits, probs
    return loss, correct, grad_h, grad_w, grad_b


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """loss_sum = Σ_t CE(W·h_t + b, y_t) over the rows of ``hidden`` (n×H); the gradients are formed in
    forward and only scaled in backward (see module docstring)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, chunk_size: int):
        loss, correct, *saved = _chunked_loss_and_grads(
            hidden, weight, bias, targets, chunk_size, *ctx.needs_input_grad[:3]
        )
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_correct: Optional[Tensor]):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        out_h = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        out_w = grad_w * grad_loss if grad_w is not None else None
        out_b = grad_b * grad_loss if grad_b is not None else None
        return out_h, out_w, out_b, None, None


def liger_available() -> bool:
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except ImportError:
        return False
    return True


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Optional[Tensor] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """(Σ_t cross-entropy(W·h_t + b, targets_t) in at least fp32, #rows whose argmax is the target) over the rows of
    ``hidden`` (n×H), never holding more than ``chunk_size`` × V logits. ``backend``: "torch" (ours),
    "liger" (Liger-Kernel's fused linear cross-entropy, CUDA only) or "auto" (liger on CUDA when
    installed, else torch)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {', '.join(BACKENDS)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1 token, got {chunk_size}")
    use_liger = backend == "liger" or (backend == "auto" and hidden.is_cuda and liger_available())
    if use_liger:
        return _liger(hidden, weight, targets, bias)
    tensors = (hidden, weight) if bias is None else (hidden, weight, bias)
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):  # evaluation: no gradients
        return tuple(_chunked_loss_and_grads(hidden, weight, bias, targets, int(chunk_size), False, False, False)[:2])
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, int(chunk_size))


def _liger(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    if not hidden.is_cuda:
        raise ValueError("backend='liger' runs Triton kernels on CUDA only; use backend='torch' on CPU")
    if not liger_available():
        raise ImportError("backend='liger' needs liger-kernel: pip install 'lora-lightning[liger]'")
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    n = targets.shape[0]
    if n == 0:
        return hidden.sum(dtype=torch.float32) * 0.0, torch.zeros((), dtype=torch.long, device=hidden.device)
    out = liger_fused_linear_cross_entropy(hidden, weight, targets, bias=bias, reduction="sum",
                                           return_token_accuracy=True)
    return out.loss.float(), (out.token_accuracy.detach() * n).round().long()


class LMLoss(NamedTuple):
    """A causal-LM batch's loss as a sum over its target tokens, their count, and how many of them the
    model's argmax predicts (token accuracy = n_correct / n_targets)."""

    loss_sum: Tensor
    n_targets: Tensor
    n_correct: Tensor


def causal_lm_loss(
    hidden_states: Tensor,
    labels: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backend: str = "auto",
    ignore_index: int = IGNORE_INDEX,
) -> LMLoss:
    """Next-token cross-entropy from the final hidden states (B×T×H), ``labels`` (B×T, ``ignore_index`` =
    no target) and the lm_head's ``weight`` (V×H) and ``bias``: HF's causal-LM loss equals
    loss_sum / n_targets. Positions without a target never reach the lm_head; a batch without any target
    gives (0, 0, 0), with a zero gradient, never NaN."""
    if hidden_states.shape[:2] != labels.shape:
        raise ValueError(
            f"hidden states {tuple(hidden_states.shape)} and labels {tuple(labels.shape)} disagree: "
            "labels must be B×T for hidden states B×T×H"
        )
    mask, targets = shifted_targets(labels, ignore_index)
    loss_sum, n_correct = linear_cross_entropy(hidden_states[mask], weight, targets, bias, chunk_size, backend)
    return LMLoss(loss_sum, mask.sum(), n_correct)


__all__ = [
    "DEFAULT_CHUNK_SIZE", "IGNORE_INDEX", "LMLoss", "causal_lm_loss", "linear_cross_entropy", "shifted_targets",
]
