"""Adapters the ecosystem loads: PEFT's LoRA format (export and import) and merged full models. Pure torch +
transformers (peft itself only in the tests, as the oracle).

PEFT format (what ``PeftModel.from_pretrained``, vLLM and TGI read), checked against peft 0.21:

    adapter_config.json        peft_type "LORA", r, lora_alpha, use_rslora, use_dora, target_modules,
                               modules_to_save, task_type, base_model_name_or_path, lora_dropout, ...
    adapter_model.safetensors  base_model.model.<layer>.lora_A.weight            (r, in)  | Conv2d (r, in, kh, kw)
                               base_model.model.<layer>.lora_B.weight            (out, r) | Conv2d (out, r, 1, 1)
                               base_model.model.<layer>.lora_magnitude_vector    DoRA m: (out,) | Conv2d (1, out, 1, 1)
                               base_model.model.<saved module>.<tensor>          modules_to_save, full tensors

PEFT's scale is s = lora_alpha / r (``use_rslora``: lora_alpha / √r). Our A (r×in) and B (out×r) are PEFT's
``lora_A``/``lora_B`` weights for Linear and for transformers' Conv1D (PEFT's ``fan_in_fan_out`` only concerns
the base weight); for Conv2d A is PEFT's kernel flattened. DoRA's magnitude m is the same vector in both: PEFT
stores ‖W0 + s·B·A‖ per output row at init (``DoraLinearLayer.get_weight_norm``: the norm over the input dims of
the out×in view, transposed first for Conv1D; ``DoraConv2dLayer``: over dims 1..3 of the kernel) and trains it
as we do. Each method maps exactly (its ``AdapterMethod.peft`` form in the registry):

    lora, rslora   "lora"     A, B; lora_alpha = α, use_rslora for rsLoRA
    lora_alpha     "lora"     A, B; plain LoRA with lora_alpha = s·r, so lora_alpha / r = C/√r
    allora         "lora"     A, B; lora_alpha = r (scale 1)
    dora           "dora"     A, B, m; use_dora
    sds            "lora_2r"  the exact rank-2r LoRA [A; Q_Aᵀ], [Q_B, B] (``export_as_lora``); r' = 2r and
                              lora_alpha = s·r', so s·B'·A' = ΔW
    a method registered with ``peft=None`` is refused, naming ``export_merged``.

A scaling rule other than the method's default (``AdapterConfig.scaling``) is written the same way: plain
LoRA with lora_alpha = s·r. ``target_modules`` is written in the shortest form that makes PEFT wrap exactly our
layers (layer leaf names, else full names, else an exact regex); our own config is kept in the safetensors
metadata ("lora_lightning").

Import (``load_peft_adapter``, also reached through ``state.load_adapter``) takes LoRA, rsLoRA and DoRA
adapters written by PEFT, on Linear, Conv1D and Conv2d; the adapted layers are the ones the file holds factors
for (what PEFT loads). Options we cannot reproduce exactly (``rank_pattern``, ``alpha_pattern``,
``layers_to_transform``, ``bias`` other than "none", base-changing inits such as PiSSA, LoRA on embeddings, an
unknown option set to a value other than off) are named together in one error. Only safetensors are read.

Merged export (``export_merged``): the base model with every ΔW folded in, written the way its library saves
it (transformers ``save_pretrained`` + tokenizer / image processor; timm: ``model.safetensors`` + timm's
``config.json``; any other module: ``model.safetensors``). The live model is not changed: merged weights are
computed beside it and the adapter wrappers only step aside while the file is written.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from .atomic import write_directory
from .adapters import ADAPTER_METHODS, AdapterLayer, DoRALayer, LoRALayer, SDSLayer, export_as_lora
from .config import AdapterConfig
from .inject import adapter_layers, bases_in_place, injected_config
from .quantize import compute_dtype, dequantize, is_quantized, quantization_record
from .state import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    DTensor,
    _global_rank,
    check_finite,
    copy_adapter_state,
    full_tensor,
    gathered,
    prepare_adapters,
    refuse_flat_sharded,
)

PEFT_PREFIX = "base_model.model."
PEFT_FORMS = {"lora": LoRALayer, "dora": DoRALayer, "lora_2r": SDSLayer}
MERGED_WEIGHTS = "model.safetensors"

# modules PEFT adds to modules_to_save by itself for a task type (PeftModelForSequenceClassification ...)
PEFT_AUTO_SAVED = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}

# adapter_config.json keys the importer reads or that do not change the adapter's function
PEFT_KEYS_READ = {
    "peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "target_modules", "exclude_modules",
    "modules_to_save", "task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_version",
    "auto_mapping", "fan_in_fan_out", "megatron_core", "qalora_group_size", "init_lora_weights", "bias",
}  # fmt: skip
# init_lora_weights values that only set the starting factors (the file's factors replace them); the others
# (pissa, olora, corda, loftq, lora_ga, mica) change the base weights or the layer
PEFT_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


# -- shared helpers --------------------------------------------------------------------------------------------
def _bare_names(model: nn.Module) -> list[str]:
    """Module names of ``model`` as the bare base model has them (adapter layers stand for their base layer)."""
    layers = set(adapter_layers(model))

    def inside_layer(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:i]) in layers for i in range(1, len(parts)))

    return [n for n, _ in model.named_modules() if n and not inside_layer(n)]


def _task_type(model: nn.Module) -> Optional[str]:
    """PEFT's task_type for a transformers model class (None when unknown: PEFT's plain PeftModel)."""
    name = type(model).__name__.removeprefix("FSDP")
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    if name.endswith("ForQuestionAnswering"):
        return "QUESTION_ANS"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    if name.endswith("ForConditionalGeneration") and getattr(getattr(model, "config", None), "is_encoder_decoder", 0):
        return "SEQ_2_SEQ_LM"
    return None


def _name_or_path(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    return getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None) or None


def _peft_saved(names: list[str], spec: list[str]) -> set[str]:
    """The modules PEFT wraps as modules_to_save for ``spec`` (its rule: the name ends with an entry)."""
    return {n for n in names if any(n.endswith(m) for m in spec)}


def _peft_guarded(name: str, spec: list[str]) -> bool:
    """Whether PEFT keeps LoRA off ``name`` because it is (inside) a modules_to_save match (PEFT's own regex,
    entries unescaped, as ``check_target_module_exists`` writes it)."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in spec)


