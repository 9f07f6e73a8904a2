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
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).to(torch.bfloat16)


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_nf4_codes_are_the_nearest_level_and_match_torchao():
    """Our NF4Tensor has torchao's scales exactly, and each weight's code is its nearest level: never farther
    from the weight than torchao's choice, and the same code for all but bf16 near-ties."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4 as torchao_to_nf4

    from lora_lightning.quantize import to_nf4

    w = (torch.randn(256, 192) * 0.05).to(torch.bfloat16)
    ours, theirs = to_nf4(w), torchao_to_nf4(w, 64, 256)
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
    # k_proj/v_proj are 128→64: 8192 weights, fewer than one NF4 scaler block (64·256), so kept dense
    assert quantized == {n for n in linears if n.endswith(("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))}
    assert not is_quantized(model.lm_head.weight) and "lm_head" in report.kept
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert report.quantized_bytes / report.dense_bytes < 0.3  # 4.127 bits / 16
    assert report.quantized_bytes == sum(weight_bytes(linears[n].weight) for n in quantized)


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


@pytest.mark.parametrize("method", sorted(ADAPTER_METHODS))
def test_adapter_on_nf4_base_equals_dequantised_reference(method):
    """Forward and gradients (A, B, magnitude, input) of an adapter on an NF4 base equal the same adapter on a
    dense base holding the dequantised weight."""
    torch.manual_seed(0)
    dense = nn.Linear(128, 256, bias=True)  # fp32 compute dtype, so the comparison can be tight
    quant = nn.Linear(128, 256, bias=True)
    quantize_model(nn.Sequential(quant), "nf4")  # quantises the frozen weight of the Sequential's child
    dense.load_state_dict({"weight": dequantize(quant.weight), "bias": quant.bias.detach()})
    config = AdapterConfig(method=method, r=4, target_modules=["0"], dropout=0.0)
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
    assert len(report.quantized) == 10
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
