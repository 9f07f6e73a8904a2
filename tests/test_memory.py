"""The memory estimate: activations within 25 % of what autograd really saves; the fit-time report and its
warning; activation offload (refused on CPU; on CUDA, same gradients and less GPU memory held)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lora_lightning import AdapterConfig, inject_adapters
from lora_lightning.memory import activation_bytes, estimate_memory
from lora_lightning.module import LoRAModule
from lora_lightning.offload import offload_activations
from lora_lightning.tasks import CausalLM


def small_qwen2(method: str = "lora", dropout: float = 0.0, checkpointing: bool = False, vocab: int = 500):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    ))
    inject_adapters(model, AdapterConfig(method=method, r=8, dropout=dropout, modules_to_save=[]), verbose=False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def lm_batch(vocab: int, batch: int = 2, seq: int = 48) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, : seq // 4] = -100  # the benchmark's prompt quarter
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def saved_bytes(model, fn) -> tuple[int, object]:
    """Bytes of the distinct storages autograd saves during ``fn()``, the model's own tensors excluded."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize(
    "method,dropout,checkpointing,chunk,dtype",
    [
        ("lora", 0.0, False, 256, torch.float32),
        ("lora", 0.05, False, 256, torch.float32),
        ("lora", 0.05, True, 256, torch.float32),
        ("dora", 0.05, False, 256, torch.float32),
        ("sds", 0.0, False, 256, torch.float32),
        ("allora", 0.0, False, 0, torch.float32),
        ("lora", 0.05, False, 256, torch.bfloat16),
    ],
)
def test_activation_estimate_within_25_percent(method, dropout, checkpointing, chunk, dtype):
    model = small_qwen2(method, dropout, checkpointing).to(dtype)
    batch = lm_batch(500)
    measured, out = saved_bytes(model, lambda: CausalLM(loss_chunk_size=chunk).forward(model, batch))
    estimate = activation_bytes(model, 2, 48, target_tokens=int(out.n_targets), loss_chunk_size=chunk)
    assert 0.75 * measured <= estimate <= 1.25 * measured, (estimate, measured)


def test_estimate_accounts_parameters_and_state_exactly():
    model = small_qwen2("dora")
    trained = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * 4 for p in model.parameters() if not p.requires_grad)
    frozen += sum(b.numel() * b.element_size() for b in model.buffers())
    est = estimate_memory(model, 2, 48, loss_chunk_size=16)
    assert (est.trainable, est.gradients, est.optimizer, est.weights) == (trained, trained, 2 * trained, frozen)
    assert est.transient == 8 * 500 * 16  # one chunk of fp32 logits (+ the probabilities in its place)
    assert est.peak == frozen + 4 * trained + est.activations + est.transient
    assert activation_bytes(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), 2, 8) is None  # no transformer blocks


def fake_trainer(**kw):
    base = dict(datamodule=SimpleNamespace(hparams={"batch_size": 2, "max_length": 48}), precision="32-true",
                world_size=1)
    return SimpleNamespace(**{**base, **kw})


def test_fit_reports_the_estimate_and_warns_when_it_does_not_fit(capsys, monkeypatch):
    module = LoRAModule(small_qwen2(vocab=500), task="causal_lm", adapter=AdapterConfig(r=8))
    module.model = module._backbone_spec
    module._trainer = fake_trainer()
    module.report_memory()
    text = capsys.readouterr().out
    assert "memory estimate per device (micro-batch 2 × 48 tokens, cpu)" in text
    assert "activations held for backward (one micro-batch)" in text and "expected peak" in text
    monkeypatch.setattr("lora_lightning.module.available_memory", lambda device: (1000, "host memory available"))
    with pytest.warns(UserWarning, match=r"exceeds the host memory available .*gradient_checkpointing"):
        module.report_memory()


def test_activation_offload_is_refused_on_cpu():
    module = LoRAModule(small_qwen2(), task="causal_lm", activation_offload=True)
    module.model = module._backbone_spec
    module._trainer = fake_trainer()
    with pytest.raises(ValueError, match="only helps on CUDA; this run is on cpu: set model.activation_offload: false"):
        module.on_fit_start()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_activation_offload_same_gradients_less_gpu_memory():
    model = small_qwen2("lora", 0.0, vocab=500).cuda()
    batch = {k: v.cuda() for k, v in lm_batch(500, batch=4, seq=256).items()}
    task = CausalLM()
    results = []
    for offload in (False, True):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        if offload:
            with offload_activations(model, min_bytes=1024):
                out = task.forward(model, batch)
        else:
            out = task.forward(model, batch)
        held = torch.cuda.memory_allocated() - before
        out.loss_sum.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        results.append((held, grads))
    (held_plain, g_plain), (held_offload, g_offload) = results
    assert held_offload < 0.5 * held_plain
    for name in g_plain:
        torch.testing.assert_close(g_offload[name], g_plain[name])


def test_fit_prints_the_estimate(tiny_llama_dir, sft_files, capsys):
    from conftest import cpu_trainer

    from lora_lightning.data import CausalLMDataModule

    dm = CausalLMDataModule(backbone=tiny_llama_dir, train_file=sft_files["train"], batch_size=4, max_length=32)
    module = LoRAModule(tiny_llama_dir, task="causal_lm", adapter=AdapterConfig(r=4))
    cpu_trainer(max_steps=1, limit_val_batches=0).fit(module, datamodule=dm)
    text = capsys.readouterr().out
    assert "memory estimate per device (micro-batch 4 × 32 tokens, cpu)" in text
    assert "host memory available" in text