def _peft_targets(names: list[str], spec: Union[str, list[str]], saved_spec: list[str]) -> set[str]:
    """The modules PEFT wraps with LoRA for ``target_modules=spec`` (its rules: a string is a full-name regex,
    a list entry matches the full name or a dotted suffix; modules_to_save matches are skipped)."""
    if isinstance(spec, str):
        hits = {n for n in names if re.fullmatch(spec, n)}
    else:
        hits = {n for n in names if n in spec or any(n.endswith("." + t) for t in spec)}
    return {n for n in hits if not _peft_guarded(n, saved_spec)}


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)`` to a temporary name beside ``path``, fsync, then rename over it (readers see old or new)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# -- PEFT export -----------------------------------------------------------------------------------------------
def peft_form(config: AdapterConfig) -> str:
    """The registry's PEFT form of ``config.method``; refuses a method PEFT cannot express."""
    form = ADAPTER_METHODS[config.method].peft
    if form is None:
        raise ValueError(
            f"method {config.method!r} has no exact form in PEFT's LoRA format; export the merged model instead: "
            "lora_lightning.interop.export_merged(model, dir) (CLI: lora-lightning export --format merged)"
        )
    if form not in PEFT_FORMS:
        raise ValueError(f"method {config.method!r} registers peft={form!r}; known forms: {', '.join(PEFT_FORMS)}")
    return form


def _peft_alpha(config: AdapterConfig, rank: int) -> tuple[float, bool]:
    """(lora_alpha, use_rslora) giving PEFT's scale = our scale s at PEFT rank ``rank``."""
    if config.scaling_rule == "rslora" and rank == config.r:
        alpha, rslora = config.alpha, True
    elif config.scaling_rule == "lora":
        alpha, rslora = config.alpha * rank / config.r, False  # rank / r is 1 or 2: exact
    else:
        alpha, rslora = config.scale * rank, False
    assert math.isclose(alpha / (math.sqrt(rank) if rslora else rank), config.scale, rel_tol=1e-12)
    return (int(alpha) if float(alpha).is_integer() else alpha), rslora


