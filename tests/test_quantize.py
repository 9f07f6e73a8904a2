"""QLoRA: NF4 storage of the frozen linears, adapter math on a 4-bit base, merging without rounding ΔW away,
streaming loading whose peak memory stays near the 4-bit size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("torchao")

from tiny_models import quantizable_llama, randomize_adapters  # noqa: E402

from lora_lightning import AdapterConfig, adapter_layers, inject_adapters, merge_adapters  # noqa: E402
from lora_lightning.adapters import ADAPTER_METHODS  # noqa: E402
from lora_lightning.quantize import (  # noqa: E402
    dequantize,
    is_quantized,
    load_quantized,
    quantize_model,
    weight_bytes,
)


def tiny_llama(vocab=96, hidden=128, inter=256, layers=2, tie=False):
    return quantizable_llama(vocab=vocab, hidden=hidden, inter=inter, layers=layers, tie=tie)


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("shape, group", [((256, 192), 256), ((576, 576), 216)])
def test_nf4_codes_are_the_nearest_level_and_match_torchao(shape, group):
    """Our NF4Tensor has torchao's scales exactly, and each weight's code is its nearest level: never farther
    from the weight than torchao's choice, and the same code for all but bf16 near-ties. A weight whose block
    count 256 does not divide (SmolLM2's 576×576: 5184 blocks) gets the largest group ≤ 256 dividing it."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4 as torchao_to_nf4

    from lora_lightning.quantize import to_nf4

    w = (torch.randn(*shape) * 0.05).to(torch.bfloat16)
    ours, theirs = to_nf4(w), torchao_to_nf4(w, 64, group)
    assert ours.scaler_block_size == group
    torch.testing.assert_close(ours.quantized_scalers, theirs.quantized_scalers, rtol=0, atol=0)
    torch.testing.assert_close(ours.quantization_factor, theirs.quantization_factor, rtol=0, atol=0)
    err_ours = (ours.get_original_weight().float() - w.float()).abs()
    err_theirs = (theirs.get_original_weight().float() - w.float()).abs()
    assert (err_ours <= err_theirs + 1e-3 * w.float().abs().max()).all()
    assert (ours.quantized_data != theirs.quantized_data).float().mean() < 0.01


def test_every_frozen_linear_is_nf4_and_lm_head_embeddings_stay_dense():
    model = tiny_llama()
    report = quantize_model(model, "nf4")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    quantized = {n for n, m in linears.items() if is_quantized(m.weight)}
    assert quantized == {n for n in linears if n.endswith(LINEARS)}
    # k_proj/v_proj are 128→64: 128 blocks of 64, so their double-quantisation group is 128 blocks, not 256
    assert {m.weight.scaler_block_size for n, m in linears.items() if n.endswith(("k_proj", "v_proj"))} == {128}
    assert not is_quantized(model.lm_head.weight) and "lm_head" in report.kept
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert report.quantized_bytes / report.dense_bytes < 0.3  # 4.127 bits / 16
    assert report.quantized_bytes == sum(weight_bytes(linears[n].weight) for n in quantized)


def test_scaler_group_size_is_the_largest_divisor_up_to_256():
    from lora_lightning.quantize import quantizable_linears, scaler_group_size

    assert scaler_group_size(4096 * 4096) == 256 and scaler_group_size(896 * 128) == 256  # Llama, Qwen k_proj
    assert scaler_group_size(576 * 576) == 216 and scaler_group_size(192 * 576) == 216  # SmolLM2 q, k
    assert scaler_group_size(64 * 97) == 97  # a prime block count up to 256 is one group
    assert scaler_group_size(64 * 257) is None and scaler_group_size(64 * 31) is None and scaler_group_size(100) is None
    model = nn.Sequential(nn.Linear(257, 64), nn.Linear(64, 64))
    assert quantizable_linears(model) == (["1"], ["0"])  # 64·257 weights: no group, kept dense


def test_quantize_lm_head_option_and_errors():
    model = tiny_llama(hidden=128, vocab=128)
    quantize_model(model, "nf4", quantize_lm_head=True)
    assert is_quantized(model.lm_head.weight)
    with pytest.raises(ValueError, match="choose one of none, nf4, bnb-nf4"):
        quantize_model(tiny_llama(), "int3")
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(TypeError, match="Conv1D.*quantize='none'"):
        quantize_model(gpt2, "nf4")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_bnb_nf4_without_cuda_names_the_alternative():
    with pytest.raises(RuntimeError, match="needs a CUDA device.*quantize='nf4'"):
        quantize_model(tiny_llama(), "bnb-nf4")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("method", sorted(ADAPTER_METHODS))
def test_adapter_on_nf4_base_equals_dequantised_reference(method, fused):
    """Forward and gradients (A, B, magnitude, input) of an adapter on an NF4 base equal the same adapter on a
    dense base holding the dequantised weight, on the fused Function and on the plain autograd path."""
    torch.manual_seed(0)
    dense = nn.Linear(128, 256, bias=True)  # fp32 compute dtype, so the comparison can be tight
    quant = nn.Linear(128, 256, bias=True)
    quantize_model(nn.Sequential(quant), "nf4")  # quantises the frozen weight of the Sequential's child
    dense.load_state_dict({"weight": dequantize(quant.weight), "bias": quant.bias.detach()})
    config = AdapterConfig(method=method, r=4, target_modules=["0"], dropout=0.0, fused=fused)
    models = [nn.Sequential(dense), nn.Sequential(quant)]
    for model in models:
        for p in model.parameters():
            p.requires_grad_(False)
        torch.manual_seed(1)
        inject_adapters(model, config, verbose=False)
        layer = model[0]
        with torch.no_grad():
            layer.lora_B.normal_()  # a non-zero ΔW, so the test sees the adapter path
        if method == "sds":
            layer.rebalance()
    assert models[1][0].lora_A.dtype == torch.float32  # QLoRA: adapters stay fp32 on a 4-bit base
    with torch.no_grad():  # the reference gets the very same fp32 adapter tensors
        for name, tensor in models[1][0].adapter_state_dict().items():
            module_name, _, attr = name.rpartition(".")
            owner = models[0][0].get_submodule(module_name) if module_name else models[0][0]
            value = tensor.clone()
            if attr in owner._parameters:
                owner._parameters[attr] = nn.Parameter(value)
            else:
                owner._buffers[attr] = value
    x = torch.randn(5, 128)
    outs, grads = [], []
    for model in models:
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        out.float().square().sum().backward()
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-5)
    assert models[1][0].base.weight.grad is None
    assert is_quantized(models[1][0].base.weight)


