"""The causal-LM task through LoRAModule: task detection, Llama / GPT-2 targets and tied embeddings, the exact
token-mean loss (batches, accumulation), validation metrics, gradient checkpointing, merged vs unmerged
generation, bf16 precisions and ``model.dtype``, and the GenerationSamples callback."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import cpu_trainer
from lightning.pytorch import Callback
from tiny_models import LM_VOCAB, tiny_gpt2_lm, tiny_llama
from torch.utils.data import DataLoader

from lora_lightning import AdapterConfig, LoRAModule, adapter_layers, adapter_state_dict, inject_adapters, merge_adapters
from lora_lightning.adapters import SDSLayer
from lora_lightning.data.causal_lm import pad_right
from lora_lightning.generation import GenerationOptions, generate_tokens, pad_left, strip_after_eos

METHODS = ("lora", "rslora", "lora_alpha", "dora", "sds", "allora")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def examples(seed: int = 0, n: int = 4, vocab: int = len(LM_VOCAB)) -> list[dict]:
    """Token examples with different prompt and answer lengths (so batches hold different target counts)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt, answer = 3 + (2 * i) % 5, 1 + (3 * i) % 7
        ids = torch.randint(6, vocab, (prompt + answer,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def lm_loader(rows: list[dict], batch_size: int) -> DataLoader:
    return DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=lambda b: pad_right(b, 2))


def llama_module(method: str = "lora", dtype=torch.float32, **kw) -> LoRAModule:
    adapter = AdapterConfig(method=method, r=2, init_b_std=0.05,
                            **kw.pop("adapter", {}))
    return LoRAModule(tiny_llama().to(dtype), adapter=adapter, lr=kw.pop("lr", 1e-2), init_seed=0, **kw)


def token_mean_loss(model, rows) -> torch.Tensor:
    """Σ over all rows' target tokens of the next-token CE / their number: one row at a time, no padding."""
    total, count = 0.0, 0
    for r in rows:
        ids, labels = torch.tensor([r["input_ids"]]), torch.tensor([r["labels"]])
        logits = model(input_ids=ids).logits[:, :-1]
        y = labels[:, 1:]
        total = total + F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
        count += int((y != -100).sum())
    return total / count


# -- backbones, targets, tied embeddings ----------------------------------------------------------------------
def test_causal_lm_is_detected_from_the_model(tiny_llama_dir, tiny_bert_dir):
    assert LoRAModule(tiny_llama_dir).task_name == "causal_lm"  # config.architectures = LlamaForCausalLM
    assert LoRAModule(tiny_llama()).task_name == "causal_lm"
    assert LoRAModule(tiny_gpt2_lm()).task_name == "causal_lm"
    assert LoRAModule(tiny_bert_dir).task_name == "sequence_classification"


def test_llama_all_linear_adapts_every_projection_but_not_lm_head(tiny_llama_dir):
    module = LoRAModule(tiny_llama_dir, adapter=AdapterConfig(r=2), init_seed=0)
    module.configure_model()
    adapted = set(adapter_layers(module.model))
    assert adapted == {f"model.layers.{i}.{p}" for i in range(2) for p in
                       [f"self_attn.{t}" if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else f"mlp.{t}"
                        for t in LLAMA_TARGETS]}
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)  # nothing trained in full, lm_head frozen
    assert set(adapter_state_dict(module.model)) == trainable


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tied_embeddings_are_never_adapted_or_trained(arch, tmp_path):
    model = tiny_gpt2_lm() if arch == "gpt2" else tiny_llama(tie=True)
    embed = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embed  # tied
    before = embed.detach().clone()
    module = LoRAModule(model, adapter=AdapterConfig(r=2), lr=0.05, init_seed=0)
    cpu_trainer(max_steps=2).fit(module, train_dataloaders=lm_loader(examples(), 2))
    names = set(adapter_layers(module.model))
    if arch == "gpt2":  # Conv1D layers: c_attn, attn.c_proj, c_fc, mlp.c_proj
        assert names == {f"transformer.h.{i}.{m}" for i in range(2)
                         for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert not any("lm_head" in n or "embed" in n or "wte" in n for n in names)
    assert module.model.get_output_embeddings().weight is module.model.get_input_embeddings().weight  # still tied
    assert torch.equal(module.model.get_input_embeddings().weight, before)  # and untouched by training
    trainer = cpu_trainer(max_steps=1)
    trainer.fit(module, train_dataloaders=lm_loader(examples(), 2))
    trainer.save_checkpoint(tmp_path / "lm.ckpt")
    keys = set(torch.load(tmp_path / "lm.ckpt", weights_only=True)["state_dict"])
    assert keys and all(".lora_" in k for k in keys)  # adapter tensors only


# -- the loss: a mean over target tokens, whatever the batching ----------------------------------------------
class GradRecorder(Callback):
    """The gradients the optimizer sees at each step (after accumulation and normalisation)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def test_gradient_is_the_token_mean_over_accumulated_micro_batches():
    rows = examples(n=4)
    counts = [sum(y != -100 for y in r["labels"][1:]) for r in rows]
    assert len(set(counts)) > 2  # the examples hold different numbers of targets
    grads = {}
    for name, batch, accumulate in (("one batch", 4, 1), ("2 micro-batches", 2, 2), ("4 micro-batches", 1, 4)):
        module, recorder = llama_module(dtype=torch.float64), GradRecorder()
        cpu_trainer(max_steps=1, accumulate_grad_batches=accumulate, callbacks=[recorder]).fit(
            module, train_dataloaders=lm_loader(rows, batch)
        )
        grads[name] = recorder.grads[0]
    # exact: one batch of 4, 2 micro-batches of 2 and 4 of 1 give the same gradient up to float64 rounding
    for name in ("2 micro-batches", "4 micro-batches"):
        assert set(grads[name]) == set(grads["one batch"])
        for k, want in grads["one batch"].items():
            torch.testing.assert_close(grads[name][k], want, rtol=0, atol=1e-14, msg=lambda m, k=k, n=name: f"{n} {k}: {m}")
    # and it is the gradient of Σ CE / N, computed one example at a time (no padding) in plain torch; Llama runs
    # RMSNorm and the attention softmax in float32 even in a float64 model, hence 1e-6 here
    reference = llama_module(dtype=torch.float64)
    reference.configure_model()
    reference.model.train()
    token_mean_loss(reference.model, rows).backward()
    want = {f"model.{n}": p.grad for n, p in reference.model.named_parameters() if p.grad is not None}
    assert set(grads["one batch"]) == set(want)
    for k in want:
        torch.testing.assert_close(grads["one batch"][k], want[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    # control: the mean of per-micro-batch means weights tokens differently and is measurably off
    reference.model.zero_grad()
    ((token_mean_loss(reference.model, rows[:2]) + token_mean_loss(reference.model, rows[2:])) / 2).backward()
    off = max((p.grad - want[f"model.{n}"]).abs().max().item()
              for n, p in reference.model.named_parameters() if p.grad is not None)
    assert off > 1e-4


def test_validation_metrics_are_means_over_all_target_tokens():
    rows = examples(seed=3, n=5)
    module = llama_module()
    trainer = cpu_trainer()
    metrics = trainer.validate(module, dataloaders=lm_loader(rows, 2), verbose=False)[0]  # batches of 2, 2, 1
    module.model.eval()
    with torch.no_grad():
        loss = token_mean_loss(module.model, rows).item()
        correct = total = 0
        for r in rows:
            logits = module.model(input_ids=torch.tensor([r["input_ids"]])).logits[0, :-1]
            y = torch.tensor(r["labels"][1:])
            keep = y != -100
            correct += int((logits[keep].argmax(-1) == y[keep]).sum())
            total += int(keep.sum())
    assert metrics["val_loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics["val_ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert metrics["val_token_acc"] == pytest.approx(correct / total)


# -- gradient checkpointing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_gives_the_same_gradients(method):
    batch = pad_right(examples(n=3), 2)
    grads, calls = [], []
    for checkpointing in (False, True):
        module = llama_module(method, gradient_checkpointing=checkpointing)
        module.configure_model()
        if method == "sds":  # the SDS parameterisation itself (after warm-up), not plain LoRA
            for layer in adapter_layers(module.model).values():
                layer.rebalance()
        layer = next(iter(adapter_layers(module.model).values()))
        count = [0]
        layer.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        loss_sum, n = module.task.loss(module.model, batch)
        (loss_sum / n).backward()
        grads.append({k: p.grad.clone() for k, p in module.model.named_parameters() if p.requires_grad})
        calls.append(count[0])
        assert not module.model.model.embed_tokens.weight.requires_grad  # frozen embeddings
    assert calls == [1, 2]  # with checkpointing the block really is recomputed in backward
    assert set(grads[0]) == set(grads[1])
    for k in grads[0]:
        assert grads[0][k].abs().max() > 0, k
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


# -- generation ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "dora", "sds"])
def test_merged_and_unmerged_models_generate_the_same_tokens(method):
    model = tiny_llama()
    base = tiny_llama()
    inject_adapters(model, AdapterConfig(method=method, r=2, init_b_std=0.5), verbose=False)
    if method == "sds":
        for layer in adapter_layers(model).values():
            assert isinstance(layer, SDSLayer)
            layer.rebalance()
    prompts = torch.tensor([[1, 10, 11, 12, 13], [2, 1, 20, 21, 22]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])  # left padding
    options = GenerationOptions(max_new_tokens=8)
    unmerged = generate_tokens(model, prompts, mask, options)
    merge_adapters(model)
    merged = generate_tokens(model, prompts, mask, options)
    assert unmerged.shape == (2, 8)
    assert torch.equal(unmerged, merged)
    assert not torch.equal(unmerged, generate_tokens(base, prompts, mask, options))  # the adapters do matter


# -- precision and memory --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_bf16_precisions_and_a_bf16_base_train_every_method(method):
    rows = examples(n=4)
    for precision, dtype, base_dtype, adapter_dtype in (
        ("bf16-true", None, torch.bfloat16, torch.bfloat16),
        ("bf16-mixed", None, torch.float32, torch.float32),
        ("32-true", "bf16", torch.bfloat16, torch.float32),  # model.dtype: bf16 base, fp32 adapters
    ):
        module = LoRAModule(
            tiny_llama(), adapter=AdapterConfig(method=method, r=2), lr=0.05, warmup=0, init_seed=0, dtype=dtype,
        )
        trainer = cpu_trainer(max_steps=3, precision=precision)
        trainer.fit(module, train_dataloaders=lm_loader(rows, 2))
        layer = next(iter(adapter_layers(module.model).values()))
        assert layer.base.weight.dtype == base_dtype, precision
        assert layer.lora_B.dtype == adapter_dtype, precision
        assert layer.lora_B.abs().max() > 0, precision  # B started at 0: it trained
        assert math.isfinite(float(trainer.callback_metrics["train_loss"])), precision
        moments = [s["exp_avg"].dtype for s in trainer.optimizers[0].state.values()]
        assert moments and set(moments) == {adapter_dtype}, precision  # AdamW state in the adapters' dtype


def test_model_dtype_keeps_a_trained_head_in_float32(tiny_bert_dir):
    module = LoRAModule(tiny_bert_dir, num_classes=2, adapter=AdapterConfig(r=2), dtype="bf16", init_seed=0)
    module.configure_model()
    assert module.model.classifier.weight.dtype == torch.float32
    assert module.model.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    batch = {"input_ids": torch.tensor([[2, 5, 6, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "labels": torch.tensor([1])}
    loss_sum, n = module.task.loss(module.model, batch)
    loss_sum.backward()
    assert module.model.classifier.weight.grad.dtype == torch.float32


# -- the generation callback -----------------------------------------------------------------------------------
def test_generation_samples_and_exact_match_at_validation(tiny_llama_dir, sft_files, tmp_path):
    import json

    from lora_lightning.callbacks import GenerationSamples
    from lora_lightning.data import CausalLMDataModule

    dm = CausalLMDataModule(backbone=tiny_llama_dir, train_file=sft_files["train"], val_file=sft_files["val"],
                            prompt_template="question {instruction} answer", max_length=32, batch_size=4)
    module = LoRAModule(tiny_llama_dir, adapter=AdapterConfig(r=4), lr=0.03, warmup=0, init_seed=0,
                        generation={"max_new_tokens": 3})
    samples = GenerationSamples(num_samples=2, exact_match=True, output=tmp_path / "gen.jsonl")
    trainer = cpu_trainer(max_steps=4, val_check_interval=2, callbacks=[samples])  # 6 batches per epoch
    trainer.fit(module, datamodule=dm)
    lines = [json.loads(x) for x in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 2, 4, 4]
    assert all(x["prompt"].startswith("<s> question what is") and x["prompt"].endswith("answer") for x in lines)
    assert [x["reference"] for x in lines[:2]] == [json.loads(r)["output"] for r in open(sft_files["val"])][:2]
    # exact match recomputed by hand from greedy completions of every validation row
    rows = dm.generation_examples("val")
    batch = pad_left(rows, dm.tokenizer.pad_token_id)
    tokens = generate_tokens(module.model, batch["input_ids"], batch["attention_mask"], GenerationOptions(3))
    completions = [dm.decode(strip_after_eos(t, dm.tokenizer.eos_token_id)) for t in tokens.tolist()]
    em = sum(c.strip() == r["reference"] for c, r in zip(completions, rows)) / len(rows)
    assert float(trainer.callback_metrics["val_exact_match"]) == pytest.approx(em)
    assert 0.0 <= float(trainer.callback_metrics["val_contains"]) <= 1.0


def test_readme_own_module_example_trains(tiny_llama_dir, sft_files):
    """The "your own LightningModule" example of README's language-model section, on the tiny Llama."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Fine-tune a language model"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code[: code.index("data = CausalLMDataModule(")]  # the class; data and Trainer are the hub ones
    namespace: dict = {}
    exec(compile(code.replace('NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"', f"NAME = {tiny_llama_dir!r}"),
                 "README.md", "exec"), namespace)
    from lora_lightning.data import CausalLMDataModule

    module = namespace["MySFT"]()
    assert {type(m).__name__ for m in adapter_layers(module).values()} == {"DoRALayer"}
    data = CausalLMDataModule(tokenizer=tiny_llama_dir, train_file=sft_files["chat"], val_file=sft_files["chat"],
                              batch_size=2)
    trainer = cpu_trainer(max_steps=2)
    trainer.fit(module, datamodule=data)
    assert math.isfinite(float(trainer.callback_metrics["val_loss"]))
    assert all(layer.lora_B.abs().max() > 0 for layer in adapter_layers(module).values())  # trained