def _layer_tensors(layer: AdapterLayer, form: str) -> dict[str, Tensor]:
    """One layer's tensors under PEFT's names (without the module prefix) and in PEFT's shapes."""
    cls = PEFT_FORMS[form]
    more_specific = [o for o in PEFT_FORMS.values() if o is not cls and issubclass(o, cls)]  # lora: not DoRA/SDS
    if not isinstance(layer, cls) or any(isinstance(layer, o) for o in more_specific):
        raise TypeError(f"PEFT form {form!r} needs a {cls.__name__}, got a {type(layer).__name__}: fix its registration")
    down, up = export_as_lora(layer) if form == "lora_2r" else (layer.lora_A, layer.lora_B)
    out = {"lora_A.weight": down, "lora_B.weight": up}
    if form == "dora":
        out["lora_magnitude_vector"] = layer.magnitude
    if layer.kind == "conv2d":
        out["lora_A.weight"] = down.reshape(down.shape[0], *layer.base.weight.shape[1:])
        out["lora_B.weight"] = up.reshape(*up.shape, 1, 1)
        if form == "dora":
            out["lora_magnitude_vector"] = layer.magnitude.reshape(1, -1, 1, 1)
    return out


def _target_spec(names: list[str], targets: list[str], saved_spec: list[str]) -> Union[str, list[str]]:
    """The shortest ``target_modules`` with which PEFT wraps exactly ``targets``."""
    wanted = set(targets)
    for spec in (sorted({t.rsplit(".", 1)[-1] for t in targets}), sorted(targets)):
        if _peft_targets(names, spec, saved_spec) == wanted:
            return spec
    return "(" + "|".join(re.escape(t) for t in sorted(targets)) + ")"


def _peft_plan(model: nn.Module) -> tuple[Optional[str], list[str], Union[str, list[str]]]:
    """(task_type, modules_to_save, target_modules) such that PEFT rebuilds exactly our model.

    PEFT saves a task's head by itself (SEQ_CLS: any module named …classifier / …score) and then requires its
    tensors in the file, and it matches modules_to_save as plain name suffixes: every module PEFT will wrap is
    written (a head we did not train: its current, base values). If that would take LoRA off one of our layers,
    the task type is dropped (PEFT's plain PeftModel computes the same function)."""
    config = injected_config(model)
    names, targets = _bare_names(model), list(adapter_layers(model))
    for task in dict.fromkeys([_task_type(model), None]):
        spec = list(config.modules_to_save) + PEFT_AUTO_SAVED.get(task, [])
        wrapped = _peft_saved(names, spec)
        saved = sorted(w for w in wrapped if not any(w.startswith(o + ".") for o in wrapped))
        clash = [t for t in targets if _peft_guarded(t, spec) or any(t.startswith(w + ".") for w in saved)]
        if not clash and _peft_saved(names, saved + PEFT_AUTO_SAVED.get(task, [])) == wrapped:
            return task, saved, _target_spec(names, targets, spec)
    raise ValueError(
        f"PEFT would treat adapted layer(s) {', '.join(clash[:5]) or targets[:5]} as part of modules_to_save "
        f"{list(config.modules_to_save)} (it matches them as name suffixes); rename or drop those modules_to_save "
        "entries, or export the merged model (export_merged)"
    )


def peft_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter and ``modules_to_save`` tensors of ``model`` under PEFT's key names, whole and on CPU
    (sharded tensors are gathered: a collective, every rank must call it)."""
    form = peft_form(injected_config(model))
    state: dict[str, Tensor] = {}
    for name, layer in adapter_layers(model).items():
        with gathered(layer):
            for key, t in _layer_tensors(layer, form).items():
                state[f"{PEFT_PREFIX}{name}.{key}"] = t.detach().to("cpu", copy=True).contiguous()
    for name in _peft_plan(model)[1]:
        for key, t in model.get_submodule(name).state_dict().items():
            state[f"{PEFT_PREFIX}{name}.{key}"] = full_tensor(t).detach().to("cpu", copy=True).contiguous()
    return state


def peft_config(model: nn.Module, base_model_name_or_path: Optional[str] = None) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for the adapters in ``model`` (see the module docstring)."""
    config = injected_config(model)
    form = peft_form(config)
    layers = adapter_layers(model)
    rank = config.r * (2 if form == "lora_2r" else 1)
    alpha, rslora = _peft_alpha(config, rank)
    task_type, saved, target_modules = _peft_plan(model)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path or _name_or_path(model),
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "use_dora": form == "dora",
        "lora_dropout": config.dropout,
        "target_modules": target_modules,
        "modules_to_save": saved or None,
        "fan_in_fan_out": {layer.kind for layer in layers.values()} == {"conv1d"},
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "revision": None,
    }


