"""PEFT format out and in, merged export, unload: PEFT itself is the oracle (same logits to 1e-5, same merged
weights). The method list comes from the registry, so a newly registered method is tested (or must be refused,
naming export_merged) without editing this file."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import randomize_adapters, tiny_bert, tiny_convnet, tiny_gpt2, token_batch
from tiny_models import tiny_llama_v100 as tiny_llama

from lora_lightning import (
    ADAPTER_METHODS,
    AdapterConfig,
    adapter_layers,
    export_merged,
    inject_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    unload_adapters,
)
from lora_lightning.adapters import AdapterLayer, AdapterMethod, LoRALayer, register_method

METHODS = sorted(ADAPTER_METHODS)
IMAGES = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
TOKENS = token_batch()

# model: (builder, AdapterConfig placement kwargs, forward). BERT: every Linear + its SEQ_CLS head saved;
# GPT-2: every Conv1D + a saved final norm; Llama: every Linear + its untied lm_head saved; ConvNet: Conv2d.
MODELS = {
    "bert": (tiny_bert, {}, lambda m: m(**TOKENS).logits),
    "gpt2": (tiny_gpt2, {"modules_to_save": ["transformer.ln_f"]}, lambda m: m(**TOKENS).logits),
    "llama": (tiny_llama, {}, lambda m: m(**TOKENS).logits),
    "convnet": (tiny_convnet, {"target_modules": ["conv1", "conv2"]}, lambda m: m(IMAGES)),
}


def trained(base, method: str, placement: dict, seed: int = 0):
    """A copy of ``base`` with ``method`` injected and every trained tensor moved off its init (non-zero B, DoRA
    magnitudes, SDS in its active phase with bases, the saved modules)."""
    model = copy.deepcopy(base)
    inject_adapters(model, AdapterConfig(method=method, r=2, alpha=6, **placement), verbose=False)
    randomize_adapters(model, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            if hasattr(layer, "rebalance"):  # SDS: switch on, then move A and B away from the balanced point
                layer.rebalance()
                for p in (layer.lora_A, layer.lora_B):
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
            if hasattr(layer, "magnitude"):
                layer.magnitude.mul_(1 + 0.1 * torch.randn(layer.magnitude.shape, generator=g))
        adapter_ids = {id(q) for layer in adapter_layers(model).values() for q in layer.parameters()}
        for p in model.parameters():
            if p.requires_grad and id(p) not in adapter_ids:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)  # modules_to_save
    return model


# -- export: every registered method × Linear / Conv1D / Conv2d models -------------------------------------------
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_peft_export_loads_in_peft_with_the_same_logits_and_merge(method, model_name, tmp_path):
    build, placement, run = MODELS[model_name]
    base = build()
    ours = trained(base, method, placement)
    if ADAPTER_METHODS[method].peft is None:
        with pytest.raises(ValueError, match="export_merged"):
            save_adapter(ours, tmp_path, format="peft")
        return
    save_adapter(ours, tmp_path, format="peft")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_rslora"] == (method == "rslora")
    assert cfg["use_dora"] == (method == "dora") and cfg["r"] == (4 if method == "sds" else 2)

    with torch.no_grad():
        want = run(ours)
        assert (want - run(base)).abs().max() > 1e-2  # the adapter really changes the output
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        for name, layer in adapter_layers(ours).items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            assert peft_layer.scaling["default"] == pytest.approx(layer.scaling, rel=1e-12)
        torch.testing.assert_close(run(theirs), want, rtol=0, atol=1e-5)

        reloaded = load_adapter(copy.deepcopy(base), tmp_path)  # our importer reads our PEFT export too
        torch.testing.assert_close(run(reloaded), want, rtol=0, atol=1e-5)

        merged = theirs.merge_and_unload()
        merge_adapters(ours)
        for name, layer in adapter_layers(ours).items():
            torch.testing.assert_close(merged.get_submodule(name).weight, layer.base.weight, rtol=0, atol=1e-5)


def test_target_modules_are_written_so_that_peft_wraps_exactly_our_layers(tmp_path):
    from torch import nn

    def wrapped_by_peft(model, path) -> set[str]:
        from peft.tuners.lora import LoraLayer

        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), path).base_model.model
        return {n for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}

    cases = [  # (model, our targets, what PEFT's config must say): leaf names, full names, an exact regex
        (tiny_bert(), ["query"], ["query"]),
        (tiny_bert(), ["query", "encoder.layer.0.output.dense"], None),
        (nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4))), "0", "(0)"),  # not 1.0
    ]
    for i, (base, targets, spec) in enumerate(cases):
        model = copy.deepcopy(base)
        inject_adapters(model, AdapterConfig(r=2, target_modules=targets, modules_to_save=[]), verbose=False)
        save_adapter(model, tmp_path / str(i), format="peft")
        cfg = json.loads((tmp_path / str(i) / "adapter_config.json").read_text())
        assert cfg["target_modules"] == (spec or sorted(adapter_layers(model)))
        assert wrapped_by_peft(base, tmp_path / str(i)) == set(adapter_layers(model))
    assert cfg["task_type"] is None and cfg["modules_to_save"] is None
    conv = tiny_convnet()
    inject_adapters(conv, AdapterConfig(target_modules=["conv1"]), verbose=False)
    save_adapter(conv, tmp_path / "conv", format="peft")
    cfg = json.loads((tmp_path / "conv" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["head"] and cfg["base_model_name_or_path"] is None
    meta = json.loads(_metadata(tmp_path / "conv"))
    assert meta["method"] == "lora" and meta["peft_form"] == "lora"  # our own config rides along


def test_peft_task_type_is_dropped_when_peft_would_save_an_adapted_head(tmp_path):
    model = tiny_bert()  # SEQ_CLS makes PEFT save "classifier" in full and keep LoRA off it
    inject_adapters(model, AdapterConfig(r=2, target_modules=["classifier"], modules_to_save=[]), verbose=False)
    save_adapter(model, tmp_path, format="peft")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["task_type"] is None and cfg["target_modules"] == ["classifier"]


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return f.metadata()["lora_lightning"]


def test_a_method_without_a_peft_form_is_refused_naming_export_merged(tmp_path):
    from lora_lightning.adapters import DoRALayer

    register_method("no_peft_form", AdapterMethod(LoRALayer, "lora", "test only"))
    register_method("wrong_peft_form", AdapterMethod(DoRALayer, "lora", "test only", peft="lora"))  # m would be lost
    try:
        model = tiny_convnet()
        inject_adapters(model, AdapterConfig(method="no_peft_form", target_modules=["conv1"]), verbose=False)
        with pytest.raises(ValueError, match=r"export_merged\(model, dir\)"):
            save_adapter(model, tmp_path, format="peft")
        assert not (tmp_path / "adapter_config.json").exists()
        model = tiny_convnet()
        inject_adapters(model, AdapterConfig(method="wrong_peft_form", target_modules=["conv1"]), verbose=False)
        with pytest.raises(TypeError, match="needs a LoRALayer, got a DoRALayer"):
            save_adapter(model, tmp_path, format="peft")
    finally:
        del ADAPTER_METHODS["no_peft_form"], ADAPTER_METHODS["wrong_peft_form"]


# -- import: adapters written by PEFT itself ------------------------------------------------------------------------
IMPORT_MODELS = {  # Linear, Conv1D, Conv2d
    "bert": (tiny_bert, ["query", "value"], None),
    "gpt2": (tiny_gpt2, ["c_attn", "mlp.c_proj"], ["ln_f"]),
    "convnet": (tiny_convnet, ["conv1", "conv2"], ["head"]),
}


def peft_written(model_name: str, kind: str, path):
    build, targets, saved = IMPORT_MODELS[model_name]
    base = build()
    peft_cfg = LoraConfig(
        r=2, lora_alpha=5, target_modules=targets, modules_to_save=saved, init_lora_weights=False,
        use_rslora=kind == "rslora", use_dora=kind == "dora", task_type="SEQ_CLS" if model_name == "bert" else None,
    )  # fmt: skip
    theirs = get_peft_model(copy.deepcopy(base), peft_cfg)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:  # move magnitudes and saved modules too, not only A and B
                p.add_(torch.randn_like(p) * 0.05)
    theirs.save_pretrained(path)
    return base, theirs.eval()


@pytest.mark.parametrize("model_name", list(IMPORT_MODELS))
@pytest.mark.parametrize("kind", ["lora", "rslora", "dora"])
def test_load_adapter_reads_what_peft_writes(kind, model_name, tmp_path):
    base, theirs = peft_written(model_name, kind, tmp_path)
    run = MODELS[model_name][2]
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    layers = adapter_layers(ours)
    assert len(layers) == (2 if model_name == "convnet" else 4)
    assert {type(layer).__name__ for layer in layers.values()} == {"DoRALayer" if kind == "dora" else "LoRALayer"}
    assert all(layer.scaling == pytest.approx(5 / 2 ** (0.5 if kind == "rslora" else 1)) for layer in layers.values())
    with torch.no_grad():
        want = run(theirs)
        assert (want - run(base)).abs().max() > 1e-2
        torch.testing.assert_close(run(ours), want, rtol=0, atol=1e-5)


def _rewrite_config(path, **changes) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_unsupported_peft_options_are_named_together(tmp_path):
    peft_written("bert", "lora", tmp_path)
    _rewrite_config(
        tmp_path, rank_pattern={"query": 4}, layers_to_transform=[0], bias="all", init_lora_weights="pissa",
        alora_invocation_tokens=[1, 2], use_qalora=False, brand_new_option=None,  # off values are fine
    )  # fmt: skip
    with pytest.raises(ValueError) as err:
        load_adapter(tiny_bert(), tmp_path)
    msg = str(err.value)
    for name in ("rank_pattern", "layers_to_transform", "bias='all'", "init_lora_weights='pissa'", "alora_invocation"):
        assert name in msg
    assert "use_qalora" not in msg and "brand_new_option" not in msg
    _rewrite_config(tmp_path, peft_type="IA3")
    with pytest.raises(ValueError, match="peft_type='IA3'.*LoRA adapters only"):
        load_adapter(tiny_bert(), tmp_path)


def test_pickled_peft_weights_are_never_loaded(tmp_path, monkeypatch):
    peft_written("bert", "lora", tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    (tmp_path / "adapter_model.bin").write_bytes(b"not opened")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(FileNotFoundError, match="pickle.*never loaded"):
        load_adapter(tiny_bert(), tmp_path)
    save_file({**tensors, "base_model.model.bert.embeddings.word_embeddings.lora_embedding_A": torch.zeros(2, 100)},
              str(tmp_path / "adapter_model.safetensors"))  # fmt: skip
    with pytest.raises(ValueError, match="lora_embedding_A"):
        load_adapter(tiny_bert(), tmp_path)


def test_peft_adapter_into_existing_adapters_must_match(tmp_path):
    base, theirs = peft_written("bert", "lora", tmp_path)
    model = copy.deepcopy(base)
    inject_adapters(model, AdapterConfig(r=2, alpha=5, target_modules=["query", "value"]), verbose=False)
    load_adapter(model, tmp_path)  # same kind and scale: loads in place
    with torch.no_grad():
        torch.testing.assert_close(model(**TOKENS).logits, theirs(**TOKENS).logits, rtol=0, atol=1e-5)
    other = copy.deepcopy(base)
    inject_adapters(other, AdapterConfig(r=2, alpha=8, target_modules=["query", "value"]), verbose=False)
    with pytest.raises(ValueError, match="s=4.*s=2.5"):
        load_adapter(other, tmp_path)


# -- merged export and unload ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model_name, method", [("bert", "dora"), ("gpt2", "sds"), ("llama", "lora_alpha"), ("convnet", "rslora")]
)
def test_export_merged_reloads_with_the_same_logits_and_leaves_the_model_alone(model_name, method, tmp_path,
                                                                                tiny_bert_dir):  # fmt: skip
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    build, placement, run = MODELS[model_name]
    if model_name == "bert":  # from a folder with a tokenizer, which must travel with the model (vocab of 30)
        build = lambda: AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()  # noqa: E731
        run = lambda m: m(input_ids=TOKENS["input_ids"] % 30, attention_mask=TOKENS["attention_mask"]).logits  # noqa: E731
    ours = trained(build(), method, placement)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with torch.no_grad():
        want = run(ours)
    export_merged(ours, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())  # nothing merged in place
    assert not any(layer.merged for layer in adapter_layers(ours).values())
    with torch.no_grad():
        torch.testing.assert_close(run(ours), want, rtol=0, atol=0)

    if model_name == "convnet":
        fresh = tiny_convnet(seed=1)
        fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    else:
        auto = AutoModelForSequenceClassification if model_name == "bert" else AutoModelForCausalLM
        fresh = auto.from_pretrained(tmp_path).eval()
        assert not any(isinstance(m, AdapterLayer) for m in fresh.modules())
    with torch.no_grad():
        torch.testing.assert_close(run(fresh), want, rtol=0, atol=1e-5)
    if model_name == "bert":
        assert AutoTokenizer.from_pretrained(tmp_path).tokenize("a good film") == ["a", "good", "film"]


def test_export_merged_timm_backbone_loads_with_timm(tmp_path):
    import timm

    torch.manual_seed(0)
    base = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    ours = trained(base, "lora", {"target_modules": r"layer\d\.0\.conv\d"})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ours(x)
    export_merged(ours, tmp_path)
    for fresh in (
        timm.create_model(f"local-dir:{tmp_path}", pretrained=True),
        timm.create_model("test_resnet", pretrained=True, num_classes=3,  # the head needs num_classes in both
                          pretrained_cfg_overlay={"file": str(tmp_path / "model.safetensors"), "num_classes": 3}),
    ):  # fmt: skip
        with torch.no_grad():
            torch.testing.assert_close(fresh.eval()(x), want, rtol=0, atol=1e-5)


def test_export_merged_refuses_an_adapted_tied_weight(tmp_path):
    model = tiny_gpt2()  # lm_head shares wte's weight
    inject_adapters(model, AdapterConfig(target_modules=["lm_head"], modules_to_save=[]), verbose=False)
    with pytest.raises(ValueError, match="lm_head.*tied"):
        export_merged(model, tmp_path)


@pytest.mark.parametrize("merge", [True, False])
def test_unload_adapters_puts_the_bases_back(merge):
    base = tiny_bert()
    model = trained(base, "dora", {"modules_to_save": []})
    with torch.no_grad():
        adapted, plain = model(**TOKENS).logits, base(**TOKENS).logits
        unload_adapters(model, merge=merge)
        assert not any(isinstance(m, AdapterLayer) for m in model.modules())
        assert set(model.state_dict()) == set(base.state_dict())
        torch.testing.assert_close(model(**TOKENS).logits, adapted if merge else plain, rtol=0, atol=1e-5)
    inject_adapters(model, AdapterConfig(r=2), verbose=False)  # a bare model again
