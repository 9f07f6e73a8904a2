"""The causal-LM task's target-only chunked loss equals its full-logit loss (values, metrics inputs, adapter
gradients); models that post-process logits fall back to the full logits with a warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_models import randomize_adapters, tiny_gpt2_lm, tiny_llama

from lora_lightning import AdapterConfig, adapter_layers, inject_adapters
from lora_lightning.tasks import CausalLM, get_task


def lm_batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (3, 10), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, :] = -100  # a row without targets
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    labels[2, 8:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def adapted(model, dropout: float = 0.0):
    inject_adapters(model, AdapterConfig(r=4, dropout=dropout, modules_to_save=[]), verbose=False)
    randomize_adapters(model)
    return model.train()


def adapter_grads(model) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{n}": p.grad.clone()
        for name, layer in adapter_layers(model).items()
        for n, p in layer.named_parameters()
        if p.grad is not None
    }


@pytest.mark.parametrize("build", [lambda: tiny_llama(tie=False), lambda: tiny_llama(tie=True), tiny_gpt2_lm],
                         ids=["llama", "llama-tied", "gpt2-tied"])
def test_chunked_task_loss_equals_full_logit_loss(build):
    model = adapted(build())
    batch = lm_batch(model.config.vocab_size)
    results = []
    for task in (CausalLM(loss_chunk_size=0), CausalLM(loss_chunk_size=3)):
        out = task.forward(model, batch)
        (out.loss_sum / out.n_targets).backward()
        results.append((out, adapter_grads(model)))
        model.zero_grad(set_to_none=True)
    (full, g_full), (chunked, g_chunked) = results
    assert task._head_checked == {id(model): True}  # the one-position check passed: the chunked path ran
    assert int(chunked.n_targets) == int(full.n_targets) == 10
    torch.testing.assert_close(chunked.loss_sum, full.loss_sum, rtol=1e-5, atol=1e-6)
    assert int(chunked.metric_inputs["n_correct"]) == int(full.metric_inputs["n_correct"])
    assert g_full and set(g_chunked) == set(g_full)
    for name in g_full:
        torch.testing.assert_close(g_chunked[name], g_full[name], rtol=1e-5, atol=1e-7, msg=name)


def test_model_that_post_processes_logits_falls_back():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, final_logit_softcapping=0.5, attn_implementation="eager",
    ))
    model = adapted(model)
    batch = lm_batch(40)
    task = CausalLM(loss_chunk_size=4)
    with pytest.warns(UserWarning, match="post-processes its logits"):
        out = task.forward(model, batch)
    full = CausalLM(loss_chunk_size=0).forward(model, batch)
    torch.testing.assert_close(out.loss_sum, full.loss_sum)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided once per model: no second warning
        torch.testing.assert_close(task.forward(model, batch).loss_sum, full.loss_sum)


def test_task_options_are_checked():
    assert get_task("causal_lm", {"loss_chunk_size": 64}).loss_chunk_size == 64
    with pytest.raises(ValueError, match=r"unknown task_options \['chunk'\] for task 'causal_lm'; it takes: "
                                         "loss_chunk_size, loss_backend"):
        get_task("causal_lm", {"chunk": 1})
    with pytest.raises(ValueError, match="takes: none"):
        get_task("sequence_classification", {"loss_chunk_size": 1})
    with pytest.raises(ValueError, match="loss_chunk_size must be a number of tokens"):
        CausalLM(loss_chunk_size=-1)
