"""QLoRA: keep the frozen linear weights in 4 bits (Dettmers et al. 2023, arXiv 2305.14314). Pure torch + torchao.

Storage (``quantize="nf4"``, torchao's ``NF4Tensor``; QLoRA §3, "4-bit NormalFloat" and "Double Quantization"):

    W0 ≈ c2 · code[q]      q ∈ {0..15}: 4-bit indices into the 16 NF4 levels (quantiles of N(0, 1)),
                           one absmax scale c2 per block of 64 weights, and the c2 themselves quantised
                           to 8 bits with one fp32 scale per group of 256 scales (double quantisation),

i.e. 4 + 8/64 + 32/(64·256) ≈ 4.127 bits a weight: a 1024×1024 matrix takes 0.26× its bf16 bytes. torchao's
NF4Tensor needs whole groups; a weight whose block count 256 does not divide (SmolLM2's 576×576 projections:
5184 blocks) gets the largest group size ≤ 256 that divides it (216 there; ``scaler_group_size``) instead of
staying dense [our choice; QLoRA's paper fixes 256]. Only a weight without such a group of ≥ 32 blocks (or not a
multiple of 64 weights) stays dense.
The matmul dequantises W0 to the compute dtype block by block (``linear_nf4``): y = x·deq(W0)ᵀ; the input
gradient flows through the same dequantised matrix, W0 itself never gets one.

What is quantised: every ``nn.Linear`` whose weight is frozen, the adapted ones under their adapter layers
included. What is not: embeddings, norms, trained modules (a task head) and the ``lm_head`` (its logits are
the most rounding-sensitive; ``quantize_lm_head=True`` quantises it too).

``bnb-nf4`` does the same with bitsandbytes' ``Linear4bit`` (CUDA only; ``pip install bitsandbytes``).

Merging (``dense_weight``) always dequantises first: adding ΔW to 4-bit codes would round most of it away
(the usual "merged QLoRA model answers differently" failure), so a merged layer holds a dense weight.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

QUANTIZE_MODES = ("none", "nf4", "bnb-nf4")
NF4_BLOCK_SIZE = 64  # weights per absmax scale (QLoRA)
NF4_SCALER_BLOCK_SIZE = 256  # scales per second-level scale (double quantisation), at most
NF4_MIN_SCALER_BLOCK_SIZE = 32  # a smaller group would cost > 1/64 bit a weight in fp32 second-level scales


def scaler_group_size(numel: int) -> Optional[int]:
    """The double-quantisation group of a weight with ``numel`` elements: the largest divisor of its block count
    that is ≤ 256 (256 itself for every Llama/Qwen projection), or None when it cannot be stored in NF4."""
    if numel % NF4_BLOCK_SIZE:
        return None
    n_blocks = numel // NF4_BLOCK_SIZE
    for size in range(min(NF4_SCALER_BLOCK_SIZE, n_blocks), NF4_MIN_SCALER_BLOCK_SIZE - 1, -1):
        if n_blocks % size == 0:
            return size
    return None


def _nf4_module():
    try:
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "quantize='nf4' needs torchao (pip install 'lora-lightning[qlora]' or pip install torchao)"
        ) from err
    return nf4_tensor


def _bnb():  # pragma: no cover - CUDA + bitsandbytes only
    try:
        import bitsandbytes
    except ImportError as err:
        raise RuntimeError(
            "quantize='bnb-nf4' needs bitsandbytes: pip install 'lora-lightning[bnb]' (or use quantize='nf4')"
        ) from err
    return bitsandbytes


def nf4_available() -> None:
    """Raise the install hint when torchao (needed for ``quantize="nf4"``) is missing."""
    _nf4_module()


def is_quantized(weight: Tensor) -> bool:
    """True for a 4-bit weight (torchao NF4Tensor, bitsandbytes Params4bit)."""
    return type(weight).__name__ in ("NF4Tensor", "Params4bit")


# The 16 NF4 levels (QLoRA Appendix E), as torchao stores them.
NF4_LEVELS = (
    -1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
    0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0,
)
_CHUNK = 1 << 20


def _nf4_codes(blocks: Tensor, levels: Tensor) -> Tensor:
    """Index of the nearest NF4 level of each absmax-scaled weight, two 4-bit codes per byte.

    torchao compares every weight with all 16 levels (a numel×16 temporary, ~1 µs a weight on CPU); the
    levels are sorted, so the nearest one is a binary search among the 15 midpoints, done in fp32 in
    chunks of 2^20 weights (nearest in exact arithmetic; torchao's bf16 differences can round a near-tie
    the other way, never to a farther level by more than that rounding)."""
    scaled = blocks.flatten()
    mids = ((levels[1:].float() + levels[:-1].float()) / 2).contiguous()
    codes = torch.empty(scaled.numel(), dtype=torch.uint8, device=scaled.device)
    for start in range(0, scaled.numel(), _CHUNK):
        chunk = scaled[start : start + _CHUNK].float()
        codes[start : start + _CHUNK] = torch.bucketize(chunk, mids).to(torch.uint8)
    return codes[::2] << 4 | codes[1::2]


def to_nf4(weight: Tensor) -> Tensor:
    """``weight`` as a torchao NF4Tensor (block 64, double-quantised scales), in ``weight``'s dtype.

    Same storage and scales as torchao's ``to_nf4``; the 4-bit codes come from ``_nf4_codes`` (about 10×
    faster on CPU, and no numel×16 temporary while a checkpoint streams in)."""
    nf4 = _nf4_module()
    w = weight.detach().contiguous()
    group = scaler_group_size(w.numel())
    if w.dim() > 2 or group is None:
        raise ValueError(
            f"NF4 needs a ≤2-D weight made of blocks of {NF4_BLOCK_SIZE} whose count has a divisor between "
            f"{NF4_MIN_SCALER_BLOCK_SIZE} and {NF4_SCALER_BLOCK_SIZE}, got shape {tuple(w.shape)}"
        )
    flat = w.flatten()
    n_blocks = flat.numel() // NF4_BLOCK_SIZE
    levels = torch.tensor(NF4_LEVELS, dtype=w.dtype, device=w.device)
    scalers, factor, mean = nf4.NF4Tensor.double_quantize_scalers(flat, NF4_BLOCK_SIZE, group)
    absmax = nf4.get_block_absmax(flat, NF4_BLOCK_SIZE)
    codes = _nf4_codes(flat.view(n_blocks, NF4_BLOCK_SIZE) / absmax[:, None], levels)
    meta = nf4.SubclassTensorArgs(w.size(), w.stride(), w.storage_offset(), w.dtype, w.device, False)
    return nf4.NF4Tensor(meta, NF4_BLOCK_SIZE, n_blocks, group, scalers, factor, mean, codes, nf4=levels)


def compute_dtype(weight: Tensor) -> torch.dtype:
    """The dtype a weight computes in: a 4-bit weight's dequantised dtype, else its own."""
    if type(weight).__name__ == "Params4bit":  # pragma: no cover - CUDA + bitsandbytes only
        return weight.quant_state.dtype
    return weight.dtype


