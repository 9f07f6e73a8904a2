"""Adapter files: safetensors + JSON config; exact round trip; mismatches named; no pickle."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import randomize_adapters, tiny_bert, token_batch
from transformers import BertConfig, BertForSequenceClassification

from lora_lightning import AdapterConfig, adapter_state_dict, inject_adapters, load_adapter, save_adapter


def _trained(method="rslora"):
    model = tiny_bert()
    inject_adapters(model, AdapterConfig(method=method, r=4, alpha=8, target_modules=["query", "value"]), verbose=False)
    randomize_adapters(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    return model


def test_round_trip_into_fresh_base_reproduces_outputs_exactly(tmp_path):
    model = _trained()
    save_adapter(model, tmp_path / "ad")
    fresh = load_adapter(tiny_bert(), tmp_path / "ad")
    batch = token_batch()
    assert torch.equal(fresh(**batch).logits, model(**batch).logits)
    assert fresh._lora_lightning_config.scaling_rule == "rslora"


def test_config_records_method_rank_alpha_and_scaling_convention(tmp_path):
    save_adapter(_trained(), tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["adapter"]
    assert (meta["method"], meta["r"], meta["alpha"], meta["scaling_rule"]) == ("rslora", 4, 8, "rslora")
    assert meta["scale"] == pytest.approx(8 / 2)
    assert meta["target_modules"][0] == "bert.encoder.layer.0.attention.self.query"
    tensors = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert set(tensors) == set(adapter_state_dict(_trained()))
    assert "classifier.weight" in tensors and not any(k.endswith("base.weight") for k in tensors)


def test_shape_mismatch_names_the_tensor(tmp_path):
    save_adapter(_trained(), tmp_path / "ad")
    config = BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, num_labels=3)
    with pytest.raises(ValueError, match=r"shape mismatch: .*lora_A: file \(4, 32\) vs model \(4, 48\)"):
        load_adapter(BertForSequenceClassification(config), tmp_path / "ad")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    path = save_adapter(_trained(), tmp_path / "ad")
    tensors = load_file(str(path / "adapter_model.safetensors"))
    del tensors["bert.encoder.layer.1.attention.self.value.lora_B"]
    tensors["bert.extra.lora_A"] = torch.zeros(1)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"missing from file: .*layer\.1\.attention\.self\.value\.lora_B.*not in model: bert\.extra\.lora_A"):
        load_adapter(tiny_bert(), path)


def test_missing_target_in_other_architecture_is_named(tmp_path):
    save_adapter(_trained(), tmp_path / "ad")
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=37, num_labels=3)
    with pytest.raises(ValueError, match=r"not in model: bert\.encoder\.layer\.1\.attention"):
        load_adapter(BertForSequenceClassification(config), tmp_path / "ad")


def test_conflicting_existing_adapters_and_missing_dir(tmp_path):
    save_adapter(_trained(), tmp_path / "ad")
    other = tiny_bert()
    inject_adapters(other, AdapterConfig(method="lora", r=2, target_modules=["query"]), verbose=False)
    with pytest.raises(ValueError, match="load into a fresh base model"):
        load_adapter(other, tmp_path / "ad")
    with pytest.raises(FileNotFoundError, match="save_adapter"):
        load_adapter(tiny_bert(), tmp_path / "nothing")


class _Exploit:
    def __reduce__(self):
        return (exec, ("import builtins; builtins.PWNED = True",))


def test_loading_never_unpickles(tmp_path):
    """A pickle disguised as the weights file is rejected, and its payload never runs."""
    import builtins

    path = save_adapter(_trained(), tmp_path / "ad")
    torch.save({"x": _Exploit()}, path / "adapter_model.safetensors")
    with pytest.raises(Exception):
        load_adapter(tiny_bert(), path)
    assert not getattr(builtins, "PWNED", False)
