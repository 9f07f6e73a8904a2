"""Put adapters into any ``nn.Module``, find them again, freeze the rest, merge and unmerge, take them out
again. Pure torch."""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Union

from torch import nn

from .adapters import ADAPTER_METHODS, SUPPORTED_BASE_TYPES, AdapterLayer, base_kind, base_shape
from .adapters.gated_mlp import patch_gated_mlps
from .config import AdapterConfig

HEAD_NAMES = ("classifier", "score", "lm_head", "head", "fc")
CONFIG_ATTR = "_lora_lightning_config"


@dataclass
class InjectionReport:
    """What ``inject_adapters`` did."""

    method: str
    scale: float
    adapted: list[str]
    modules_to_save: list[str]
    trainable_params: int
    total_params: int
    fused_mlps: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        saved = ", ".join(self.modules_to_save) or "none"
        fused = f"; {len(self.fused_mlps)} gated MLPs fused" if self.fused_mlps else ""
        return (
            f"lora_lightning: {self.method} (s={self.scale:.4g}) on {len(self.adapted)} layers{fused}; "
            f"trained in full: {saved}\n"
            f"trainable params: {self.trainable_params:,} / {self.total_params:,} ({pct:.3f}%)"
        )


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapter layer in ``model``, by qualified name (works on any module, Lightning or not)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def find_task_head(model: nn.Module) -> list[str]:
    """Names of the task head: timm's ``get_classifier()``, transformers' output embeddings, or a top-level
    child called classifier / score / lm_head / head / fc."""
    by_id = {id(m): name for name, m in model.named_modules() if name}
    heads: list[str] = []
    for getter in ("get_classifier", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        if callable(fn):
            try:
                head = fn()
            except Exception:  # noqa: BLE001 - a model may define the getter but not support it
                head = None
            if isinstance(head, nn.Module) and id(head) in by_id:
                heads.append(by_id[id(head)])
    heads += [n for n, _ in model.named_children() if n in HEAD_NAMES]
    return list(dict.fromkeys(heads))


def output_embedding_names(model: nn.Module) -> list[str]:
    """Names of transformers' output embeddings (``get_output_embeddings()``: a language model's ``lm_head``,
    often tied to the input embeddings). A pretrained vocabulary projection, never a new head: it is excluded
    from ``all-linear`` and NOT trained in full by default."""
    fn = getattr(model, "get_output_embeddings", None)
    if not callable(fn):
        return []
    try:
        head = fn()
    except Exception:  # noqa: BLE001 - a model may define the getter but not support it
        return []
    return [name for name, m in model.named_modules() if name and head is not None and m is head]


def _matcher(spec: Union[str, list[str]]):
    """A predicate on qualified names: a list matches names or dotted suffixes; a string is a regex."""
    if isinstance(spec, str):
        pattern = re.compile(spec)
        return lambda name: pattern.fullmatch(name) is not None
    targets = tuple(spec)
    return lambda name: any(name == t or name.endswith("." + t) for t in targets)


def _inside(name: str, parents: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in parents)


def _nearest(wanted: Union[str, list[str]], names: list[str]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    queries = [wanted] if isinstance(wanted, str) else list(wanted)
    close = []
    for q in queries:
        close += difflib.get_close_matches(q.rsplit(".", 1)[-1], leaves, n=3, cutoff=0.4)
    close = list(dict.fromkeys(close)) or leaves[:8]
    return ", ".join(close)


def _resolve_targets(model: nn.Module, config: AdapterConfig, heads: list[str]) -> list[str]:
    named = [(n, m) for n, m in model.named_modules() if n]
    adaptable = [n for n, m in named if base_kind(m) is not None]
    excluded = _matcher(config.exclude_modules) if config.exclude_modules else (lambda name: False)

    if config.target_modules == "all-linear":
        chosen = [
            n for n, m in named if base_kind(m) in ("linear", "conv1d") and not _inside(n, heads) and not excluded(n)
        ]
    else:
        match = _matcher(config.target_modules)
        matched = [(n, m) for n, m in named if match(n) and not excluded(n)]
        unsupported = [(n, m) for n, m in matched if base_kind(m) is None]
        if unsupported:
            n, m = unsupported[0]
            inner = [a[len(n) + 1 :] for a in adaptable if a.startswith(n + ".")]
            hint = (
                f"its adaptable sub-layers are {', '.join(inner[:8])}: target those"
                if inner
                else "add it to exclude_modules or narrow target_modules"
            )
            others = f" (and {len(unsupported) - 1} more)" if len(unsupported) > 1 else ""
            raise TypeError(
                f"target_modules={config.target_modules!r} matched {n!r}{others}, a {type(m).__name__}, "
                f"which adapters cannot wrap (supported: {SUPPORTED_BASE_TYPES}); {hint}"
            )
        chosen = [n for n, _ in matched]
    if not chosen:
        raise ValueError(
            f"no module matched target_modules={config.target_modules!r}"
            f"{f' (exclude_modules={config.exclude_modules!r})' if config.exclude_modules else ''}; "
            f"nearest adaptable layer names in this model: {_nearest(config.target_modules, adaptable)}"
        )
    return chosen


def _validate_modules_to_save(model: nn.Module, wanted: list[str]) -> list[str]:
    names = [n for n, _ in model.named_modules() if n]
    resolved = []
    for w in wanted:
        hits = [n for n in names if n == w or n.endswith("." + w)]
        if not hits:
            raise ValueError(f"modules_to_save entry {w!r} matches no module; nearest names: {_nearest(w, names)}")
        resolved += [h for h in hits if not _inside(h, resolved)]
    return resolved


def inject_adapters(model: nn.Module, config: AdapterConfig, verbose: bool = True) -> InjectionReport:
    """Wrap the target layers of ``model`` in place with ``config.method``'s adapter layer, freeze every
    other parameter except ``modules_to_save``, and return (and print) what was done."""
    if adapter_layers(model):
        raise ValueError(
            "model already has adapters; build a fresh base model, or use load_adapter() to load weights "
            "into the existing adapters"
        )
    heads = find_task_head(model)
    default_saved = [h for h in heads if h not in output_embedding_names(model)]  # a new head, not lm_head
    saved = _validate_modules_to_save(model, default_saved if config.modules_to_save is None else config.modules_to_save)
    targets = _resolve_targets(model, config, heads)
    for name in targets:
        if _inside(name, saved):
            raise ValueError(
                f"{name!r} is both an adapter target and inside modules_to_save; exclude it from one of them"
            )
    method = ADAPTER_METHODS[config.method]
    for name in targets:
        base = model.get_submodule(name)
        out_f, in_f = base_shape(base)
        if config.r > min(out_f, in_f):
            raise ValueError(
                f"r={config.r} exceeds min(in, out)={min(out_f, in_f)} of {name!r} "
                f"({type(base).__name__} {in_f}→{out_f}); use r ≤ {min(out_f, in_f)} or add it to exclude_modules"
            )
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        _set_submodule(model, name, method.layer.from_config(model.get_submodule(name), config))
    for name in saved:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)

    fused_mlps = patch_gated_mlps(model) if config.fused and config.fused_mlp else []
    resolved = dataclasses.replace(config, target_modules=list(targets), modules_to_save=list(saved))
    object.__setattr__(model, CONFIG_ATTR, resolved)  # a plain attribute, not a submodule
    report = InjectionReport(
        method=config.method,
        scale=config.scale,
        adapted=list(targets),
        modules_to_save=list(saved),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()),
        fused_mlps=fused_mlps,
    )
    if verbose:
        print(report)
    return report


