"""Causal-LM training step: tokens/s and memory of lora_lightning's LoRA / DoRA vs PEFT's, one Llama model.

    python benchmarks/llm_step_time.py                                   # SmolLM2-135M shape, CPU fp32
    python benchmarks/llm_step_time.py --layers 8 --rounds 5             # quicker
    python benchmarks/llm_step_time.py --variants lora,peft-lora --grad-ckpt
    python benchmarks/llm_step_time.py --device cuda --dtype bf16 --preset 0.5b --batch 8 --seq 1024

The model is a ``LlamaForCausalLM`` built from a config (random weights, seed 0, identical in every process):
by default the shape of SmolLM2-135M (hidden 576, 30 layers, 9 heads / 3 KV heads, MLP 1536, vocab 49,152,
tied embeddings), or ``--preset 0.5b`` (hidden 1024, 24 layers, 16/16 heads, MLP 4096, vocab 32,000:
≈ 0.5 B parameters, for a GPU). Adapters on all seven projections (q k v o gate up down), r=16, α=32, no
dropout, nothing else trained (PEFT: ``LoraConfig(..., use_dora=...)``; ours: ``inject_adapters`` with
``modules_to_save=[]``); AdamW over the adapter parameters; the same random batch (``--batch`` × ``--seq``
tokens, loss on every token).

Fair measurement: every (variant, round) is a fresh process, and the rounds interleave the variants
(rotating their order each round), so machine noise, allocator state and warm caches hit all alike.
Each process runs ``--warmup`` untimed steps, then ``--steps`` timed ones, and reports:

* step time → tokens/s = batch·seq / median step time; and the process CPU time of each step
  (``time.process_time``: on a shared machine, time spent waiting for a core does not count, so with
  ``--threads 1`` it is the steadier measure of the work a step does);
* on CPU, the bytes held for backward = RSS growth over the forward (RSS after the loss, graph alive,
  minus RSS before), with ``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0`` so freed blocks go
  back to the OS and RSS tracks live memory; and the bytes autograd saves for backward (a
  ``saved_tensors_hooks`` count, one extra untimed step); the peak RSS over the timed steps (VmHWM, reset
  after warm-up through ``/proc/self/clear_refs``, so building the model does not count);
* on CUDA, peak allocated memory (``torch.cuda.max_memory_allocated``) and the allocated growth over
  the forward.
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
from contextlib import contextmanager

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("lora", "peft-lora", "dora", "peft-dora")
PRESETS = {
    # SmolLM2-135M (the shape of the model in configs/sft_offline.yaml)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    # ≈ 0.5 B parameters, Llama-2 style (for a GPU)
    "0.5b": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=32000, tie_word_embeddings=False),
}


# -- one measurement (child process) ----------------------------------------------------------------------
def build_model(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(PRESETS[args.preset])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=max(2048, args.seq), rms_norm_eps=1e-5,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config)
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
    return model


def add_adapters(model, variant: str, r: int):
    import torch

    if variant.startswith("peft-"):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0,
                         use_dora=variant == "peft-dora")
        model = get_peft_model(model, cfg)  # keeps adapters in fp32 (autocast_adapter_dtype=True)
    else:
        from lora_lightning import AdapterConfig, inject_adapters

        inject_adapters(model, AdapterConfig(method=variant, r=r, alpha=2 * r, target_modules=TARGETS,
                                             modules_to_save=[]), verbose=False)
        for name, p in model.named_parameters():  # adapters in fp32 over a bf16 base, as PEFT does
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    return model


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """VmHWM: the peak RSS since the last ``reset_peak_rss`` (else since the start), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def saved_bytes(counter: list[int]):
    """Count the bytes autograd saves for backward (distinct storages)."""
    import torch

    seen: set[int] = set()

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            counter[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def measure(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = add_adapters(build_model(args), args.variant, args.r).to(device).train()
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size if hasattr(model, "config") else 32000
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    cpu_times: list[float] = []

    def step(held: list | None = None, saved: list | None = None) -> float:
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        before = torch.cuda.memory_allocated() if cuda else rss_bytes()
        with autocast:
            if saved is not None:
                with saved_bytes(saved):
                    loss = model(**batch).loss
            else:
                loss = model(**batch).loss
        if held is not None:
            sync()
            held.append((torch.cuda.memory_allocated() if cuda else rss_bytes()) - before)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        cpu_times.append(time.process_time() - c0)
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()  # the peak of the training steps, not of building the model
    held: list[int] = []
    cpu_times.clear()
    times = [step(held=held) for _ in range(args.steps)]
    cpu = list(cpu_times)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    saved = [0]
    step(saved=saved)
    return {"variant": args.variant, "times": times, "cpu_times": cpu, "held": statistics.median(held), "saved": saved[0],
            "peak": peak, "trainable": sum(p.numel() for p in params),
            "params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads()}


# -- the interleaved schedule (parent) -------------------------------------------------------------------
def child_command(args, variant: str) -> list[str]:
    cmd = [sys.executable, __file__, "--child", variant]
    for key in ("preset", "layers", "batch", "seq", "r", "steps", "warmup", "device", "dtype", "threads"):
        cmd += [f"--{key}", str(getattr(args, key))]
    if args.grad_ckpt:
        cmd.append("--grad-ckpt")
    return cmd


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--preset", default="smollm2-135m", choices=list(PRESETS))
    p.add_argument("--layers", type=int, default=0, help="override the number of decoder layers (0 = preset)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per variant (interleaved)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (non-reentrant)")
    p.add_argument("--json", default="", help="also write the per-process results here")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.variant = args.child
        print("RESULT " + json.dumps(measure(args)), flush=True)
        return

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    results: dict[str, list[dict]] = {v: [] for v in names}
    t_start = time.perf_counter()
    for rnd in range(args.rounds):
        order = names[rnd % len(names):] + names[: rnd % len(names)]
        for variant in order:
            proc = subprocess.run(child_command(args, variant), env=env, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                raise SystemExit(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            res = json.loads(lines[-1][len("RESULT "):])
            results[variant].append(res)
            print(f"round {rnd + 1}/{args.rounds} {variant:10s} median {1e3 * statistics.median(res['times']):8.1f} ms"
                  f"  held {res['held'] / 2**20:8.1f} MiB", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)

    tokens = args.batch * args.seq
    first = results[names[0]][0]
    cuda = args.device.startswith("cuda")
    print(f"\nLlama ({args.preset}{f', {args.layers} layers' if args.layers else ''}: {first['params'] / 1e6:.1f} M "
          f"parameters) causal-LM train step, batch {args.batch} × seq {args.seq} = {tokens} tokens, r={args.r} on "
          f"{len(TARGETS)} projections, {args.device} {args.dtype}{', gradient checkpointing' if args.grad_ckpt else ''},"
          f" threads={first['threads']}; {args.rounds} fresh processes × {args.steps} timed steps each, interleaved"
          f" ({time.perf_counter() - t_start:.0f} s)")
    held_label, peak_label = ("held fwd→bwd MiB", "peak alloc MiB") if cuda else ("held (RSS) MiB", "peak RSS MiB")
    print(f"{'variant':10s} {'median ms':>10s} {'min ms':>8s} {'max ms':>8s} {'CPU ms':>8s} {'tokens/s':>9s} {held_label:>17s} "
          f"{'autograd-saved MiB':>19s} {peak_label:>13s} {'trainable':>10s}")
    summary = {}
    for v in names:
        times = [t for res in results[v] for t in res["times"]]
        cpu = [t for res in results[v] for t in res.get("cpu_times", [])]
        cpu_med = statistics.median(cpu) if cpu else float("nan")
        med = statistics.median(times)
        held = statistics.median(res["held"] for res in results[v])
        saved = statistics.median(res["saved"] for res in results[v])
        peak = statistics.median(res["peak"] for res in results[v])
        summary[v] = (med, held, peak, cpu_med)
        print(f"{v:10s} {1e3 * med:10.1f} {1e3 * min(times):8.1f} {1e3 * max(times):8.1f} {1e3 * cpu_med:8.1f} {tokens / med:9.0f} "
              f"{held / 2**20:17.1f} {saved / 2**20:19.1f} {peak / 2**20:13.0f} {results[v][0]['trainable']:10,d}")
    for ours, theirs in (("lora", "peft-lora"), ("dora", "peft-dora")):
        if ours in summary and theirs in summary:
            (t_o, h_o, p_o, c_o), (t_t, h_t, p_t, c_t) = summary[ours], summary[theirs]
            print(f"{ours} / {theirs}: time {t_o / t_t:.3f}, CPU time {c_o / c_t:.3f}, held {h_o / h_t:.3f}, "
                  f"peak {p_o / p_t:.3f}")


if __name__ == "__main__":
    main()
