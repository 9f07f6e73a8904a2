"""Adapter layers (pure torch) and the registry of methods ``AdapterConfig(method=...)`` selects.

A method is a layer class plus a default scaling rule. Adding one is a file with its layer and a
``register_method`` call here, the way timm registers models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .base import SUPPORTED_BASE_TYPES, AdapterLayer, base_kind, base_shape
from .dora import DoRALayer
from .functional import ALLoRAConv2dFunction, DoRAFunction, LoRAFunction, allora_coefficients
from .lora import SCALING_RULES, LoRALayer, scaling_for
from .sds import SDSLayer, export_as_lora


@dataclass(frozen=True)
class AdapterMethod:
    """What ``method=<name>`` builds: the layer class, its default scaling rule, its paper, and its exact form in
    PEFT's LoRA format (``lora_lightning.interop``): "lora" (A, B as they are), "dora" (A, B and the magnitude,
    ``use_dora``), "lora_2r" (the exact rank-2r LoRA of ``export_as_lora``), or None (PEFT cannot express the
    method: export the merged model instead)."""

    layer: type[AdapterLayer]
    scaling: str
    paper: str
    forces_no_dropout: bool = False
    peft: Optional[str] = None
    #: ALLoRA's per-row backward rule on (η = ``AdapterConfig.eta``)
    allora_rule: bool = False


ADAPTER_METHODS: dict[str, AdapterMethod] = {}


def register_method(name: str, method: AdapterMethod) -> None:
    ADAPTER_METHODS[name] = method


register_method("lora", AdapterMethod(LoRALayer, "lora", "Hu et al. 2021, arXiv 2106.09685", peft="lora"))
register_method("rslora", AdapterMethod(LoRALayer, "rslora", "Kalajdzievski 2023, arXiv 2312.03732", peft="lora"))
register_method("lora_alpha", AdapterMethod(LoRALayer, "lora_alpha", "LoRA-α, arXiv 2606.12883", peft="lora"))
register_method(
    "allora",
    AdapterMethod(
        LoRALayer,
        "none",
        "Huang & Balestriero 2024, arXiv 2410.09692",
        forces_no_dropout=True,
        peft="lora",
        allora_rule=True,
    ),
)
register_method("dora", AdapterMethod(DoRALayer, "lora", "Liu et al. 2024, arXiv 2402.09353", peft="dora"))
register_method("sds", AdapterMethod(SDSLayer, "lora", "SDS-LoRA, arXiv 2606.16454", peft="lora_2r"))

__all__ = [
    "ADAPTER_METHODS",
    "ALLoRAConv2dFunction",
    "DoRAFunction",
    "LoRAFunction",
    "SCALING_RULES",
    "SUPPORTED_BASE_TYPES",
    "AdapterLayer",
    "AdapterMethod",
    "DoRALayer",
    "LoRALayer",
    "SDSLayer",
    "allora_coefficients",
    "base_kind",
    "base_shape",
    "export_as_lora",
    "register_method",
    "scaling_for",
]
