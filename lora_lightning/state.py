"""Adapter files: safetensors weights + a JSON config. Loading never unpickles. Pure torch.

Two formats: ours (``format="lora_lightning"``: every method as trained, its config with the scaling rule and
scale) and PEFT's LoRA layout (``format="peft"``, see ``lora_lightning.interop``). ``load_adapter`` reads both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import AdapterConfig
from .inject import adapter_layers, inject_adapters, injected_config
from .quantize import quantization_record

from torch.distributed.tensor import DTensor, distribute_tensor  # sharded (FSDP2) parameters

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "lora_lightning"
FORMATS = (FORMAT, "peft")


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor: a DTensor's shards gathered from every rank (a collective: all ranks must call it in
    the same order), a plain tensor as is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def is_flat_sharded(model: nn.Module) -> bool:
    """Whether ``model`` holds FSDP1 flat-parameter shards (its parameters are flattened 1-D pieces)."""
    return any(getattr(p, "_fsdp_flattened", False) for p in model.parameters())


def refuse_flat_sharded(model: nn.Module, what: str) -> None:
    """``what`` needs whole tensors: refuse FSDP1's flattened shards, naming the fix."""
    if is_flat_sharded(model):
        raise RuntimeError(
            f"{what} needs whole tensors, but FSDP1 (FSDPStrategy) keeps them as flattened shards; "
            "shard with FSDP2 (Lightning's ModelParallelStrategy, see lora_lightning.distributed), or save from a "
            "full-state-dict checkpoint loaded into a single-process model"
        )


