"""Held-for-backward bytes and step time of ONE adapted layer and ONE adapted gated-MLP block: our fused path vs
our plain path (``AdapterConfig(fused=False)``) vs PEFT.

    python benchmarks/fused_layer.py                       # Qwen2.5-0.5B dims, 2 × 512 tokens, r = 16, α = 32
    python benchmarks/fused_layer.py --rounds 5 --steps 10 --threads 2

Units (Qwen2.5-0.5B's real dimensions, random weights, fp32): "layer" = one up_proj Linear 896 → 4864; "mlp" =
one Qwen2MLP (gate/up 896 → 4864, SiLU, down 4864 → 896) with all three projections adapted. The input
(2 × 512 × 896) requires grad, as a hidden state does inside a network.

Every (unit, implementation, method, dropout) config runs in a fresh process, configs interleaved round by round
(``--rounds``), so machine noise hits all alike. Per run, after two warm-up steps:
- held: the process's RSS growth over one forward (the output stays alive), with glibc told to hand large blocks
  straight back (MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0, set for the child processes);
- saved: the bytes autograd keeps for backward as ``torch.autograd.graph.saved_tensors_hooks`` sees them, unique
  storages, without the model's parameters (kept by reference) and without the input (it exists anyway);
- step: median time of ``--steps`` forward + backward passes.
The table gives the median over rounds and the ratio of held bytes to PEFT's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, INTERMEDIATE, TOKENS = 896, 4864, (2, 512)
R, ALPHA = 16, 32
MIB = 2**20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(unit: str, impl: str, method: str, dropout: float):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if unit == "layer":
        model = nn.Sequential(nn.Linear(HIDDEN, INTERMEDIATE, bias=False))
        targets = ["0"]
    else:
        from transformers import Qwen2Config
        from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

        config = Qwen2Config(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_attention_heads=14,
                             num_key_value_heads=2, hidden_act="silu")
        model = nn.Sequential(Qwen2MLP(config))
        targets = ["gate_proj", "up_proj", "down_proj"]
    if impl == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=targets,
                            use_dora=method == "dora")
        model = get_peft_model(model, config)
    else:
        from lora_lightning import AdapterConfig, adapter_layers, inject_adapters

        inject_adapters(model, AdapterConfig(method=method, r=R, alpha=ALPHA, dropout=dropout, target_modules=targets,
                                             fused=impl == "fused"), verbose=False)
        with torch.no_grad():  # a trained-looking ΔW (B ≠ 0); PEFT's B stays 0, which costs it nothing
            for layer in adapter_layers(model).values():
                layer.lora_B.normal_(0, 0.01)
    model.train()
    return model


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    model = build(args.unit, args.impl, args.method, args.dropout)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    x = torch.randn(*TOKENS, HIDDEN, requires_grad=True)

    def step():
        y = model(x)
        y.sum().backward()

    for _ in range(2):
        step()
    model.zero_grad(set_to_none=True)
    x.grad = None
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr != x.untyped_storage().data_ptr():
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    before = rss()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    held = rss() - before
    y.sum().backward()
    del y
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"held": held, "saved": sum(saved.values()), "step": statistics.median(times)}))


CONFIGS = [
    (unit, impl, method, dropout)
    for unit in ("layer", "mlp")
    for method in ("lora", "dora")
    for dropout in (0.0, 0.05)
    for impl in ("fused", "plain", "peft")
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", default="lora,dora", help="comma list of lora, dora")
    p.add_argument("--child", nargs=4, metavar=("UNIT", "IMPL", "METHOD", "DROPOUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.unit, args.impl, args.method, args.dropout = args.child[:3] + [float(args.child[3])]
        return child(args)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
           "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    methods = args.methods.split(",")
    runs: dict[tuple, list[dict]] = {c: [] for c in CONFIGS if c[2] in methods}
    for r in range(args.rounds):
        for config in runs:
            cmd = [sys.executable, __file__, "--steps", str(args.steps), "--threads", str(args.threads), "--child",
                   *map(str, config)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            runs[config].append(json.loads(out.strip().splitlines()[-1]))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    med = {c: {k: statistics.median(run[k] for run in v) for k in ("held", "saved", "step")} for c, v in runs.items()}
    print(f"\n{TOKENS[0]}×{TOKENS[1]} tokens, hidden {HIDDEN}, intermediate {INTERMEDIATE}, r={R}, α={ALPHA}, fp32, "
          f"{args.threads} thread(s); median of {args.rounds} fresh processes × {args.steps} steps\n")
    print("| unit | method | dropout | implementation | step (ms) | held (MiB) | saved (MiB) | held / PEFT |")
    print("|---|---|---|---|---|---|---|---|")
    for config in runs:
        unit, impl, method, dropout = config
        m, peft = med[config], med[(unit, "peft", method, dropout)]
        print(f"| {unit} | {method} | {dropout:g} | {impl} | {1e3 * m['step']:.1f} | {m['held'] / MIB:.1f} | "
              f"{m['saved'] / MIB:.1f} | {m['held'] / peft['held']:.2f} |")


if __name__ == "__main__":
    main()
