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
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from .atomic import complete_directory, write_directory
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


def gathered_adapter_tensors(model: nn.Module) -> dict[str, Tensor]:
    """``adapter_state_dict(model)`` as whole, contiguous CPU copies (FSDP2 shards gathered: a collective, every
    rank must call it). FSDP1's flattened shards are refused."""
    refuse_flat_sharded(model, "save_adapter")
    return {k: full_tensor(v).detach().to("cpu", copy=True).contiguous() for k, v in adapter_state_dict(model).items()}


def check_finite(tensors: dict[str, Tensor], path: Union[str, Path]) -> None:
    """Raise ``ValueError`` naming every tensor that holds NaN/inf: a diverged run must not overwrite a good
    adapter (``allow_nonfinite=True`` on the savers skips this check)."""
    bad = {}
    for k, t in tensors.items():
        if t.is_floating_point() or t.is_complex():
            n = int((~torch.isfinite(t)).sum())
            if n:
                bad[k] = f"{k} ({n} of {t.numel()})"
    if bad:
        names = list(bad.values())
        more = f" (+{len(names) - 5} more)" if len(names) > 5 else ""
        raise ValueError(
            f"refusing to save {path}: {len(bad)} of {len(tensors)} adapter tensors hold NaN/inf values: "
            f"{', '.join(names[:5])}{more}. The run diverged (try a lower learning rate, bf16/fp32 instead of "
            "fp16, or look for a bad data row; NonFiniteGuard stops or skips such steps); the files already at "
            f"{path} are left as they were. Pass allow_nonfinite=True to write them anyway."
        )


def adapter_files(
    tensors: dict[str, Tensor],
    config: AdapterConfig,
    labels: Optional[Sequence[str]] = None,
    base_quantization: Optional[dict] = None,
) -> dict[str, bytes]:
    """The two files of an adapter directory, encoded: weights (safetensors) and config (JSON, with the class
    names by id when ``labels`` are given, and how the base was quantised for a QLoRA adapter — informational:
    the adapter loads on a dense base as well)."""
    meta = {"format": FORMAT, "adapter": config.to_dict()}
    if labels is not None:
        meta["labels"] = [str(name) for name in labels]
    if base_quantization is not None:
        meta["base_quantization"] = base_quantization
    return {
        WEIGHTS_NAME: save(tensors, metadata={"format": FORMAT}),
        CONFIG_NAME: json.dumps(meta, indent=2, sort_keys=True).encode(),
    }


def encoded_adapter(
    model: nn.Module,
    format: str = FORMAT,
    allow_nonfinite: bool = False,
    path: Union[str, Path] = "the adapter",
    labels: Optional[Sequence[str]] = None,
) -> dict[str, bytes]:
    """The files of ``model``'s adapter directory in ``format``, encoded (every rank must call it: FSDP2 shards
    are gathered). NaN/inf tensors are refused (naming ``path``) unless ``allow_nonfinite``."""
    if format not in FORMATS:
        raise ValueError(
            f"unknown adapter format {format!r}; choose one of {', '.join(FORMATS)} "
            "(a merged full model: lora_lightning.interop.export_merged)"
        )
    if format == "peft":
        from .interop import peft_adapter_files

        labels = None if labels is None else list(labels)
        return peft_adapter_files(model, allow_nonfinite=allow_nonfinite, path=path, labels=labels)
    tensors = gathered_adapter_tensors(model)
    if not allow_nonfinite:
        check_finite(tensors, path)
    return adapter_files(tensors, injected_config(model), labels, quantization_record(model))


def save_adapter(
    model: nn.Module,
    path: Union[str, Path],
    format: str = FORMAT,
    labels: Optional[Sequence[str]] = None,
    allow_nonfinite: bool = False,
    verify: bool = False,
) -> Path:
    """Write ``path/adapter_model.safetensors`` and ``path/adapter_config.json``. Returns the directory.

    ``format="lora_lightning"``: method, r, alpha, the scaling rule and the effective scale, exact target names;
    ``labels``: the class names by id of the trained head, read back with ``read_adapter_labels``.
    ``format="peft"``: PEFT's LoRA layout, loadable with ``PeftModel.from_pretrained`` (each method mapped exactly,
    see ``lora_lightning.interop``; a method PEFT cannot express is refused, naming ``export_merged``). PEFT's
    config has no field for class names: ``labels`` go into the safetensors metadata there.

    The directory is replaced as one unit (``lora_lightning.atomic.write_directory``): written complete beside
    the old one, fsynced, swapped in by rename; a kill leaves the old or the new version, and a full disk
    raises an ``OSError`` naming the file and the space needed, with the old version intact. Tensors holding
    NaN/inf are refused (``ValueError``) unless ``allow_nonfinite``. ``verify=True`` reads the files back and
    checks them (``verify_adapter``; our format).

    Under ``torch.distributed`` only global rank 0 writes. Sharded (FSDP2 DTensor) tensors are gathered
    whole first, which is a collective: then every rank must call ``save_adapter`` (rank 0 writes the whole
    tensors, the others wait until the files exist). FSDP1's flattened shards are refused."""
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    path = Path(path)
    files = encoded_adapter(model, format, allow_nonfinite, path, labels)
    if _global_rank() == 0:
        write_directory(path, files)
        if verify:
            for name, data in files.items():  # every file reads back byte for byte
                if (path / name).read_bytes() != data:
                    raise ValueError(f"verify: {path / name} reads back other bytes than were written")
            if format == FORMAT:
                verify_adapter(model, path)
    if sharded:
        torch.distributed.barrier()
    return path