@contextmanager
def gathered(module: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every sharded (FSDP2 DTensor) parameter of ``module`` and its submodules is a whole
    plain tensor (gathered: a collective, so all ranks must enter in the same order), for reading only; the
    shards go back on exit, unchanged. A no-op without DTensors."""
    swapped = []
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if isinstance(p, DTensor):
                swapped.append((sub, name, p))
                sub._parameters[name] = nn.Parameter(p.full_tensor().detach(), requires_grad=False)
    try:
        yield module
    finally:
        for sub, name, p in swapped:
            sub._parameters[name] = p


def _global_rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Adapter tensors (every layer's parameters and buffers except its frozen base) and the full
    tensors of ``modules_to_save``, keyed by their names in ``model``."""
    config = injected_config(model)
    state = {}
    for name, layer in adapter_layers(model).items():
        state.update({f"{name}.{k}": v for k, v in layer.adapter_state_dict().items()})
    for name in config.modules_to_save:
        state.update({f"{name}.{k}": v for k, v in model.get_submodule(name).state_dict().items()})
    return state


def save_adapter(
    model: nn.Module, path: Union[str, Path], format: str = FORMAT, labels: Optional[Sequence[str]] = None
) -> Path:
    """Write ``path/adapter_model.safetensors`` and ``path/adapter_config.json``. Returns the directory.

    ``format="lora_lightning"``: method, r, alpha, the scaling rule and the effective scale, exact target names;
    ``labels``: the class names by id of the trained head, read back with ``read_adapter_labels``.
    ``format="peft"``: PEFT's LoRA layout, loadable with ``PeftModel.from_pretrained`` (each method mapped exactly,
    see ``lora_lightning.interop``; a method PEFT cannot express is refused, naming ``export_merged``). PEFT's
    config has no field for class names: ``labels`` go into the safetensors metadata there.

    Under ``torch.distributed`` only global rank 0 writes. Sharded (FSDP2 DTensor) tensors are gathered
    whole first, which is a collective: then every rank must call ``save_adapter`` (rank 0 writes the whole
    tensors, the others wait until the files exist). FSDP1's flattened shards are refused."""
    if format not in FORMATS:
        raise ValueError(
            f"unknown adapter format {format!r}; choose one of {', '.join(FORMATS)} "
            "(a merged full model: lora_lightning.interop.export_merged)"
        )
    if format == "peft":
        from .interop import save_peft_adapter

        return save_peft_adapter(model, path, labels=None if labels is None else list(labels))
    refuse_flat_sharded(model, "save_adapter")
    state = adapter_state_dict(model)
    sharded = any(isinstance(v, DTensor) for v in state.values())
    tensors = {k: full_tensor(v).detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    path = Path(path)
    if _global_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": FORMAT})
        meta = {"format": FORMAT, "adapter": injected_config(model).to_dict()}
        quant = quantization_record(model)
        if quant is not None:
            meta["base_quantization"] = quant  # informational: the adapter loads on a dense base as well
        if labels is not None:
            meta["labels"] = [str(name) for name in labels]
        (path / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
    if sharded:
        torch.distributed.barrier()
    return path


def _read_config_json(path: Union[str, Path]) -> dict:
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: save_adapter(model, {str(path)!r}) writes it")
    return json.loads(file.read_text())


def read_adapter_config(path: Union[str, Path]) -> AdapterConfig:
    """The AdapterConfig saved in an adapter directory (ours; PEFT's: ``interop.read_peft_config``)."""
    meta = _read_config_json(path)
    if meta.get("format") != FORMAT:
        kind = f"a PEFT adapter (peft_type={meta['peft_type']!r})" if "peft_type" in meta else "not ours"
        raise ValueError(
            f"{Path(path) / CONFIG_NAME} is {kind}, not a lora_lightning adapter config "
            f"(format={meta.get('format')!r}); load_adapter(model, path) reads both formats"
        )
    return AdapterConfig.from_dict(meta["adapter"])


def read_adapter_labels(path: Union[str, Path]) -> Optional[list[str]]:
    """The class names by id saved with an adapter (``save_adapter(..., labels=...)``); None if none were."""
    return _read_config_json(path).get("labels")


def load_adapter(model: nn.Module, path: Union[str, Path], verbose: bool = False) -> nn.Module:
    """Load an adapter saved by ``save_adapter`` (either format) or by PEFT (``save_pretrained``) into ``model``:
    injects it first into a bare base model, then copies every tensor. Keys and shapes must fit exactly; a
    mismatch names the offending tensors."""
    if "peft_type" in _read_config_json(path):
        from .interop import load_peft_adapter

        return load_peft_adapter(model, path, verbose=verbose)
    config = read_adapter_config(path)
    prepare_adapters(model, config, path, verbose)
    copy_adapter_state(model, load_file(str(Path(path) / WEIGHTS_NAME)), path)
    return model


def prepare_adapters(model: nn.Module, config: AdapterConfig, path: Union[str, Path], verbose: bool) -> None:
    """Inject ``config`` into a bare ``model``, or check that the adapters already there are the same kind."""
    if not adapter_layers(model):
        inject_adapters(model, config, verbose=verbose)
        return
    have = injected_config(model)
    same = (have.method, have.r, have.scaling_rule) == (config.method, config.r, config.scaling_rule)
    if not same or not math.isclose(have.scale, config.scale, rel_tol=1e-9):
        raise ValueError(
            f"model has {have.method} adapters (r={have.r}, scaling={have.scaling_rule}, s={have.scale:.6g}) but "
            f"{path} holds {config.method} (r={config.r}, scaling={config.scaling_rule}, s={config.scale:.6g}); "
            "load into a fresh base model"
        )


def copy_adapter_state(model: nn.Module, loaded: dict[str, Tensor], path: Union[str, Path]) -> None:
    """Copy ``loaded`` (``adapter_state_dict`` names) into the model's adapter tensors; every key and shape must
    fit. DTensors keep this rank's shard of the whole tensor."""
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    wrong = [
        f"{k}: file {tuple(loaded[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(loaded) & set(expected))
        if loaded[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing from file", missing), ("not in model", unexpected), ("shape mismatch", wrong)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label}: {', '.join(items[:5])}{more}")
        raise ValueError(
            f"adapter {path} does not fit this model ({'; '.join(parts)}); "
            "load it into the same base architecture it was trained on"
        )
    with torch.no_grad():
        for k, v in expected.items():
            src = loaded[k].to(v.dtype)
            if isinstance(v, DTensor):  # every rank read the whole file: keep this rank's shard
                src = distribute_tensor(src, v.device_mesh, v.placements, src_data_rank=None)
            v.copy_(src)