def _nf4_and_dequantised_llama(**adapter):
    """(NF4 Llama, dense Llama holding the dequantised weights), float32 compute, the same adapters."""
    quant = quantizable_llama().float()
    quantize_model(quant, "nf4")
    dense = quantizable_llama().float()
    dense.load_state_dict({k: dequantize(v) for k, v in quant.state_dict().items()})
    for model in (quant, dense):
        torch.manual_seed(1)
        inject_adapters(model, AdapterConfig(r=4, modules_to_save=[], **adapter), verbose=False)
        randomize_adapters(model, seed=2, std=0.05)
    return quant, dense


def test_fused_gated_mlp_on_nf4_equals_dequantised_reference_and_keeps_no_dense_w0():
    """The whole-MLP Function (gate/up/down adapted) on NF4 projections: logits and every adapter gradient equal
    the dense reference's (float32, then under bf16 autocast); nothing saved for backward is a dense copy of an
    NF4 weight (W0 is dequantised per call, never kept)."""
    from lora_lightning.adapters.gated_mlp import is_patched

    quant, dense = _nf4_and_dequantised_llama()
    assert all(is_patched(m) for m in (quant.model.layers[0].mlp, dense.model.layers[0].mlp))
    nf4_shapes = {tuple(p.shape) for p in quant.parameters() if is_quantized(p)}
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    for autocast, tol in ((False, 1e-5), (True, 2e-2)):
        results = []
        for model in (quant, dense):
            saved = []

            def pack(t, saved=saved):
                saved.append((type(t).__name__, tuple(t.shape), t.is_floating_point()))
                return t

            model.zero_grad()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            results.append((out.logits.float(), grads, saved))
        (logits_q, grads_q, saved_q), (logits_d, grads_d, _) = results
        torch.testing.assert_close(logits_q, logits_d, rtol=tol, atol=tol)
        assert grads_q.keys() == grads_d.keys() and len(grads_q) == 2 * 14
        for name, g in grads_q.items():
            torch.testing.assert_close(g, grads_d[name], rtol=tol, atol=tol * g.abs().max().item())
        dense_copies = [s for s in saved_q if s[0] != "NF4Tensor" and s[2] and s[1] in nf4_shapes]
        assert not dense_copies and any(s[0] == "NF4Tensor" for s in saved_q)