def _probe_input(layer: nn.Module, like: Tensor) -> Tensor:
    g = torch.Generator().manual_seed(0)
    if layer.kind == "conv2d":
        weight = layer.base.weight
        shape = (1, weight.shape[1], *(max(3, k) for k in weight.shape[2:]))
    else:
        shape = (2, layer.in_features)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device=like.device, dtype=like.dtype)


def _fresh(t: Tensor, like: Tensor) -> Tensor:
    return t.to(device=like.device, dtype=like.dtype).clone(memory_format=torch.contiguous_format)


@torch.no_grad()
def verify_adapter(model: nn.Module, path: Union[str, Path], tensors: dict[str, Tensor] | None = None) -> None:
    """Read the adapter at ``path`` back and check it against ``model``: the config equals the injected one,
    every tensor is bit-identical, and every adapter layer gives the same output on a probe input with the
    loaded tensors as with its own (``torch.func.functional_call``, eval mode). Raises ``ValueError`` naming
    the first difference."""
    from torch.func import functional_call

    path = Path(path)
    tensors = gathered_adapter_tensors(model) if tensors is None else tensors
    read_adapter_config(path)  # readable, ours
    saved = json.loads((path / CONFIG_NAME).read_text())["adapter"]
    if saved != json.loads(json.dumps(injected_config(model).to_dict())):
        raise ValueError(f"verify: the config read back from {path / CONFIG_NAME} differs from the model's")
    loaded = read_adapter_tensors(path)
    if set(loaded) != set(tensors):
        raise ValueError(f"verify: {path / WEIGHTS_NAME} holds other tensor names than the model")
    for k, v in tensors.items():
        if loaded[k].dtype != v.dtype or not torch.equal(loaded[k], v):
            raise ValueError(f"verify: tensor {k} read back from {path / WEIGHTS_NAME} differs from the model's")
    for name, layer in adapter_layers(model).items():
        prefix = f"{name}." if name else ""
        own = layer.adapter_state_dict()
        if any(isinstance(v, DTensor) for v in own.values()):
            continue  # a sharded layer cannot run alone; its tensors were compared above
        # both sides as fresh contiguous copies: the same code path, layout and alignment (a tensor read from a
        # file may sit at an unaligned address, where vectorised kernels round differently), caches bypassed
        swap = {k: _fresh(loaded[prefix + k], v) for k, v in own.items()}
        mine = {k: _fresh(v.detach(), v) for k, v in own.items()}
        x = _probe_input(layer, next(iter(own.values())))
        training = layer.training
        layer.eval()
        try:
            want = functional_call(layer, mine, (x,), strict=False)
            got = functional_call(layer, swap, (x,), strict=False)
        finally:
            layer.train(training)
        if not torch.equal(want, got):
            raise ValueError(f"verify: layer {name} gives another output on a probe input with the tensors read back")


def read_adapter_tensors(path: Union[str, Path]) -> dict[str, Tensor]:
    """The tensors of an adapter directory; a truncated or foreign file is named with what is wrong."""
    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: save_adapter(model, {str(path)!r}) writes it")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        size = file.stat().st_size
        raise ValueError(
            f"{file} is incomplete or not a safetensors file ({size} bytes; {err}). It was probably cut short "
            "(an interrupted copy, download or save to a full disk): copy it again or load another version"
        ) from err


def _read_config_json(path: Union[str, Path]) -> dict:
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: save_adapter(model, {str(path)!r}) writes it")
    try:
        return json.loads(file.read_bytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{file} is incomplete or not a JSON adapter config ({err}): copy it again or load another version"
        ) from err


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
    mismatch names the offending tensors.

    If ``path`` is missing because a save was killed between its two renames, the complete version left beside
    it is read (with a warning; see ``lora_lightning.atomic``)."""
    try:
        path = complete_directory(path)
    except FileNotFoundError:
        pass  # _read_config_json names the file and the fix
    if "peft_type" in _read_config_json(path):
        from .interop import load_peft_adapter

        return load_peft_adapter(model, path, verbose=verbose)
    config = read_adapter_config(path)
    prepare_adapters(model, config, path, verbose)
    copy_adapter_state(model, read_adapter_tensors(path), path)
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