def peft_adapter_files(
    model: nn.Module,
    base_model_name_or_path: Optional[str] = None,
    allow_nonfinite: bool = False,
    path: Union[str, Path] = "the adapter",
    labels: Optional[list[str]] = None,
) -> dict[str, bytes]:
    """PEFT's ``adapter_model.safetensors`` + ``adapter_config.json`` for ``model``, encoded (every rank must call
    it: sharded tensors are gathered). NaN/inf tensors are refused (naming ``path``) unless ``allow_nonfinite``.
    ``labels`` (class names by id; PEFT's config has no field for them) ride along in the safetensors metadata."""
    refuse_flat_sharded(model, "save_adapter(format='peft')")
    config_json = peft_config(model, base_model_name_or_path)
    tensors = peft_state_dict(model)
    if not allow_nonfinite:
        check_finite(tensors, path)
    ours = {**injected_config(model).to_dict(), "peft_form": peft_form(injected_config(model))}
    if labels is not None:
        ours["labels"] = [str(name) for name in labels]
    quant = quantization_record(model)
    if quant is not None:  # a QLoRA adapter: how its base was stored, and a README on loading it with PEFT + bnb
        ours["base_quantization"] = quant
    metadata = {"format": "pt", "lora_lightning": json.dumps(ours, sort_keys=True)}
    files = {
        WEIGHTS_NAME: safetensors_bytes(tensors, metadata=metadata),
        CONFIG_NAME: json.dumps(config_json, indent=2, sort_keys=True).encode(),
    }
    if quant is not None:
        files["README.md"] = _qlora_readme(config_json, quant).encode()
    return files


def save_peft_adapter(
    model: nn.Module,
    path: Union[str, Path],
    base_model_name_or_path: Optional[str] = None,
    labels: Optional[list[str]] = None,
) -> Path:
    """Write the adapters of ``model`` in PEFT's LoRA format to ``path`` (``adapter_config.json`` +
    ``adapter_model.safetensors``), loadable with ``PeftModel.from_pretrained(base, path)``. Same distributed
    contract as ``save_adapter``: every rank calls it, rank 0 writes; the directory is replaced as one unit
    (``lora_lightning.atomic.write_directory``). Returns the directory. ``labels``: see ``peft_adapter_files``."""
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    path = Path(path)
    files = peft_adapter_files(model, base_model_name_or_path, path=path, labels=labels)
    if _global_rank() == 0:
        write_directory(path, files)
    if sharded:
        torch.distributed.barrier()
    return path


def _qlora_readme(config_json: dict[str, Any], quant: dict[str, Any]) -> str:
    """The note a QLoRA adapter directory carries: how to load it on a 4-bit base with PEFT + bitsandbytes."""
    bnb = quant["bitsandbytes_config"]
    args = ", ".join(
        f"{k}={v!r}" if k != "bnb_4bit_compute_dtype" else f"{k}=torch.{v}" for k, v in bnb.items() if v is not None
    )
    base = config_json.get("base_model_name_or_path") or "<base model>"
    return f"""# QLoRA adapter (lora_lightning)

Trained on a 4-bit base: every frozen linear stored in NF4 ({quant["library"]}: blocks of {quant["block_size"]},
double-quantised scales in groups of {quant["scaler_block_size"]}), compute dtype {quant["compute_dtype"]}.
The adapter tensors are plain {"DoRA" if config_json.get("use_dora") else "LoRA"} in PEFT's format; load them
on the same 4-bit base:

```python
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

base = AutoModelForCausalLM.from_pretrained(
    "{base}", quantization_config=BitsAndBytesConfig({args})
)
model = PeftModel.from_pretrained(base, "<this directory>")
```

bitsandbytes' NF4 uses the same levels and blocks; its 8-bit code for the scales differs slightly, so W0 rounds
almost (not bit for bit) as in training. On a 16-bit base the adapter also loads (plain
`PeftModel.from_pretrained`), and lora_lightning loads it with `model.quantize: nf4` (torchao, the training
storage). `safetensors` metadata "lora_lightning" → "base_quantization" holds this record.
"""


# -- PEFT import -----------------------------------------------------------------------------------------------
def _is_off(value: Any) -> bool:
    return value is None or value is False or value in ({}, [], "")