def injected_config(model: nn.Module) -> AdapterConfig:
    """The resolved AdapterConfig (exact target and saved-module names) recorded by ``inject_adapters``."""
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ValueError("model has no adapters injected by lora_lightning; call inject_adapters(model, config) first")
    return config


def _refuse_sharded(model: nn.Module, action: str) -> None:
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        raise RuntimeError(
            f"{action} on a sharded (FSDP2) model needs the whole weights on every rank: call "
            f"lora_lightning.distributed.merge_sharded(model{', unmerge=True' if action == 'unmerge' else ''}) "
            "on every rank instead"
        )


def merge_adapters(model: nn.Module) -> int:
    """Fold every adapter into its base weight (W0 ← W0 + ΔW). Returns how many layers were merged."""
    _refuse_sharded(model, "merge")
    layers = adapter_layers(model)
    for layer in layers.values():
        layer.merge()
    return len(layers)


def unmerge_adapters(model: nn.Module) -> int:
    """Undo ``merge_adapters`` (W0 ← W0 − ΔW). Returns how many layers were unmerged."""
    _refuse_sharded(model, "unmerge")
    layers = adapter_layers(model)
    for layer in layers.values():
        layer.unmerge()
    return len(layers)


@contextmanager
def bases_in_place(model: nn.Module) -> Iterator[dict[str, AdapterLayer]]:
    """Inside the block every adapter layer is swapped for its own base layer, so ``model`` has exactly the
    bare base model's modules, names and (unmerged) weights; the adapter layers, yielded by name, go back on
    exit. No tensor is copied or changed (used to save a merged model under the base model's names)."""
    layers = adapter_layers(model)
    for name, layer in layers.items():
        _set_submodule(model, name, layer.base)
    try:
        yield layers
    finally:
        for name, layer in layers.items():
            _set_submodule(model, name, layer)


def unload_adapters(model: nn.Module, merge: bool = True) -> nn.Module:
    """The inverse of ``inject_adapters``: put every adapter layer's base layer back in its place, with the
    adapter folded in (``merge=True``: W0 ← W0 + ΔW) or dropped (``merge=False``: the original W0; a merged layer
    is unmerged first). Parameters keep their ``requires_grad`` flags (the bases stay frozen). Returns ``model``,
    now a plain base model (``inject_adapters`` can run on it again). A sharded (FSDP2) model is refused, as by
    ``merge_adapters``; ``lora_lightning.interop.export_merged`` writes its merged weights from rank 0."""
    if merge:
        merge_adapters(model)
    else:
        unmerge_adapters(model)
    for name, layer in adapter_layers(model).items():
        _set_submodule(model, name, layer.base)
    if hasattr(model, CONFIG_ATTR):
        object.__delattr__(model, CONFIG_ATTR)
    return model
