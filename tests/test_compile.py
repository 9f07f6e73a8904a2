"""torch.compile: no graph break in our adapter code on a tiny Llama (every distinct adapter path of the
registry, the fused gated MLP included), and ``LoRAModule(compile=True)`` gives eager's loss and gradients.
Marked ``compile`` (about a minute on 2 CPU cores): ``pytest -m 'not compile'`` skips them."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from lora_lightning import AdapterConfig, adapter_layers, inject_adapters
from lora_lightning.adapters import ADAPTER_METHODS
from lora_lightning.module import LoRAModule

pytestmark = pytest.mark.compile

# one method per distinct code path: layer class × ALLoRA's rule (rslora, lora_alpha only change s)
PATHS = sorted({(m.layer.__name__, m.allora_rule): name for name, m in reversed(ADAPTER_METHODS.items())}.values())


def tiny_llama_config(**kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=32, **kw)


def test_paths_cover_every_layer_class():
    assert {ADAPTER_METHODS[m].layer for m in PATHS} == {m.layer for m in ADAPTER_METHODS.values()}
    assert "allora" in PATHS


@pytest.mark.parametrize("method", PATHS)
def test_no_graph_breaks_on_a_tiny_llama(method):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    dropout = 0.0 if ADAPTER_METHODS[method].forces_no_dropout else 0.1
    report = inject_adapters(model, AdapterConfig(method=method, r=4, dropout=dropout, init_b_std=0.1), verbose=False)
    if method == "sds":
        for layer in adapter_layers(model).values():
            layer.rebalance()  # the active parameterisation: bases in the graph
    assert report.fused_mlps == ["model.layers.0.mlp"]
    model.train()
    ids = torch.randint(0, 64, (2, 10))
    explanation = torch._dynamo.explain(lambda ids: model(input_ids=ids, labels=ids).loss)(ids)
    reasons = [b.reason for b in explanation.break_reasons]
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, reasons


def test_compiled_lora_module_matches_eager():
    torch.manual_seed(0)
    backbone = LlamaForSequenceClassification(tiny_llama_config(num_labels=3, pad_token_id=0))
    adapter = AdapterConfig(r=4, init_b_std=0.1)
    modules = [LoRAModule(copy.deepcopy(backbone), num_classes=3, task="sequence_classification", adapter=adapter,
                          init_seed=0, compile=flag) for flag in (False, True)]
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(1, 64, (2, 8), generator=g), "attention_mask": torch.ones(2, 8, dtype=torch.long),
             "labels": torch.tensor([0, 2])}
    results = []
    for module in modules:
        module.configure_model()
        loss_sum, n = module.task.loss(module.model, batch)
        loss = loss_sum / n
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in module.model.named_parameters() if p.requires_grad}))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    assert modules[1].model._compiled_call_impl is not None and modules[0].model._compiled_call_impl is None
    assert set(modules[1].state_dict()) == set(modules[0].state_dict())  # compiled in place: same keys
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
