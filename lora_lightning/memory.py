"""How much memory a training step will take, estimated from the model's shapes before it runs.

    peak ≈ frozen weights + trained parameters · (1 + 1 + k)         (weights, gradients, k AdamW moments)
         + activations held for backward (one micro-batch)
         + the largest temporary (a chunk of logits, the full logits, or one recomputed block)

Activations (bytes per token, summed over the L transformer blocks; d = bytes of the compute dtype, H the
hidden size, I the MLP width, n_h / n_kv the query / key-value heads of width h_d, T the sequence length).
What each piece of a block leaves for backward when only the adapters train (frozen Linear layers keep
nothing: their input gradient needs only W0):

    norm            RMSNorm: its input in fp32 + 1/rms (4H + 4); LayerNorm: its input + mean + 1/σ (dH + 8)
    attention       SDPA / flash: q, k, v, output (d·(2·n_h + 2·n_kv)·h_d) + log-sum-exp (4·n_h);
                    eager adds the attention probabilities (n_h·T·(4 + d)) and k, v repeated to n_h heads
    MLP             gated (Llama, Qwen): the gate, its activation and the up projection (3·d·I); the fused
                    gated-MLP Function (``adapters/gated_mlp.py``): the gate and up outputs (2·d·I), the
                    product feeding down_proj is recomputed, not kept;
                    plain (GPT-2, BERT): the activation's saved inputs (1·d·I for GELU / SiLU, 4·d·I for
                    transformers' tanh-GELU written out in Python)
    adapters        per input an adapted layer reads (the attention input, the attention output, the MLP input,
                    the MLP's inner activations): that input once (d per element); per adapted layer the
                    r-sized x·Aᵀ (unfused path), with dropout a dropped copy of its input (unfused; d + 1 bytes
                    per element with the mask) or only the 1-byte mask (fused); DoRA: the layer's output
                    before the magnitude scale (d·out)
    gradient checkpointing   only each block's input (d·H) is held; one block is recomputed at a time
    loss            target-only chunked (``lora_lightning.losses``): ∂loss/∂h of the n target rows (d·H each)
                    plus their indices; full logits (HF's own loss): the fp32 log-softmax of every position
                    (4·V per target token; HF's own ``model(labels=…)`` keeps it for every position)

These are [our] reading of what PyTorch and transformers save, checked against
``torch.autograd.graph.saved_tensors_hooks`` in tests/test_memory.py (within 25 % on Qwen2-style models).
Architectures without recognisable transformer blocks get no activation estimate (said so, not guessed).
Pure torch; no Lightning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .adapters import AdapterLayer, DoRALayer, SDSLayer
from .adapters.base import base_kind, base_shape
from .adapters.gated_mlp import is_patched
from .inject import adapter_layers

MiB = 2**20

# Suffixes of a block's Linear layers by the input they read (first match wins: "attention.output.dense"
# is an attention output before "output.dense" is an MLP output).
ROLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attn_out", ("o_proj", "attn.c_proj", "attention.output.dense", "out_proj", "self_attention.dense")),
    ("mlp_out", ("down_proj", "mlp.c_proj", "output.dense", "fc2", "w2", "dense_4h_to_h")),
    ("attn_in", ("q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query", "key", "value", "query_key_value")),
    ("mlp_in", ("gate_proj", "up_proj", "gate_up_proj", "c_fc", "intermediate.dense", "fc1", "w1", "w3",
                "dense_h_to_4h")),
)
# Elements an activation module saves per output element (others: 2, a guess said in the notes).
ACTIVATION_SAVES = {"SiLU": 1, "SiLUActivation": 1, "GELU": 1, "GELUActivation": 1, "PytorchGELUTanh": 1,
                    "GELUTanhActivation": 1, "ReLU": 1, "NewGELUActivation": 4, "FastGELUActivation": 4,
                    "QuickGELUActivation": 2}


@dataclass
class MemoryEstimate:
    """Bytes of one training step on one device (see module docstring)."""

    weights: int
    trainable: int
    gradients: int
    optimizer: int
    activations: Optional[int]
    transient: int
    n_trainable: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        held = self.activations or 0
        return self.weights + self.trainable + self.gradients + self.optimizer + held + self.transient

    def table(self, available: Optional[int] = None, where: str = "") -> str:
        act = "not estimated" if self.activations is None else _fmt(self.activations)
        rows = [
            ("frozen weights and buffers", _fmt(self.weights)),
            (f"trained parameters ({self.n_trainable:,}) + gradients + optimiser state",
             _fmt(self.trainable + self.gradients + self.optimizer)),
            ("activations held for backward (one micro-batch)", act),
            ("largest temporary", _fmt(self.transient)),
            ("expected peak", _fmt(self.peak) + (f"   ({where}: {_fmt(available)})" if available else "")),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join([f"  {k:<{width}}  {v}" for k, v in rows] + [f"  note: {n}" for n in self.notes])


def _fmt(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / MiB:,.1f} MiB"


def _blocks(model: nn.Module) -> Optional[nn.ModuleList]:
    """The model's repeated transformer blocks: the largest ModuleList of one class holding Linear layers."""
    best, best_size = None, 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            inner = module[0].modules()
            if not any(base_kind(m) in ("linear", "conv1d") or isinstance(m, AdapterLayer) for m in inner):
                continue
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = module, size
    return best