def test_qdora_caches_row_norms_of_the_dequantised_w0():
    """QDoRA: ‖W0_i‖² comes from the dequantised W0, is computed once and reused while W0 stays the same; the
    magnitude starts at ‖deq(W0) + s·B·A‖, so the layer starts at the 4-bit base model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256, bias=False))
    quantize_model(model, "nf4")
    inject_adapters(model, AdapterConfig(method="dora", r=4, target_modules=["0"]), verbose=False)
    layer = model[0]
    w0 = dequantize(layer.base.weight).float()
    first = layer._w0_row_sq(torch.float32)
    assert layer._w0_row_sq(torch.float32) is first  # cached
    torch.testing.assert_close(first, w0.square().sum(1))
    torch.testing.assert_close(layer.magnitude.detach(), w0.norm(dim=1))
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), x @ w0.T)


def test_quantising_after_injection_keeps_doras_row_scale():
    """quantize_model after inject_adapters (how LoRAModule does it): DoRA's m is rescaled by n_4bit/n_dense, so
    a fresh layer starts at the 4-bit base, exactly as when the base was quantised first."""
    torch.manual_seed(0)
    after = nn.Sequential(nn.Linear(128, 256, bias=False))
    before = nn.Sequential(nn.Linear(128, 256, bias=False))
    before.load_state_dict(after.state_dict())
    inject_adapters(after, AdapterConfig(method="dora", r=4, target_modules=["0"]), verbose=False)
    quantize_model(after, "nf4")
    quantize_model(before, "nf4")
    inject_adapters(before, AdapterConfig(method="dora", r=4, target_modules=["0"]), verbose=False)
    torch.testing.assert_close(after[0].magnitude, before[0].magnitude, rtol=1e-6, atol=1e-7)


def test_module_casts_keep_4bit_weights_4bit(tmp_path):
    """LoRAModule with quantize="nf4": a pretrained causal LM is streamed in 4 bits; module dtype casts
    (Lightning's bf16-true convert_module, .to(dtype)) leave the 4-bit weights 4-bit; errors name the fix."""
    from lora_lightning import LoRAModule

    quantizable_llama().save_pretrained(tmp_path / "m")
    module = LoRAModule(str(tmp_path / "m"), quantize="nf4", dtype="bf16", init_seed=0)
    module.configure_model()
    count = sum(is_quantized(p) for p in module.parameters())
    assert count == 14 and len(module._ddp_params_and_buffers_to_ignore) == 14  # kept out of DDP's broadcast
    module.to(torch.bfloat16)
    module.float()
    assert sum(is_quantized(p) for p in module.parameters()) == count
    assert module.model.model.layers[0].self_attn.q_proj.lora_A.dtype == torch.float32
    with pytest.raises(ValueError, match="choose one of none, nf4, bnb-nf4"):
        LoRAModule(str(tmp_path / "m"), quantize="int4")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA device.*quantize='nf4'"):
            LoRAModule(str(tmp_path / "m"), quantize="bnb-nf4")


@pytest.mark.parametrize("method", sorted(ADAPTER_METHODS))
def test_each_method_trains_a_tiny_llama_on_an_nf4_base(method, tmp_path):
    """Every method, through LoRAModule + Trainer (its callbacks included) on a bf16 Llama whose frozen linears
    are NF4, with gradient checkpointing: the training loss falls, the base stays 4-bit and gets no gradient."""
    from lightning.pytorch import Trainer
    from test_causal_lm import examples, lm_loader

    from lora_lightning import LoRAModule
    from lora_lightning.module import default_lr

    rows = examples(seed=3, n=4, vocab=96)
    adapter = AdapterConfig(method=method, r=4)
    module = LoRAModule(quantizable_llama(), adapter=adapter, quantize="nf4", dtype="bf16", gradient_checkpointing=True,
                        lr=10 * default_lr(adapter), warmup=0, scheduler="constant", init_seed=0)
    batch = next(iter(lm_loader(rows, 4)))

    def loss() -> float:
        with torch.no_grad():
            total, n = module.task.loss(module.model, batch)
        return (total / n).item()

    module.configure_model()
    start = loss()
    trainer = Trainer(max_steps=8, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=lm_loader(rows, 4))
    end = loss()
    print(f"{method}: loss {start:.3f} → {end:.3f}")
    assert end < start - 0.5
    weights = [p for p in module.model.parameters() if is_quantized(p)]
    assert len(weights) == 14 and all(p.grad is None for p in weights)


def test_export_merged_of_a_qlora_model_matches_its_logits(tmp_path):
    """export_merged dequantises W0 to bf16, merges there and writes a plain bf16 model whose logits match the
    trained QLoRA model's within bf16 rounding (both share W0's 4-bit rounding); merging into 4-bit codes instead
    (requantize) moves them by far more. The PEFT export records the 4-bit base."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from lora_lightning import save_adapter
    from lora_lightning.interop import export_merged

    model = quantizable_llama()
    inject_adapters(model, AdapterConfig(method="dora", r=4, dtype="float32", modules_to_save=[]), verbose=False)
    quantize_model(model, "nf4")
    randomize_adapters(model, std=0.05)
    export_merged(model, tmp_path / "merged", requantize=True)
    check = json.loads((tmp_path / "merged" / "merge_check.json").read_text())
    print(check)
    assert check["ok"] and check["dtype"] == "bfloat16"
    assert check["max_abs_diff"] <= check["tolerance"] < 0.05 * check["adapter_effect"]
    assert check["requantized_max_abs_diff"] > 4 * check["max_abs_diff"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16 and not any(is_quantized(p) for p in merged.parameters())
    assert all(is_quantized(layer.base.weight) for layer in adapter_layers(model).values())  # model left as it was

    save_adapter(model, tmp_path / "peft", format="peft")
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as f:
        record = json.loads(f.metadata()["lora_lightning"])["base_quantization"]
    assert record["method"] == "nf4" and record["bitsandbytes_config"]["bnb_4bit_use_double_quant"]
    assert "BitsAndBytesConfig(" in (tmp_path / "peft" / "README.md").read_text()


def test_merge_dequantises_so_the_update_is_not_rounded_away():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256))
    quantize_model(model, "nf4")
    inject_adapters(model, AdapterConfig(r=4, target_modules=["0"]), verbose=False)
    with torch.no_grad():
        model[0].lora_B.normal_(std=1e-3)  # far below NF4's step at this weight scale
    x = torch.randn(7, 128)
    before = model(x)
    merge_adapters(model)
    assert not is_quantized(model[0].base.weight)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def _save_llama(path, **kwargs):
    model = tiny_llama(**kwargs)
    model.save_pretrained(path)
    return model


def test_streaming_load_equals_quantising_the_loaded_model(tmp_path):
    from transformers import AutoModelForCausalLM

    _save_llama(tmp_path / "m", tie=True)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    quantize_model(reference, "nf4")
    loaded, report = load_quantized(AutoModelForCausalLM, str(tmp_path / "m"), dtype=torch.bfloat16)
    assert len(report.quantized) == 14
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied stays tied
    ids = torch.randint(0, 96, (2, 9))
    torch.testing.assert_close(loaded(input_ids=ids).logits, reference.eval()(input_ids=ids).logits)


PEAK_SCRIPT = r"""
import re, sys, torch
from transformers import AutoModelForCausalLM
from lora_lightning.quantize import load_quantized
torch.set_num_threads(1)
def status(key):
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
load_quantized(AutoModelForCausalLM, sys.argv[2])  # a tiny model first: imports and one-off allocations
rss = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
model, report = load_quantized(AutoModelForCausalLM, sys.argv[1])
print(status("VmHWM") - rss, report.quantized_bytes, report.dense_bytes)
"""


@pytest.mark.timeout(240)
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
def test_streaming_load_peak_memory_stays_near_4bit_size(tmp_path):
    """An 8-layer, 1024-wide Llama (101M linear weights: 194 MiB in bf16), written straight to safetensors:
    loading it quantised raises the process's peak RSS by about the NF4 size, far below the bf16 size."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=256, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64,
    )
    shapes = {"model.embed_tokens.weight": (256, 1024), "model.norm.weight": (1024,), "lm_head.weight": (256, 1024)}
    for i in range(8):
        for name, shape in (
            ("self_attn.q_proj", (1024, 1024)), ("self_attn.k_proj", (1024, 1024)),
            ("self_attn.v_proj", (1024, 1024)), ("self_attn.o_proj", (1024, 1024)),
            ("mlp.gate_proj", (2816, 1024)), ("mlp.up_proj", (2816, 1024)), ("mlp.down_proj", (1024, 2816)),
        ):
            shapes[f"model.layers.{i}.{name}.weight"] = shape
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (1024,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (1024,)
    generator = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    (tmp_path / "big").mkdir()
    save_file(state, str(tmp_path / "big" / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(tmp_path / "big")
    dense_bytes = sum(t.numel() * 2 for k, t in state.items() if k.endswith("proj.weight"))
    del state
    _save_llama(tmp_path / "tiny")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "big"), str(tmp_path / "tiny")], capture_output=True, text=True, env=env, timeout=200
    )
    assert out.returncode == 0, out.stderr[-2000:]
    growth, quantized, dense = map(int, out.stdout.split()[-3:])
    assert dense == dense_bytes
    print(json.dumps({"peak_growth_MiB": growth / 2**20, "nf4_MiB": quantized / 2**20, "bf16_MiB": dense / 2**20}))
    # the NF4 weights (0.26× bf16) + one layer in flight (a 5.5 MiB bf16 tensor and its fp32 temporaries)
    assert growth < quantized + 32 * 2**20, (growth / 2**20, quantized / 2**20)
    assert growth < 0.5 * dense_bytes