def read_peft_config(path: Union[str, Path]) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` in ``path``, checked: only LoRA, and no option we cannot reproduce
    exactly (all offending options named in one error)."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: not an adapter directory")
    cfg = json.loads(file.read_text())
    if cfg.get("peft_type") != "LORA":
        raise ValueError(
            f"{file}: peft_type={cfg.get('peft_type')!r}; lora_lightning loads PEFT LoRA adapters only "
            "(peft_type 'LORA', with or without use_rslora / use_dora)"
        )
    problems = [f"{k}={v!r}" for k, v in sorted(cfg.items()) if k not in PEFT_KEYS_READ and not _is_off(v)]
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg['bias']!r} (trained base biases)")
    init = cfg.get("init_lora_weights", True)
    if init not in PEFT_PLAIN_INITS:
        problems.append(
            f"init_lora_weights={init!r} (changes the base weights: save it converted to plain LoRA with PEFT's "
            "path_initial_model_for_weight_conversion)"
        )
    if problems:
        raise ValueError(
            f"PEFT adapter {path} uses options lora_lightning cannot load exactly: {'; '.join(problems)}. "
            "Load it with PEFT and merge it (merge_and_unload), or save it without these options"
        )
    return cfg


def _split_peft_keys(tensors: dict[str, Tensor], path: Union[str, Path]):
    """(factors {layer: {"lora_A"|"lora_B"|"magnitude": tensor}}, other tensors), module names without prefix."""
    factors: dict[str, dict[str, Tensor]] = {}
    other: dict[str, Tensor] = {}
    unsupported = []
    slots = ((".lora_A.weight", "lora_A"), (".lora_B.weight", "lora_B"), (".lora_magnitude_vector", "magnitude"),
             (".lora_magnitude_vector.weight", "magnitude"))  # fmt: skip
    for key, t in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        for suffix, slot in slots:
            if name.endswith(suffix):
                factors.setdefault(name[: -len(suffix)], {})[slot] = t
                break
        else:
            if re.search(r"(^|\.)lora_", name):
                unsupported.append(key)
            else:
                other[name] = t
    if unsupported:
        raise ValueError(
            f"PEFT adapter {path} holds tensors lora_lightning cannot load: {', '.join(sorted(unsupported)[:5])} "
            "(LoRA on embeddings, LoRA biases, ...); only lora_A / lora_B / lora_magnitude_vector of Linear, "
            "Conv1D and Conv2d layers are supported"
        )
    return factors, other


def load_peft_adapter(model: nn.Module, path: Union[str, Path], verbose: bool = False) -> nn.Module:
    """Load a PEFT LoRA / rsLoRA / DoRA adapter directory (``save_pretrained`` of a ``PeftModel``, or
    ``save_adapter(format="peft")``) into ``model``: injects the matching adapters into a bare base model (or
    checks the ones there), then copies the factors and ``modules_to_save``. Never unpickles."""
    path = Path(path)
    cfg = read_peft_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickled = (path / "adapter_model.bin").exists()
        pickled = " (only adapter_model.bin, a pickle, which is never loaded)" if pickled else ""
        raise FileNotFoundError(
            f"{weights} not found{pickled}; re-save the adapter as safetensors with PEFT: "
            "PeftModel.from_pretrained(base, dir).save_pretrained(out_dir) (safe_serialization=True, PEFT's default)"
        )
    factors, other = _split_peft_keys(load_file(str(weights)), path)
    if not factors:
        raise ValueError(f"PEFT adapter {path} holds no lora_A / lora_B tensors")
    r, dora = int(cfg["r"]), bool(cfg.get("use_dora", False))
    incomplete = [
        f"{n} ({', '.join(sorted(f))})" for n, f in factors.items() if {"lora_A", "lora_B"} - set(f)
        or ("magnitude" in f) != dora
    ]
    if incomplete:
        raise ValueError(
            f"PEFT adapter {path} (use_dora={dora}) has incomplete layers: {', '.join(incomplete[:5])}; "
            "every layer needs lora_A and lora_B, plus lora_magnitude_vector exactly when use_dora"
        )
    ranks = sorted({f["lora_A"].shape[0] for f in factors.values()})
    if ranks != [r]:
        raise ValueError(f"PEFT adapter {path}: r={r} but its lora_A tensors have ranks {ranks}")

    names = _bare_names(model)
    saved_spec = list(cfg.get("modules_to_save") or []) + PEFT_AUTO_SAVED.get(cfg.get("task_type"), [])
    candidates = sorted(_peft_saved(names, saved_spec), key=len)
    owners = {k: next((c for c in candidates if k.startswith(c + ".")), None) for k in other}
    stray = sorted(k for k, owner in owners.items() if owner is None)
    if stray:
        raise ValueError(
            f"PEFT adapter {path}: tensors {', '.join(stray[:5])} are neither LoRA factors nor part of a "
            f"modules_to_save module of this model (modules_to_save={saved_spec})"
        )
    rslora = bool(cfg.get("use_rslora", False))
    config = AdapterConfig(
        method="dora" if dora else ("rslora" if rslora else "lora"),
        r=r,
        alpha=float(cfg["lora_alpha"]),
        scaling="rslora" if rslora else "lora",
        dropout=float(cfg.get("lora_dropout") or 0.0),
        target_modules="(" + "|".join(re.escape(n) for n in sorted(factors)) + ")",
        modules_to_save=sorted(set(owners.values())),
    )
    prepare_adapters(model, config, path, verbose)
    have = set(adapter_layers(model))
    if have != set(factors):
        raise ValueError(
            f"model's adapters are on other layers than PEFT adapter {path} "
            f"(only in model: {sorted(have - set(factors))[:5]}, only in file: {sorted(set(factors) - have)[:5]}); "
            "load into a fresh base model"
        )
    loaded = dict(other)
    for name, f in factors.items():
        loaded[f"{name}.lora_A"] = f["lora_A"].reshape(r, -1)
        loaded[f"{name}.lora_B"] = f["lora_B"].reshape(f["lora_B"].shape[0], -1)
        if dora:
            loaded[f"{name}.magnitude"] = f["magnitude"].reshape(-1)
    copy_adapter_state(model, loaded, path)
    return model


# -- merged export ---------------------------------------------------------------------------------------------
def _refuse_tied_adapted(model: nn.Module, layers: dict[str, AdapterLayer]) -> None:
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    tied = [name for name, layer in layers.items() if uses[id(layer.base.weight)] > 1]
    if tied:
        raise ValueError(
            f"adapted layer(s) {', '.join(tied)} share their weight with another module (tied embeddings): a merged "
            "file cannot hold two different copies; untie them first (e.g. config.tie_word_embeddings=False and a "
            "cloned weight) or do not adapt a tied layer"
        )


def _find_preprocessor(model: nn.Module) -> Any:
    """The tokenizer (else image processor) stored with a transformers model's source, if available locally."""
    source = _name_or_path(model)
    if not source:
        return None
    from transformers import AutoImageProcessor, AutoTokenizer

    for auto in (AutoTokenizer, AutoImageProcessor):
        try:
            return auto.from_pretrained(source, local_files_only=True)
        except Exception:  # noqa: BLE001 - none of this kind there
            continue
    return None


def _save_file_unshared(state: dict[str, Tensor], file: Path) -> None:
    """safetensors refuses aliased tensors: keep the first name of each shared storage."""
    seen: set[tuple] = set()
    unique = {}
    for k, v in state.items():
        key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), v.shape)
        if key not in seen:
            seen.add(key)
            unique[k] = v.contiguous()
    _atomic_write(file, lambda tmp: save_file(unique, str(tmp), metadata={"format": "pt"}))


def _write_merged(model: nn.Module, path: Path, state: dict[str, Tensor], preprocessor: Any) -> list[str]:
    """Write a bare model (adapters stepped aside) with ``state`` as its weights; returns what was written."""
    path.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_pretrained") and hasattr(model, "config"):  # transformers
        model.save_pretrained(path, state_dict=state)
        written = ["transformers model (save_pretrained)"]
        preprocessor = preprocessor if preprocessor is not None else _find_preprocessor(model)
        if preprocessor is None:
            warnings.warn(
                f"export_merged: no tokenizer or image processor found for {_name_or_path(model)!r}; "
                "pass preprocessor=... to save one with the model",
                stacklevel=3,
            )
    elif hasattr(model, "pretrained_cfg") and hasattr(model, "default_cfg"):  # timm
        from timm.models._hub import save_config_for_hf

        _save_file_unshared(state, path / MERGED_WEIGHTS)
        save_config_for_hf(model, str(path / "config.json"))
        written = [MERGED_WEIGHTS, "config.json (timm)"]
    else:
        _save_file_unshared(state, path / MERGED_WEIGHTS)
        written = [MERGED_WEIGHTS]
    if preprocessor is not None:
        preprocessor.save_pretrained(path)
        written.append(type(preprocessor).__name__)
    return written


def _compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the frozen base computes in: a 4-bit weight's dequantised dtype, else its first frozen float
    tensor's (adapters may be float32 over a bf16 base)."""
    for p in model.parameters():
        if is_quantized(p):
            return compute_dtype(p)
    frozen = [p for p in model.parameters() if p.is_floating_point() and not p.requires_grad]
    return (frozen or [torch.empty(0)])[0].dtype


@torch.no_grad()
def export_merged(
    model: nn.Module,
    path: Union[str, Path],
    preprocessor: Any = None,
    dtype: Optional[torch.dtype] = None,
    check: Union[bool, str] = "auto",
    requantize: bool = False,
    probes: Optional[Tensor] = None,
) -> Path:
    """Write ``model`` with every adapter merged (W0 + ΔW; DoRA: m ⊙ (W0 + s·B·A)/‖·‖) and without adapter
    wrappers, as its library saves it, so it loads with no lora_lightning installed:

        transformers  ``save_pretrained`` (safetensors, config) + the tokenizer / image processor
                      (``preprocessor``, else the one found locally at the model's ``name_or_path``):
                      ``AutoModelFor….from_pretrained(path)``
        timm          ``model.safetensors`` + timm's ``config.json`` (architecture, num_classes, pretrained_cfg):
                      ``timm.create_model("local-dir:" + path, pretrained=True)``, or
                      ``timm.create_model(arch, pretrained=True, num_classes=n,
                      pretrained_cfg_overlay=dict(file=path + "/model.safetensors", num_classes=n))`` (without
                      num_classes in the overlay timm drops a head whose size differs from the original's)
        other         ``model.safetensors`` (the state dict: ``model.load_state_dict(load_file(...))``)

    ``model`` is left as it was (merged weights are computed beside it). Sharded (FSDP2) models: every rank must
    call it (each tensor is gathered in turn), rank 0 writes. Adapted layers whose weight is tied to another
    module are refused. Returns the directory.

    QLoRA (4-bit frozen weights, ``lora_lightning.quantize``): merging into 4-bit codes would round most of ΔW
    away, so every 4-bit W0 is dequantised to ``dtype`` (None: the base's compute dtype, e.g. bf16), ΔW is
    added there, and the file holds plain 16-bit weights (the 4-bit layers that carry no adapter are
    dequantised too). ``dtype`` also casts every other float tensor (a float32 export of a bf16 model).

    ``check`` ("auto": for a transformers model with 4-bit weights; True: any transformers model): reload the
    written model and compare its logits with the live model's on ``probes`` (token ids; default 2×16 seeded
    random ids), printing and writing ``merge_check.json`` (``check_merged``). ``requantize=True`` also stores
    the reloaded merged weights in NF4 again and reports how far its logits move (what loading the merged
    model in 4 bits costs)."""
    refuse_flat_sharded(model, "export_merged")
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("export_merged: model has no adapters; save it with its own library")
    _refuse_tied_adapted(model, layers)
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    rank0 = _global_rank() == 0
    quantized = any(is_quantized(p) for p in model.parameters())
    target = dtype or _compute_dtype(model)

    def saved(t: Tensor) -> Tensor:  # 4-bit → dequantised; with ``dtype``: every float tensor cast
        if is_quantized(t):
            return dequantize(t, target)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    def whole(t: Tensor) -> Optional[Tensor]:
        t = saved(full_tensor(t).detach())
        return (t.cpu() if sharded else t) if rank0 else None

    merged = {}
    for name, layer in layers.items():
        with gathered(layer):
            merged[f"{name}.weight"] = whole(layer.merged_weight(target))
    path = Path(path)
    with bases_in_place(model):
        state, done = {}, {}
        for key, t in model.state_dict(keep_vars=True).items():
            if key not in merged and id(t) not in done:  # a tied tensor is gathered once, saved under both names
                done[id(t)] = whole(t)
            state[key] = merged[key] if key in merged else done[id(t)]
        if rank0:
            written = _write_merged(model, path, state, preprocessor)
            if dtype is not None and "transformers model (save_pretrained)" in written:
                _set_config_dtype(path, dtype)  # save_pretrained records the live model's dtype
    del merged, state, done
    transformers_model = hasattr(model, "save_pretrained") and hasattr(model, "config")
    if (check is True or (check == "auto" and quantized)) and transformers_model:
        check_merged(model, path, probes=probes, requantize=requantize)
    elif sharded:
        torch.distributed.barrier()
    return path


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    file = path / "config.json"
    config = json.loads(file.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write(file, lambda tmp: tmp.write_text(text))


def _probe_ids(model: nn.Module, probes: Optional[Tensor]) -> Tensor:
    if probes is not None:
        return probes
    vocab = getattr(model.config, "vocab_size", None)
    if not vocab:
        raise ValueError("check_merged: the model's config has no vocab_size; pass probes=<input_ids>")
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    out = model(input_ids=ids.to(next(model.parameters()).device))
    return (out.logits if hasattr(out, "logits") else out[0]).float().cpu()


@torch.no_grad()
def check_merged(
    model: nn.Module, path: Union[str, Path], probes: Optional[Tensor] = None, requantize: bool = False
) -> dict[str, Any]:
    """Compare the merged model written to ``path`` (reloaded with its transformers Auto class, in the dtype it
    was saved in) with the live adapted ``model`` on ``probes`` (token ids), in eval mode. Returns, prints and
    writes to ``path/merge_check.json``:

        max_abs_diff     max |logits(merged) − logits(live)|
        adapter_effect   max |logits(live) − logits(live with adapters off)|: what the adapters change; the merge
                         error is only meaningful next to it
        tolerance        8·u·max|logits|, u the unit roundoff of the coarser of the saved dtype and the live model's
                         compute dtype (2⁻⁸ for bf16, 2⁻¹¹ for fp16, 2⁻²⁴ for fp32): the merged weights are rounded
                         once to their dtype and both forwards round their activations [our bound; measured
                         ≈ 2u on the tiny test Llama]; both models share W0's 4-bit rounding, so it does not count
                         against the merge
        ok               max_abs_diff ≤ tolerance (a warning otherwise)
        requantized_max_abs_diff   (``requantize``) the merged model with its linears in NF4 again vs the live
                         model: what re-quantising the merged model costs (ΔW rounded to 4 bits with W0)

    Sharded (FSDP2) models: every rank calls it (the live forward is collective); rank 0 loads and compares."""
    import transformers

    from .quantize import quantize_model

    path = Path(path)
    ids = _probe_ids(model, probes)
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    was_training = model.training
    model.eval()
    try:
        live = _logits(model, ids)
        base = None
        if not sharded:  # the bare base layers cannot run on their own inside FSDP2 units
            with bases_in_place(model):
                base = _logits(model, ids)
    finally:
        model.train(was_training)
    result: dict[str, Any] = {}
    if _global_rank() == 0:
        config = json.loads((path / "config.json").read_text())
        arch = (config.get("architectures") or [""])[0]
        cls = getattr(transformers, arch, None) or transformers.AutoModelForCausalLM
        saved_dtype = getattr(torch, str(config.get("dtype") or "float32"))
        merged = cls.from_pretrained(path, dtype=saved_dtype).eval()
        got = _logits(merged, ids)
        scale = live.abs().max().item()
        unit = max(torch.finfo(saved_dtype).eps, torch.finfo(_compute_dtype(model)).eps) / 2  # 2^-8 for bf16
        result = {
            "probes": list(ids.shape),
            "dtype": str(saved_dtype).removeprefix("torch."),
            "max_abs_diff": (got - live).abs().max().item(),
            "max_abs_logit": scale,
            "adapter_effect": None if base is None else (live - base).abs().max().item(),
            "tolerance": 8 * unit * scale,
        }
        result["ok"] = result["max_abs_diff"] <= result["tolerance"]
        if requantize:
            quantize_model(merged, "nf4")
            result["requantized_max_abs_diff"] = (_logits(merged, ids) - live).abs().max().item()
        del merged
        text = json.dumps(result, indent=2, sort_keys=True)
        _atomic_write(path / "merge_check.json", lambda tmp: tmp.write_text(text))
        print(
            f"export_merged check on {ids.shape[0]}×{ids.shape[1]} probe tokens: max |merged − trained| logits = "
            f"{result['max_abs_diff']:.3g} (tolerance {result['tolerance']:.3g}"
            + (f"; the adapters move logits by up to {result['adapter_effect']:.3g})" if base is not None else ")")
            + (f"; re-quantised to NF4 the merged model moves by {result['requantized_max_abs_diff']:.3g}"
               if requantize else "")
        )
        if not result["ok"]:
            warnings.warn(
                f"export_merged: the merged model's logits differ from the trained model's by "
                f"{result['max_abs_diff']:.3g}, more than the {result['dtype']} rounding bound "
                f"{result['tolerance']:.3g}; export with dtype=torch.float32 to see whether rounding causes it",
                stacklevel=2,
            )
    if sharded:
        torch.distributed.barrier()
    return result


__all__ = [
    "PEFT_FORMS",
    "check_merged",
    "export_merged",
    "load_peft_adapter",
    "peft_config",
    "peft_form",
    "peft_state_dict",
    "read_peft_config",
    "save_peft_adapter",
]
