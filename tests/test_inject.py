"""inject_adapters: target resolution, freezing, the task head, merge/unmerge, and every error."""

import pytest
import timm
import torch
from tiny_models import randomize_adapters, tiny_bert, tiny_gpt2, token_batch

from lora_lightning import (
    AdapterConfig,
    adapter_layers,
    find_task_head,
    inject_adapters,
    merge_adapters,
    unmerge_adapters,
)


def test_suffix_targets_and_only_adapter_and_head_get_gradients():
    model = tiny_bert()
    report = inject_adapters(model, AdapterConfig(r=4, target_modules=["query", "value"]), verbose=False)
    assert report.adapted == [f"bert.encoder.layer.{i}.attention.self.{n}" for i in (0, 1) for n in ("query", "value")]
    assert report.modules_to_save == ["classifier"]
    randomize_adapters(model)
    model(**token_batch()).logits.sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    expected = {f"{a}.lora_{f}" for a in report.adapted for f in "AB"} | {"classifier.weight", "classifier.bias"}
    assert with_grad == expected
    assert all(torch.count_nonzero(model.get_parameter(n).grad) > 0 for n in expected)
    assert report.trainable_params == sum(model.get_parameter(n).numel() for n in expected)
    assert report.total_params == sum(p.numel() for p in model.parameters())


def test_all_linear_excludes_task_head_and_includes_every_other_linear():
    model = tiny_bert()
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    report = inject_adapters(model, AdapterConfig(r=2), verbose=False)
    assert "classifier" not in report.adapted and len(report.adapted) == n_linear - 1
    gpt = tiny_gpt2()
    report = inject_adapters(gpt, AdapterConfig(r=2), verbose=False)
    assert len(report.adapted) == 8  # c_attn, c_proj, mlp.c_fc, mlp.c_proj × 2 blocks (Conv1D); lm_head excluded
    assert all(layer.kind == "conv1d" for layer in adapter_layers(gpt).values())
    assert report.modules_to_save == []  # lm_head is pretrained (and tied to wte): never trained in full by default


def test_regex_target_and_exclude():
    model = tiny_bert()
    report = inject_adapters(
        model,
        AdapterConfig(r=2, target_modules=r".*layer\.\d+\.attention\.self\.(query|key)", exclude_modules=["1.attention.self.key"]),
        verbose=False,
    )
    assert report.adapted == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.attention.self.key",
        "bert.encoder.layer.1.attention.self.query",
    ]


def test_timm_convnet_head_detection_and_conv2d_targets():
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5, zero_init_last=False).eval()
    assert find_task_head(model) == ["fc"]
    report = inject_adapters(model, AdapterConfig(r=4, target_modules=r"layer\d\.\d\.conv\d"), verbose=False)
    assert report.adapted and all(layer.kind == "conv2d" for layer in adapter_layers(model).values())
    x = torch.randn(2, 3, 32, 32)
    y0 = model(x)
    randomize_adapters(model, std=0.05)
    y1 = model(x)
    assert not torch.allclose(y0, y1)
    assert merge_adapters(model) == len(report.adapted)
    torch.testing.assert_close(model(x), y1, atol=1e-4, rtol=1e-4)
    unmerge_adapters(model)
    torch.testing.assert_close(model(x), y1, atol=1e-4, rtol=1e-4)


def test_merge_unmerge_round_trip_on_bert_is_exact():
    model = tiny_bert()
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    inject_adapters(model, AdapterConfig(r=4, target_modules="all-linear"), verbose=False)
    randomize_adapters(model)
    batch = token_batch()
    y = model(**batch).logits
    merge_adapters(model)
    torch.testing.assert_close(model(**batch).logits, y, atol=1e-5, rtol=1e-5)
    unmerge_adapters(model)
    for name, layer in adapter_layers(model).items():
        torch.testing.assert_close(layer.base.weight, base_weights[f"{name}.weight"], atol=1e-5, rtol=0)


def test_no_match_lists_nearest_names():
    with pytest.raises(ValueError, match=r"no module matched.*nearest adaptable layer names.*query"):
        inject_adapters(tiny_bert(), AdapterConfig(target_modules=["querry"]), verbose=False)


def test_unsupported_target_names_its_adaptable_children():
    with pytest.raises(TypeError, match=r"BertSelfAttention.*self\.query|BertSelfAttention.*query"):
        inject_adapters(tiny_bert(), AdapterConfig(target_modules=["attention.self"]), verbose=False)
    with pytest.raises(TypeError, match="LayerNorm.*exclude_modules"):
        inject_adapters(tiny_bert(), AdapterConfig(target_modules=["LayerNorm"]), verbose=False)


def test_rank_too_large_names_the_maximum():
    with pytest.raises(ValueError, match=r"r=64 exceeds min\(in, out\)=32 .*use r ≤ 32"):
        inject_adapters(tiny_bert(), AdapterConfig(r=64, target_modules=["query"]), verbose=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": -3}, "r must be a positive integer"),
        ({"method": "rslroa"}, r"unknown adapter method 'rslroa' \(did you mean 'rslora'\?\)"),
        ({"scaling": "rs"}, "unknown scaling rule"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
        ({"method": "allora", "dropout": 0.1}, "set dropout: 0.0"),
        ({"target_modules": []}, "target_modules is empty"),
    ],
)
def test_config_errors_name_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**kwargs)


def test_inject_twice_and_bad_modules_to_save_are_errors():
    model = tiny_bert()
    with pytest.raises(ValueError, match="modules_to_save entry 'clasifier' matches no module.*classifier"):
        inject_adapters(model, AdapterConfig(target_modules=["query"], modules_to_save=["clasifier"]), verbose=False)
    inject_adapters(model, AdapterConfig(target_modules=["query"]), verbose=False)
    with pytest.raises(ValueError, match="already has adapters"):
        inject_adapters(model, AdapterConfig(target_modules=["value"]), verbose=False)


def test_report_is_printed(capsys):
    inject_adapters(tiny_bert(), AdapterConfig(r=2, target_modules=["query"]))
    out = capsys.readouterr().out
    assert "trainable params:" in out and "lora (s=8)" in out
