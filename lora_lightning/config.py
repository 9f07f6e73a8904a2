"""AdapterConfig: which adapter, where, and how; validates itself and names the fix on bad input."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

import torch

from .adapters import ADAPTER_METHODS, SCALING_RULES, scaling_for
from .adapters.lora import INITS


DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
    "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "fp64": torch.float64,
    "float64": torch.float64,
}


def parse_dtype(name: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    """"bf16" / "bfloat16" / "fp16" / "float16" / "fp32" / "float32" (/ "fp64") → the torch dtype; None → None."""
    if name is None:
        return None
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of: bf16, fp16, fp32 (or bfloat16, float16, float32)")
    return DTYPES[key]


def _did_you_mean(value: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(value, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass
class AdapterConfig:
    """Adapter choice and placement.

    Args:
        method: "lora", "rslora", "lora_alpha", "allora" (and every method registered in
            ``lora_lightning.adapters.ADAPTER_METHODS``).
        r: rank (1 ≤ r ≤ min(in, out) of every adapted layer).
        alpha: α of the "lora" (s = α/r) and "rslora" (s = α/√r) scaling rules.
        C: LoRA-α's coefficient: α = C·√r, so s = C/√r.
        scaling: override the method's scaling rule ("lora", "rslora", "lora_alpha", "none").
        dropout: dropout probability on the adapter input.
        target_modules: "all-linear" (every Linear/Conv1D except the task head), a list of module
            names or name suffixes ("query" matches "encoder.layer.0.attention.self.query"), or one
            regex string matched against full names.
        exclude_modules: names/suffixes (or one regex) never adapted.
        modules_to_save: modules trained in full and saved with the adapter; None = the task head
            detected on the model (classifier / score / timm ``get_classifier()`` ...), never a language
            model's ``lm_head`` (pretrained, often tied to the input embeddings); [] = none.
        init: A's init, "kaiming" (PEFT default) or "gaussian".
        init_b_std: B ~ N(0, init_b_std²) instead of zeros (loss-landscape experiments).
        dtype: dtype of the adapter tensors ("float32", "bfloat16", "float16"); None = the base layer's.
            "float32" over a bf16/fp16 base keeps the trained factors (and so AdamW's moments) in fp32 while
            the frozen base stays small; the layer casts its input up and its output back.
        eta: ALLoRA's η (method "allora"): the per-row gradient coefficient c_i = 1/√(‖(BA)_i‖ + 1/η²)
            starts at η (arXiv 2410.09692 §4.2; η = 2 in its listing, η² ∈ {1, 2, 4} in its sweeps).
        fused: run Linear / Conv1D adapter layers as one autograd Function that keeps only the input for
            backward (``adapters/functional.py``); False keeps the plain autograd path (for debugging).
        fused_mlp: with ``fused``, run Llama/Qwen-style gated MLPs whose gate/up/down projections are all
            adapted as one Function keeping x, gate and up outputs only (``adapters/gated_mlp.py``).
    """

    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    C: float = 256.0
    scaling: Optional[str] = None
    dropout: float = 0.0
    target_modules: Union[str, list[str]] = "all-linear"
    exclude_modules: Union[str, list[str]] = field(default_factory=list)
    modules_to_save: Optional[list[str]] = None
    init: str = "kaiming"
    init_b_std: float = 0.0
    dtype: Optional[str] = None
    eta: float = 2.0
    fused: bool = True
    fused_mlp: bool = True

    def __post_init__(self) -> None:
        methods = sorted(ADAPTER_METHODS)
        if self.method not in ADAPTER_METHODS:
            raise ValueError(
                f"unknown adapter method {self.method!r}{_did_you_mean(self.method, methods)}; "
                f"choose one of: {', '.join(methods)}"
            )
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer (got {self.r!r}); typical values are 4, 8, 16")
        if self.scaling is not None and self.scaling not in SCALING_RULES:
            raise ValueError(
                f"unknown scaling rule {self.scaling!r}{_did_you_mean(self.scaling, list(SCALING_RULES))}; "
                f"choose one of: {', '.join(SCALING_RULES)}"
            )
        if self.alpha <= 0 or self.C <= 0:
            raise ValueError(f"alpha and C must be > 0 (got alpha={self.alpha}, C={self.C})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1) (got {self.dropout})")
        if self.dropout > 0 and ADAPTER_METHODS[self.method].forces_no_dropout:
            raise ValueError(
                f"method {self.method!r} trains without adapter dropout by definition; "
                f"set dropout: 0.0 (got {self.dropout}) or use method 'lora'"
            )
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; choose one of: {', '.join(INITS)}")
        if self.init_b_std < 0:
            raise ValueError(f"init_b_std must be ≥ 0 (got {self.init_b_std}); 0 means B = 0 at init")
        parse_dtype(self.dtype)  # names the choices on a typo
        if not self.eta > 0:
            raise ValueError(f"eta must be > 0 (got {self.eta}); ALLoRA's paper uses η = 2 (η² ∈ {{1, 2, 4}})")
        if not self.target_modules:
            raise ValueError('target_modules is empty; give module names, a regex, or "all-linear"')

    @property
    def torch_dtype(self) -> Optional[torch.dtype]:
        """``dtype`` as a torch dtype (None: follow the base layer)."""
        return parse_dtype(self.dtype)

    @property
    def scaling_rule(self) -> str:
        """The scaling rule in force: the explicit ``scaling`` or the method's default."""
        return self.scaling or ADAPTER_METHODS[self.method].scaling

    @property
    def allora_eta(self) -> Optional[float]:
        """η of ALLoRA's backward rule for this method's layers, or None when the method does not use it."""
        return self.eta if ADAPTER_METHODS[self.method].allora_rule else None

    @property
    def scale(self) -> float:
        """The effective scale s of ΔW = s·B·A."""
        return scaling_for(self.scaling_rule, self.r, self.alpha, self.C)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, with the scaling rule and effective scale written out."""
        return {**asdict(self), "scaling_rule": self.scaling_rule, "scale": self.scale}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        """Inverse of ``to_dict`` (derived keys are ignored; unknown keys are an error)."""
        known = {f.name for f in fields(cls)}
        data = dict(data)
        rule = data.pop("scaling_rule", None)
        data.pop("scale", None)
        if data.get("scaling") is None and rule is not None:
            data["scaling"] = rule  # pin the convention the adapter was trained with
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AdapterConfig keys {unknown}; valid keys: {sorted(known)}")
        return cls(**data)
