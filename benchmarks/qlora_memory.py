"""QLoRA memory and step time: frozen linears in NF4 vs bf16 on Qwen2.5-0.5B's dimensions.

    python benchmarks/qlora_memory.py                    # bytes table (24 layers) + step table (2 rounds)
    python benchmarks/qlora_memory.py --part bytes
    python benchmarks/qlora_memory.py --part step --rounds 3 --layers 4

Model: Qwen2.5-0.5B's real dimensions (hidden 896, MLP 4864, 14 heads / 2 KV heads, vocabulary 151,936, tied
embeddings), built from its config with random weights in bf16 (``model.dtype: bf16``).

bytes  (one process, all 24 layers) the bytes of every frozen linear in bf16 and in NF4 (``quantize_model``:
       4-bit codes, one 8-bit scale per 64 weights, one fp32 scale per 256 scales, torchao's NF4Tensor), the
       embeddings and norms (which stay bf16; the lm_head is tied to the embeddings), the whole model both ways,
       and the trainable state of LoRA r=16 on every linear (fp32 factors + gradients + AdamW's two moments).
step   (a fresh process per config, configs interleaved ``--rounds`` times, ``--layers`` decoder layers) one
       training step the way ``LoRAModule`` trains a causal LM (decoder → target-only chunked loss → backward →
       AdamW), batch 2 × 256 random tokens (the first quarter of each row a prompt, so 384 target tokens), LoRA
       r=16, α=32 on every linear, adapters fp32 over the bf16 (none) or NF4 (nf4) base:
         weights  RSS growth while building the model (the frozen base, adapters and optimiser state)
         held     RSS growth over the forward: what autograd keeps for backward (MALLOC_MMAP_THRESHOLD_=65536,
                  MALLOC_TRIM_THRESHOLD_=0 set for the child, so freed blocks leave RSS at once)
         peak     the child's peak RSS
         step     median wall time of the timed steps; tok/s = target tokens / step
On CPU the NF4 step dequantises each weight per matmul (forward and backward) into a one-layer temporary:
less memory, more time. Step times move ±15 % between runs on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
BATCH, SEQ, R, ALPHA = 2, 256, 16, 32
CONFIGS = ("none", "nf4")


def qwen_shaped(layers: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**{**MODEL, "num_hidden_layers": layers})
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        return Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


# ---------------------------------------------------------------------------------------------------- bytes
def bytes_table() -> None:
    import torch
    from torch import nn

    from lora_lightning import AdapterConfig, inject_adapters
    from lora_lightning.quantize import describe, quantize_model, weight_bytes

    model = qwen_shaped(MODEL["num_hidden_layers"])
    dense = {n: weight_bytes(m.weight) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    whole_bf16 = sum(p.numel() * p.element_size() for p in model.parameters())  # tied lm_head counted once
    report = inject_adapters(model, AdapterConfig(r=R, alpha=ALPHA, dtype="float32", modules_to_save=[]),
                             verbose=False)
    start = time.perf_counter()
    quantize_model(model, "nf4")
    seconds = time.perf_counter() - start
    state = describe(model, "nf4")
    frozen_bf16 = sum(b for n, b in dense.items() if n != "lm_head")
    embed = model.model.embed_tokens.weight
    embed_bytes = embed.numel() * embed.element_size()
    norms = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "norm" in n)
    adapters = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    whole_nf4 = sum(weight_bytes(p) for p in model.parameters() if not p.requires_grad)
    rows = [
        ("frozen linears (168)", frozen_bf16, state.quantized_bytes),
        ("embeddings = tied lm_head", embed_bytes, embed_bytes),
        ("norms", norms, norms),
        ("whole frozen model", whole_bf16, whole_nf4),
        (f"LoRA r={R} all-linear: fp32 factors", adapters, adapters),
        ("  + grads + AdamW moments", 3 * adapters, 3 * adapters),
        ("training state (model + LoRA + AdamW)", whole_bf16 + 4 * adapters, whole_nf4 + 4 * adapters),
    ]
    print(f"\nQwen2.5-0.5B-shaped model ({sum(p.numel() for p in model.parameters()):,} parameters with LoRA; "
          f"{len(state.quantized)} linears in NF4, quantised in {seconds:.1f} s; {report.trainable_params:,} "
          "trainable)")
    print(f"{'':40} {'bf16 MiB':>10} {'NF4 MiB':>10} {'ratio':>7}")
    for name, a, b in rows:
        print(f"{name:40} {mib(a):>10} {mib(b):>10} {b / a:>7.3f}")
    assert state.quantized_bytes <= 0.3 * frozen_bf16
    print(json.dumps({"frozen_linear_ratio": state.quantized_bytes / frozen_bf16, "whole_ratio": whole_nf4 / whole_bf16,
                      "frozen_bf16_MiB": frozen_bf16 / 2**20, "frozen_nf4_MiB": state.quantized_bytes / 2**20,
                      "whole_bf16_MiB": whole_bf16 / 2**20, "whole_nf4_MiB": whole_nf4 / 2**20,
                      "embedding_MiB": embed_bytes / 2**20, "quantize_seconds": seconds}))


# ---------------------------------------------------------------------------------------------------- step
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(config: str, layers: int, steps: int) -> dict:
    import torch

    from lora_lightning import AdapterConfig, LoRAModule

    torch.set_num_threads(1)
    torch.manual_seed(0)
    ids = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ))
    labels = ids.clone()
    labels[:, : SEQ // 4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    rss0 = rss_bytes()
    module = LoRAModule(qwen_shaped(layers), adapter=AdapterConfig(r=R, alpha=ALPHA), dtype="bf16", quantize=config,
                        init_seed=0)
    module.configure_model()
    model = module.model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(b: dict, measure: bool = False) -> int:
        before = rss_bytes()
        loss_sum, n = module.task.loss(model, b)
        held = rss_bytes() - before
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return held if measure else 0

    warm = {k: v[:, :16] for k, v in batch.items()}
    step(warm)
    step(warm)  # optimiser state allocated
    weights = rss_bytes() - rss0
    times, held = [], 0
    for i in range(steps):
        start = time.perf_counter()
        h = step(batch, measure=True)
        times.append(time.perf_counter() - start)
        held = max(held, h)
    step_s = statistics.median(times)
    tokens = int((labels[:, 1:] != -100).sum())
    return {"config": config, "weights": weights, "held": held, "step": step_s, "tok_s": tokens / step_s,
            "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def step_table(rounds: int, layers: int, steps: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    results: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    for _ in range(rounds):
        for config in CONFIGS:
            cmd = [sys.executable, __file__, "--child", config, "--layers", str(layers), "--steps", str(steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            results[config].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\nOne training step, {layers} layers of Qwen2.5-0.5B, batch {BATCH}×{SEQ}, LoRA r={R} all-linear, "
          f"fp32 adapters; median over {rounds} fresh processes × {steps} steps")
    print(f"{'base':6} {'weights MiB':>12} {'held MiB':>10} {'peak MiB':>10} {'step s':>8} {'tok/s':>8}")
    for config, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("weights", "held", "peak", "step", "tok_s")}
        print(f"{config:6} {mib(med['weights']):>12} {mib(med['held']):>10} {mib(med['peak']):>10} "
              f"{med['step']:>8.2f} {med['tok_s']:>8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("bytes", "step", "all"), default="all")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers in the step table")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.steps)))
        return
    if args.part in ("bytes", "all"):
        bytes_table()
    if args.part in ("step", "all"):
        step_table(args.rounds, args.layers, args.steps)


if __name__ == "__main__":
    main()
