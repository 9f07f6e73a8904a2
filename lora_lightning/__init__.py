"""lora_lightning: LoRA and its research variants for PyTorch Lightning."""

from .adapters import ADAPTER_METHODS, AdapterLayer, LoRALayer, register_method, scaling_for
from .config import AdapterConfig
from .inject import (
    InjectionReport,
    adapter_layers,
    find_task_head,
    inject_adapters,
    merge_adapters,
    unload_adapters,
    unmerge_adapters,
)
from .interop import export_merged
from .state import adapter_state_dict, load_adapter, read_adapter_labels, save_adapter

__version__ = "0.1.0"


def __getattr__(name: str):
    # LoRAModule pulls in Lightning; import it lazily so the pure-torch core stays Lightning-free.
    if name == "LoRAModule":
        from .module import LoRAModule

        return LoRAModule
    raise AttributeError(f"module 'lora_lightning' has no attribute {name!r}")


__all__ = [
    "ADAPTER_METHODS",
    "AdapterConfig",
    "AdapterLayer",
    "InjectionReport",
    "LoRALayer",
    "LoRAModule",
    "adapter_layers",
    "adapter_state_dict",
    "export_merged",
    "find_task_head",
    "inject_adapters",
    "load_adapter",
    "merge_adapters",
    "read_adapter_labels",
    "register_method",
    "save_adapter",
    "scaling_for",
    "unload_adapters",
    "unmerge_adapters",
]