def storage_key(weight: Tensor) -> tuple:
    """Identifies a weight's current contents (storage pointer, version counter): for an NF4Tensor those of its
    4-bit codes, whose wrapper has no storage of its own. Caches of values derived from a frozen W0 key on it."""
    data = weight.quantized_data if type(weight).__name__ == "NF4Tensor" else weight
    return data.data_ptr(), data._version, weight.device, compute_dtype(weight)


def _dequantize_nf4(weight: Tensor) -> Tensor:
    """torchao's ``get_original_weight``, bit for bit (level × block scale in the tensor's dtype), with less
    temporary memory (one int32 index per byte instead of two int64 per weight) and one gather: a 256×2 table
    maps each byte to its two levels (high nibble = even element, low = odd, torchao's packing)."""
    if not weight.is_contiguous():  # a transposed view (``.t()``)
        return _dequantize_nf4(weight.t()).t()
    levels = weight.nf4.to(weight.dtype)
    pairs = torch.stack((levels.repeat_interleave(16), levels.repeat(16)), dim=1)  # byte b → (lv[b>>4], lv[b&15])
    values = pairs.index_select(0, weight.quantized_data.flatten().int())
    scalers = weight.dequantize_scalers(weight.quantized_scalers, weight.quantization_factor, weight.scaler_block_size)
    return values.view(-1, weight.block_size).mul_(scalers[:, None]).view(weight.shape)