def _role(name: str) -> Optional[str]:
    for role, suffixes in ROLES:
        if any(name == s or name.endswith("." + s) for s in suffixes):
            return role
    return None


def _config_int(config, *names: str, default: Optional[int] = None) -> Optional[int]:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def _checkpointing(model: nn.Module) -> bool:
    """transformers' flag (``is_activation_checkpointing``, formerly ``is_gradient_checkpointing``)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if name in dir(type(model)):
            return bool(getattr(model, name))
    return False


def activation_bytes(
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    *,
    target_tokens: Optional[int] = None,
    gradient_checkpointing: Optional[bool] = None,
    loss_chunk_size: Optional[int] = None,
    compute_dtype: Optional[torch.dtype] = None,
    notes: Optional[list[str]] = None,
) -> Optional[int]:
    """Bytes the forward of one micro-batch (``batch_size`` × ``seq_len`` tokens) leaves for backward (module
    docstring); None for an architecture without recognisable transformer blocks.

    ``target_tokens``: tokens with a loss target (default: all); ``gradient_checkpointing``: None = read it from
    the model (transformers' ``is_gradient_checkpointing``); ``loss_chunk_size``: > 0 the target-only chunked
    LM loss, 0 / None the model's full logits (only for models with an lm_head); ``compute_dtype``: the
    activations' dtype (default: the frozen weights' floating dtype; bf16 under bf16 autocast)."""
    notes = [] if notes is None else notes
    blocks = _blocks(model)
    config = getattr(model, "config", None)
    if blocks is None:
        notes.append(f"no transformer blocks found in {type(model).__name__}: activations not estimated")
        return None
    tokens = batch_size * seq_len
    targets = tokens if target_tokens is None else target_tokens
    weight_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    d = torch.empty((), dtype=compute_dtype or weight_dtype).element_size()
    if gradient_checkpointing is None:
        gradient_checkpointing = _checkpointing(model)

    block = blocks[0]
    linears = {
        n: m for n, m in block.named_modules() if base_kind(m) in ("linear", "conv1d") and not n.endswith(".base")
    }
    adapters = {n: m for n, m in block.named_modules() if isinstance(m, AdapterLayer)}
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model")
    if hidden is None:
        hidden = max(base_shape(m)[1] for m in linears.values())
    heads = _config_int(config, "num_attention_heads", "n_head", default=1)
    kv_heads = _config_int(config, "num_key_value_heads", default=heads)
    head_dim = _config_int(config, "head_dim", default=hidden // heads)
    attn_impl = str(getattr(config, "_attn_implementation", "sdpa") or "sdpa")

    roles: dict[str, str] = {n: _role(n) for n in {**linears, **adapters}}
    layers_of_block = {**linears, **adapters}
    widths = {n: base_shape(m.base if isinstance(m, AdapterLayer) else m)[1] for n, m in layers_of_block.items()}
    inter = _config_int(config, "intermediate_size", "n_inner", "ffn_dim")
    if inter is None:
        inter = max((w for n, w in widths.items() if roles.get(n) == "mlp_out"), default=4 * hidden)
    gated = any(n.endswith("gate_proj") or n.endswith("gate_up_proj") for n in roles)

    per_token = 0.0
    # norms
    for m in block.modules():
        if type(m).__name__.endswith("RMSNorm"):
            per_token += 4 * hidden + 4
        elif isinstance(m, nn.LayerNorm):
            per_token += d * hidden + 8
    # attention
    per_token += d * (2 * heads + 2 * kv_heads) * head_dim + 4 * heads
    if attn_impl == "eager":
        per_token += heads * seq_len * (4 + d) + d * 2 * (heads - kv_heads) * head_dim
    # MLP
    acts = [type(m).__name__ for m in block.modules() if type(m).__name__ in ACTIVATION_SAVES]
    act_saves = ACTIVATION_SAVES[acts[0]] if acts else 2
    fused_mlp = any(is_patched(m) for m in block.modules())
    if fused_mlp:  # GatedMLPFunction: its input (counted below), the gate and up outputs
        per_token += d * 2 * inter
    else:
        per_token += d * inter * (act_saves + 2 if gated else act_saves)
    # adapters: each adapted input once, then per layer its own extras
    adapted_roles = {roles[n] for n in adapters} - ({"mlp_out"} if fused_mlp else set())
    for role in adapted_roles:
        width = next(widths[n] for n in adapters if roles[n] == role)
        per_token += d * width
    unknown = [n for n in adapters if roles[n] is None]
    for name, layer in adapters.items():
        width, out = widths[name], base_shape(layer.base)[0]
        fused = layer.fused and layer.fusable and layer.kind != "conv2d"
        if roles[name] is None:
            per_token += d * width
        if not fused:
            k = 2 * layer.r if isinstance(layer, SDSLayer) else getattr(layer, "r", 0)
            per_token += d * k
        if layer.dropout is not None:
            per_token += width if fused else width * (d + 1)
        if isinstance(layer, DoRALayer) and not (fused and roles[name] == "mlp_in" and layer.base.bias is None):
            per_token += d * out  # its output ŷ (fused, no bias: the MLP keeps the gate and up outputs anyway)
    if unknown:
        notes.append(f"adapted layers of unknown role {unknown[:3]}: each counted as keeping its own input")
    if not acts:
        notes.append("MLP activation not recognised: assumed to save 2 tensors of the MLP width")

    layers = len(blocks)
    if gradient_checkpointing:
        held = layers * d * hidden * tokens
    else:
        held = layers * per_token * tokens
    # outside the blocks: the final norm, the rotary tables, the loss
    held += (4 * hidden + 4) * tokens + 2 * head_dim * d * seq_len
    vocab = _config_int(config, "vocab_size")
    get_head = getattr(model, "get_output_embeddings", None)
    if vocab and callable(get_head) and get_head() is not None:
        if loss_chunk_size:
            held += targets * (d * hidden + 16)
        else:
            held += targets * 4 * vocab  # the causal-LM task's fallback: log-softmax of the target rows
    return int(held)


def estimate_memory(
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    *,
    target_tokens: Optional[int] = None,
    gradient_checkpointing: Optional[bool] = None,
    loss_chunk_size: Optional[int] = None,
    compute_dtype: Optional[torch.dtype] = None,
    optimizer_states: int = 2,
) -> MemoryEstimate:
    """The memory of one training step of ``model`` (adapters injected) on one device, from its shapes (module
    docstring). ``optimizer_states``: tensors the optimiser keeps per trained parameter (AdamW: 2)."""
    notes: list[str] = []
    seen: set[int] = set()
    weights = trainable = n_trainable = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        size = t.numel() * t.element_size()
        if getattr(t, "requires_grad", False) and isinstance(t, nn.Parameter):
            trainable += size
            n_trainable += t.numel()
        else:
            weights += size
    activations = activation_bytes(
        model, batch_size, seq_len, target_tokens=target_tokens, gradient_checkpointing=gradient_checkpointing,
        loss_chunk_size=loss_chunk_size, compute_dtype=compute_dtype, notes=notes,
    )
    transient = 0
    config = getattr(model, "config", None)
    vocab = _config_int(config, "vocab_size")
    if vocab:
        tokens = batch_size * seq_len
        targets = tokens if target_tokens is None else target_tokens
        transient = 8 * vocab * (min(loss_chunk_size, targets) if loss_chunk_size else tokens)
    if gradient_checkpointing or (gradient_checkpointing is None and _checkpointing(model)):
        per_block = activation_bytes(model, batch_size, seq_len, gradient_checkpointing=False, loss_chunk_size=1,
                                     target_tokens=0, compute_dtype=compute_dtype)
        blocks = _blocks(model)
        if per_block is not None and blocks is not None:
            transient += per_block // len(blocks)  # one block's activations while it is recomputed
    return MemoryEstimate(
        weights=weights, trainable=trainable, gradients=trainable, optimizer=optimizer_states * trainable,
        activations=activations, transient=transient, n_trainable=n_trainable, notes=notes,
    )


def available_memory(device: torch.device) -> tuple[Optional[int], str]:
    """(bytes free for this process, what was asked): CUDA's free memory of the device, else the host's
    MemAvailable (/proc/meminfo); (None, why) where neither can be read."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"{device} free"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "host memory available"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "host memory free"
    except (ValueError, OSError, AttributeError):
        return None, "unknown"


__all__ = ["MemoryEstimate", "activation_bytes", "available_memory", "estimate_memory"]