def dequantize(weight: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A dense copy of a 4-bit weight (a plain weight is returned as it is, cast to ``dtype`` if given)."""
    name = type(weight).__name__
    if name == "NF4Tensor":
        dense = _dequantize_nf4(weight)
    elif name == "Params4bit":  # pragma: no cover - CUDA + bitsandbytes only
        dense = _bnb().functional.dequantize_4bit(weight.data, weight.quant_state)
    else:
        dense = weight.detach() if isinstance(weight, nn.Parameter) else weight
    return dense if dtype is None else dense.to(dtype)


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


class Linear4bitFunction(torch.autograd.Function):
    """y = x·deq(W)ᵀ for a 4-bit W that gets no gradient: W is dequantised in forward, used, dropped, and
    dequantised again in backward for ∂L/∂x = g·deq(W) (only the 4-bit W is kept; torchao's ``linear_nf4`` does
    the same). Under autocast the matmuls run in the autocast dtype."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        dtype = _autocast_dtype(x.device.type) or x.dtype
        ctx.save_for_backward(weight)
        ctx.dtype = dtype
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.linear(x.to(dtype), dequantize(weight, dtype))

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            return grad.to(ctx.dtype) @ dequantize(weight, ctx.dtype), None


def linear_4bit(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear(x, W, b)`` that also takes a 4-bit W (dequantised per call, never kept: ``Linear4bitFunction``;
    bitsandbytes: its ``matmul_4bit``). The input gradient flows through the 4-bit matmul."""
    name = type(weight).__name__
    if name == "NF4Tensor":
        out = Linear4bitFunction.apply(x, weight)
    elif name == "Params4bit":  # pragma: no cover - CUDA + bitsandbytes only
        out = _bnb().matmul_4bit(x, weight.t(), quant_state=weight.quant_state)
    else:
        return torch.nn.functional.linear(x, weight, bias)
    return out if bias is None else out + bias.to(out.dtype)


def dense_weight(module: nn.Module) -> Tensor:
    """``module.weight``, made dense in place if it was 4-bit (needed before merging into it)."""
    weight = module.weight
    if is_quantized(weight):
        dense = dequantize(weight)
        if type(module).__name__ == "Linear4bit":  # pragma: no cover - bitsandbytes only
            raise RuntimeError("merging into a bitsandbytes Linear4bit is not supported: use export_merged")
        module.weight = nn.Parameter(dense, requires_grad=False)
    return module.weight


def weight_bytes(weight: Tensor) -> int:
    """Bytes a weight occupies (every inner tensor of a quantised one)."""
    if type(weight).__name__ == "NF4Tensor":
        inner = (weight.quantized_data, weight.quantized_scalers, weight.quantization_factor, weight.scaler_mean)
        inner += (weight.nf4,)
        return sum(t.numel() * t.element_size() for t in inner)
    return weight.numel() * weight.element_size()


@dataclass
class QuantizationReport:
    """What ``quantize_model`` did."""

    mode: str
    quantized: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # frozen linears left in the compute dtype (lm_head ...)
    quantized_bytes: int = 0
    dense_bytes: int = 0  # what the quantised layers took before

    def __str__(self) -> str:
        if self.mode == "none":
            return "quantize: none"
        ratio = self.quantized_bytes / max(self.dense_bytes, 1)
        names = ", ".join(self.kept[:4]) + (f" (+{len(self.kept) - 4} more)" if len(self.kept) > 4 else "")
        kept = f"; kept dense: {names}" if self.kept else ""
        return (
            f"quantize: {self.mode} on {len(self.quantized)} linear layers, "
            f"{self.dense_bytes / 2**20:.1f} MiB → {self.quantized_bytes / 2**20:.1f} MiB ({ratio:.3f}×){kept}"
        )


def describe(model: nn.Module, mode: str) -> QuantizationReport:
    """The 4-bit state of ``model`` now: its 4-bit linears (bytes, and their bytes in the compute dtype) and the
    frozen linears kept dense (whichever way they got there: ``quantize_model`` or ``load_quantized``)."""
    report = QuantizationReport(mode)
    if mode == "none":
        return report
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or weight is None:
            continue
        if is_quantized(weight):
            report.quantized.append(name)
            report.quantized_bytes += weight_bytes(weight)
            report.dense_bytes += weight.numel() * torch.empty(0, dtype=compute_dtype(weight)).element_size()
        elif not weight.requires_grad:
            report.kept.append(name.removesuffix(".base"))
    return report


def _unquantizable(model: nn.Module) -> list[str]:
    """Frozen 2-D weight layers of kinds we cannot store in 4 bits (GPT-2's Conv1D, ...)."""
    return [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D" and hasattr(m, "nf")]


def lm_head_names(model: nn.Module) -> set[str]:
    """The output-embedding layer's name (transformers' ``get_output_embeddings``), if any."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return {n for n, m in model.named_modules() if head is not None and m is head}


def quantizable_linears(model: nn.Module, quantize_lm_head: bool = False) -> tuple[list[str], list[str]]:
    """(names to quantise, frozen linears kept dense). Every ``nn.Linear`` but the trained ones: before
    ``inject_adapters`` that is all but the task head (a new classifier / ``score`` trains in full), after it
    every frozen one. The lm_head stays dense unless ``quantize_lm_head`` (and always when it is tied to the input
    embeddings, which stay dense); so does a layer NF4 cannot store (``scaler_group_size`` is None)."""
    from .inject import adapter_layers, find_task_head  # inject → adapters → quantize: import late

    injected = bool(adapter_layers(model))
    heads = set(find_task_head(model))
    lm_head = lm_head_names(model)
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    chosen, kept = [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or is_quantized(module.weight):
            continue
        if (injected and module.weight.requires_grad) or (name in heads - lm_head):
            continue
        if name in lm_head and (not quantize_lm_head or uses[id(module.weight)] > 1):  # tied: the embedding's too
            kept.append(name)
        elif scaler_group_size(module.weight.numel()) is None:
            kept.append(name)
        else:
            chosen.append(name)
    return chosen, kept


def check_mode(mode: str) -> None:
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize={mode!r}: choose one of {', '.join(QUANTIZE_MODES)}")
    if mode == "bnb-nf4":
        if not torch.cuda.is_available():
            raise RuntimeError("quantize='bnb-nf4' needs a CUDA device (bitsandbytes); on CPU use quantize='nf4'")
        _bnb()


def _quantize_bnb(module: nn.Linear) -> nn.Module:  # pragma: no cover - CUDA + bitsandbytes only
    bnb = _bnb()
    q = bnb.nn.Linear4bit(
        module.in_features,
        module.out_features,
        bias=module.bias is not None,
        compute_dtype=module.weight.dtype,
        quant_type="nf4",
        compress_statistics=True,
    )
    q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True)
    if module.bias is not None:
        q.bias = nn.Parameter(module.bias.data, requires_grad=False)
    return q.to("cuda")


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str = "nf4", quantize_lm_head: bool = False) -> QuantizationReport:
    """Store every frozen ``nn.Linear`` of ``model`` in 4 bits, in place (see module docstring).

    Call it before or after ``inject_adapters``: an adapter's frozen base layer is an ``nn.Linear`` like
    any other. Raises a clear error for frozen layer kinds that cannot be quantised (GPT-2's ``Conv1D``).

    A DoRA layer whose base gets quantised keeps its row scale m/n: n = ‖W0 + s·B·A‖ changes with W0's rounding,
    so m is multiplied by n_4bit / n_dense. Right after injection (m = n) that is QDoRA's init, m = the row
    norm of the dequantised W0, so the model starts exactly at the 4-bit base model [our choice of how to carry
    a trained m over].
    """
    check_mode(mode)
    report = QuantizationReport(mode)
    if mode == "none":
        return report
    bad = _unquantizable(model)
    if bad:
        raise TypeError(
            f"quantize={mode!r} stores nn.Linear layers in 4 bits; this model's {', '.join(bad[:4])}"
            f"{f' (+{len(bad) - 4} more)' if len(bad) > 4 else ''} are transformers Conv1D layers (GPT-2 style), "
            "which it cannot quantise: use quantize='none' for this model, or a Llama/Qwen-style model"
        )
    chosen, report.kept = quantizable_linears(model, quantize_lm_head)
    dora = _dora_layers_by_base(model, chosen)
    norms = {name: layer.weight_norm() for name, layer in dora.items()}
    for name in chosen:
        module = model.get_submodule(name)
        report.dense_bytes += weight_bytes(module.weight)
        if mode == "nf4":
            module.weight = nn.Parameter(to_nf4(module.weight), requires_grad=False)
            report.quantized_bytes += weight_bytes(module.weight)
        else:  # pragma: no cover - CUDA + bitsandbytes only
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _quantize_bnb(module))
            report.quantized_bytes += module.weight.numel() // 2
        report.quantized.append(name)
    for name, layer in dora.items():
        layer.clear_norm_cache()
        ratio = layer.weight_norm() / norms[name]
        layer.magnitude.mul_(ratio.to(layer.magnitude.dtype))
    return report


def _dora_layers_by_base(model: nn.Module, bases: list[str]) -> dict:
    """{base name: DoRA layer} for the DoRA layers whose base layer is among ``bases``."""
    from .adapters import DoRALayer
    from .inject import adapter_layers

    chosen = set(bases)
    return {
        f"{name}.base": layer
        for name, layer in adapter_layers(model).items()
        if isinstance(layer, DoRALayer) and f"{name}.base" in chosen
    }


def quantization_record(model: nn.Module) -> Optional[dict]:
    """What an adapter file records about a 4-bit base (None for a dense one): our storage, and the
    ``BitsAndBytesConfig`` that loads the same base in 4 bits for PEFT + transformers (PEFT's adapter_config.json
    has no field for it; the adapter tensors themselves are plain LoRA). bitsandbytes' NF4 has the same 16
    levels, 64-weight blocks and 256-scale double-quantisation groups; its 8-bit code for the scales differs, so
    W0 rounds almost, not bit for bit, the same."""
    weights = [(n, p) for n, p in model.named_parameters() if is_quantized(p)]
    if not weights:
        return None
    library = "bitsandbytes" if type(weights[0][1]).__name__ == "Params4bit" else "torchao"
    dtype = str(compute_dtype(weights[0][1])).removeprefix("torch.")
    kept = [n for n in lm_head_names(model) if not is_quantized(model.get_submodule(n).weight)]
    return {
        "method": "nf4",
        "library": library,
        "block_size": NF4_BLOCK_SIZE,
        "double_quant": True,
        "scaler_block_size": NF4_SCALER_BLOCK_SIZE,  # at most; see scaler_group_size
        "compute_dtype": dtype,
        "quantized_weights": len(weights),
        "bitsandbytes_config": {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": dtype,
            "llm_int8_skip_modules": [k.rpartition(".")[2] for k in kept] or None,
        },
    }


def ignore_4bit_in_ddp(module: nn.Module) -> list[str]:
    """Keep ``module``'s 4-bit weights out of DDP's start-up broadcast of parameters (returns their names).

    DDP copies rank 0's parameters to every rank through flat dense buffers; an NF4Tensor comes back from that
    round trip dequantised and re-quantised (torchao's ``copy_`` of a dense tensor), so W0 changes on every rank
    alike: the ranks agree with each other but not with one process (measured on the tiny test Llama: adapter
    weights off by as much as they moved in 3 steps). Every rank builds the same frozen weights (same seed /
    checkpoint), so nothing needs broadcasting. Call it on the module DDP wraps (Lightning:
    the LightningModule) before the strategy sets up; ``LoRAModule.configure_model`` does."""
    names = [n for n, p in module.named_parameters() if is_quantized(p)]
    ignored = set(getattr(module, "_ddp_params_and_buffers_to_ignore", ())) | set(names)
    module._ddp_params_and_buffers_to_ignore = sorted(ignored)
    return names


@contextmanager
def kept_4bit(module: nn.Module, fn) -> Iterator[None]:
    """Inside the block, ``nn.Module._apply`` does not see the 4-bit weights of ``module``; on exit each is put
    back, moved to the device ``fn`` sends tensors to (as 4 bits). torchao's NF4Tensor answers ``.to(dtype)`` with
    a dense copy, so without this a dtype cast of the model (``model.to(torch.bfloat16)``, ``.half()``,
    Lightning's "bf16-true" ``convert_module``) would silently dequantise every frozen weight.
    ``LoRAModule._apply`` uses it; in your own LightningModule override ``_apply`` the same way."""
    held = [
        (m, name, p) for m in module.modules() for name, p in m._parameters.items() if p is not None and is_quantized(p)
    ]
    for m, name, _ in held:
        m._parameters[name] = None
    try:
        yield
    finally:
        for m, name, p in held:
            device = fn(torch.empty(0, device=p.device)).device
            m._parameters[name] = p if device == p.device else nn.Parameter(p.to(device), requires_grad=False)


# -- loading without ever holding the whole model in 16 bits --------------------------------------------


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside is moved to the meta device as it is created (buffers stay real),
    so building a model allocates at most one layer's weights at a time."""
    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        register(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(
        f"{folder} has no model.safetensors(.index.json): quantised loading streams safetensors weights; "
        "re-save the model with save_pretrained(safe_serialization=True)"
    )


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _read_safetensors(file: Path) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) for each tensor of a safetensors file, read one at a time with plain file reads.

    safetensors' own loader memory-maps the file, and every page it touches then counts in the process's
    resident memory until the map closes: the whole 16-bit model at the end. Reading each tensor into its
    own buffer keeps the peak at one tensor. The layout is safetensors' documented one: an 8-byte
    little-endian header size, a JSON header {name: {dtype, shape, data_offsets}}, then the data."""
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ValueError(f"{file}: tensor {name!r} has dtype {info['dtype']}, which quantised loading does not read")
            buffer = bytearray(end - begin)
            f.seek(8 + size + begin)
            f.readinto(buffer)
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
            yield name, tensor.reshape(info["shape"])


def _set_tensor(model: nn.Module, name: str, value: Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


@torch.no_grad()
def load_quantized(
    model_class,
    path: str,
    dtype: torch.dtype = torch.bfloat16,
    mode: str = "nf4",
    quantize_lm_head: bool = False,
    **config_kwargs,
) -> tuple[nn.Module, QuantizationReport]:
    """``model_class.from_pretrained(path)`` with every frozen linear stored in NF4 as its weights arrive.

    The model is built with its parameters on the meta device, then the safetensors files are streamed
    tensor by tensor: a linear weight is quantised the moment it is read, everything else is cast to
    ``dtype``. Peak memory ≈ the quantised model + one tensor, never the 16-bit model (checked by
    ``tests/test_quantize.py`` with peak RSS). ``model_class`` is an ``AutoModelFor…`` class.
    """
    from transformers import AutoConfig

    if mode != "nf4":
        raise ValueError(f"streaming quantised loading supports mode='nf4' (got {mode!r})")
    folder = Path(path)
    config = AutoConfig.from_pretrained(path, **config_kwargs)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with _parameters_on_meta():
            model = model_class.from_config(config)
    finally:
        torch.set_default_dtype(default)
    for p in model.parameters():
        p.requires_grad_(False)
    if _unquantizable(model):
        quantize_model(model, mode)  # raises the Conv1D error
    names, kept = quantizable_linears(model, quantize_lm_head)
    report = QuantizationReport(mode, kept=kept)
    wanted = {f"{n}.weight" for n in names}
    loaded: set[str] = set()
    state_names = set(dict(model.named_parameters(remove_duplicate=False))) | set(dict(model.named_buffers()))
    for file in _safetensors_files(folder):
        for key, tensor in _read_safetensors(file):
            name = key if key in state_names else _strip_prefix(key, state_names)
            if name is None:
                continue
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
            if name in wanted:
                report.dense_bytes += tensor.numel() * tensor.element_size()
                tensor = to_nf4(tensor)
                report.quantized_bytes += weight_bytes(tensor)
                report.quantized.append(name[: -len(".weight")])
            else:
                tensor = tensor.clone()  # own its memory (frombuffer shares the read buffer)
            _set_tensor(model, name, tensor)
            loaded.add(name)
            del tensor
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if (folder / "generation_config.json").exists() and getattr(model, "generation_config", None) is not None:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ValueError(
            f"{path}: the checkpoint has no weights for {', '.join(missing[:5])}"
            f"{f' (+{len(missing) - 5} more)' if len(missing) > 5 else ''}; it does not match {model_class.__name__}"
        )
    model.eval()
    return model, report


def _strip_prefix(key: str, names: set[str]) -> Optional[str]:
    """Checkpoint keys saved from a base model ("model.layers.0…") or with a prefix our model lacks."""
    for candidate in (key.partition(".")[2], f"model.{key}"):
        if candidate in names:
            return candidate
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if os.name == "posix" else 0


__all__ = [
    "QUANTIZE_MODES",
    "Linear4bitFunction",
    "compute_dtype",
    "linear_4bit",
    "storage_key",
    "QuantizationReport",
    "dense_weight",
    "describe",
    "kept_4bit",
    "dequantize",
    "ignore_4bit_in_ddp",
    "is_quantized",
    "load_quantized",
    "quantization_record",
    "quantize_model",
    "scaler_group_size",
    "to_nf4",
    "weight_bytes",
]
