"""One causal-LM LoRA training step, ours vs HF + PEFT: step time, target tokens/s, held bytes, peak RSS.

    python benchmarks/llm_step.py                         # every config, 2 rounds, table + docs/llm_step.png
    python benchmarks/llm_step.py --configs peft-lora-d0.05,lora-d0.05 --rounds 3
    python benchmarks/llm_step.py --list

Model: Qwen2.5-0.5B's real dimensions (hidden 896, MLP 4864, 14 heads / 2 KV heads, vocabulary 151,936,
tied embeddings), random init, 4 layers, fp32 on CPU. Batch 2 × 512 random tokens, the first quarter of
each row masked as prompt (labels -100), so 2 × 384 = 768 target tokens. LoRA r=16, α=32 on every linear
layer of the decoder (not lm_head); AdamW on the trainable tensors; callbacks a method needs
(``METHOD_CALLBACKS``) driven through their hooks.

Measures, each config in a fresh process (configs interleaved round-robin, ``--rounds`` times):
  step     wall time of forward + backward + optimiser step (median over the timed steps; the untimed
           warm-up steps run on 16 tokens per row, so the first full-size step is already a timed one)
  cpu      the process's CPU time over the same step (less sensitive to other processes on a shared
           machine than wall time, but it counts OpenMP threads spinning while they wait)
  tok/s    target tokens per second (768 / step)
  held     what the forward leaves alive for backward: RSS growth over the forward (loss included), with
           glibc told to return large blocks at once (MALLOC_MMAP_THRESHOLD_=65536,
           MALLOC_TRIM_THRESHOLD_=0, set for the child); this matches the bytes
           ``torch.autograd.graph.saved_tensors_hooks`` sees (parameters saved by reference excluded)
  peak     the child's peak RSS (ru_maxrss), model build included
  estimate (ours) what ``lora_lightning.memory.activation_bytes`` predicts for "held" (fit's memory report)

Ours runs the way ``LoRAModule`` trains a ``causal_lm`` task: decoder → final hidden states → the target-only
chunked loss (``lora_lightning.losses``); gradient checkpointing via transformers' own
``gradient_checkpointing_enable(use_reentrant=False)``. HF + PEFT: ``model(**batch, labels=labels).loss``.
Step times move ±15 % between runs on a shared 2-core machine: compare rows of one interleaved run.
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

MODEL = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=4, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
BATCH, SEQ = 2, 512
WARMUP_TOKENS = 16
R, ALPHA = 16, 32


def configs() -> dict[str, dict]:
    """name -> {impl: peft|ours|floor, method, dropout, ckpt}."""
    found = {
        "peft-lora-d0": dict(impl="peft", method="lora", dropout=0.0, ckpt=False),
        "peft-lora-d0.05": dict(impl="peft", method="lora", dropout=0.05, ckpt=False),
        "peft-lora-d0-ckpt": dict(impl="peft", method="lora", dropout=0.0, ckpt=True),
        "peft-dora-d0": dict(impl="peft", method="dora", dropout=0.0, ckpt=False),
        "floor": dict(impl="floor", method=None, dropout=0.0, ckpt=False),
    }
    for method in ("lora", "dora", "sds", "allora"):
        for dropout in (0.0, 0.05):
            if method == "allora" and dropout:  # ALLoRA trains without dropout by definition
                continue
            for ckpt in (False, True):
                name = f"{method}-d{dropout:g}" + ("-ckpt" if ckpt else "")
                found[name] = dict(impl="ours", method=method, dropout=dropout, ckpt=ckpt)
    return found


# ---------------------------------------------------------------------------------------------------- child
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(cfg: dict):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**MODEL, attn_implementation="sdpa"))
    callbacks = []
    if cfg["impl"] == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()  # input gradients through every layer, as with adapters
    elif cfg["impl"] == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=cfg["dropout"],
                                                 target_modules="all-linear", use_dora=cfg["method"] == "dora"))
    else:
        from lora_lightning import AdapterConfig, inject_adapters
        from lora_lightning.module import METHOD_CALLBACKS

        adapter = AdapterConfig(method=cfg["method"], r=R, alpha=ALPHA, dropout=cfg["dropout"],
                                target_modules="all-linear", exclude_modules=["lm_head"], modules_to_save=[])
        inject_adapters(model, adapter, verbose=False)
        callbacks = [cls() for cls in METHOD_CALLBACKS.get(cfg["method"], [])]
        if cfg["method"] == "sds":  # re-balance after the warm-up step, so the timed step runs SDS, not LoRA
            from lora_lightning.callbacks import SDSReorthonormalization

            callbacks = [SDSReorthonormalization(warmup_steps=1)]
    if cfg["ckpt"]:
        from lora_lightning.module import enable_gradient_checkpointing  # what model.gradient_checkpointing runs

        enable_gradient_checkpointing(model)
    return model.train(), callbacks


def make_batch():
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[:, : SEQ // 4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels


def loss_fn(cfg: dict, model, batch, labels, task):
    if cfg["impl"] != "ours":
        return model(**batch, labels=labels).loss
    out = task.forward(model, {**batch, "labels": labels})  # what LoRAModule.training_step runs
    return out.loss_sum / out.n_targets.clamp(min=1)


def child(name: str, steps: int, warmup: int) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from step_time import CallbackDriver

    from lora_lightning.tasks import CausalLM

    cfg = configs()[name]
    task = CausalLM()
    model, callbacks = build(cfg)
    batch, labels = make_batch()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    drivers = [CallbackDriver(cb, model, opt) for cb in callbacks]
    times, cpu, held = [], [], []
    # warm-up steps run on a 2 × 16-token slice with every label a target: thread pools, lazy inits, the task's
    # one-time lm_head check and the optimiser state are set up without paying a full step
    small = {k: v[:, :WARMUP_TOKENS] for k, v in batch.items()}, batch["input_ids"][:, :WARMUP_TOKENS].clone()
    for i in range(warmup + steps):
        b, y = small if i < warmup else (batch, labels)
        before = rss_bytes()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = loss_fn(cfg, model, b, y, task)
        held.append(rss_bytes() - before)
        loss.backward()
        for d in drivers:
            d.before_step()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        for d in drivers:
            d.after_step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        del loss
    estimate = None
    if cfg["impl"] == "ours":  # what fit's memory report says for this run (lora_lightning.memory)
        from lora_lightning.memory import activation_bytes

        estimate = activation_bytes(model, BATCH, SEQ, target_tokens=BATCH * (SEQ - SEQ // 4),
                                    loss_chunk_size=task.loss_chunk_size)
    return {
        "name": name, "times": times, "cpu": cpu, "held": held[-1], "estimate": estimate,
        "targets": BATCH * (SEQ - SEQ // 4),
        "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "trainable": sum(p.numel() for p in params), "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------------- parent
def run_child(name: str, args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--layers", str(args.layers), "--seq", str(args.seq), "--vocab", str(args.vocab)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(results: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for name, runs in results.items():
        times = [t for r in runs for t in r["times"]]
        step = statistics.median(times)
        rows.append({
            "name": name, "step": step, "cpu": statistics.median(c for r in runs for c in r["cpu"]),
            "tok_s": runs[0]["targets"] / step,
            "held": statistics.median(r["held"] for r in runs), "peak": statistics.median(r["peak"] for r in runs),
            "n": len(times), "trainable": runs[0]["trainable"], "estimate": runs[0].get("estimate"),
        })
    return rows


def print_table(rows: list[dict]) -> str:
    by = {r["name"]: r for r in rows}
    ref = by.get("peft-lora-d0.05")
    lines = [
        "| config | step s | CPU s | target tok/s | held MiB | estimate MiB | peak RSS MiB | step / PEFT LoRA d0.05 "
        "| held / PEFT LoRA d0.05 | held / PEFT LoRA ckpt | n steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ckpt = by.get("peft-lora-d0-ckpt")
    for r in rows:
        rs = f"{r['step'] / ref['step']:.2f}×" if ref else "–"
        rh = f"{r['held'] / ref['held']:.2f}×" if ref else "–"
        rc = f"{r['held'] / ckpt['held']:.2f}×" if ckpt else "–"
        est = f"{r['estimate'] / 2**20:,.0f} ({r['estimate'] / r['held']:.2f}×)" if r.get("estimate") else "–"
        lines.append(f"| {r['name']} | {r['step']:.2f} | {r['cpu']:.2f} | {r['tok_s']:.0f} | "
                     f"{r['held'] / 2**20:,.0f} | {est} | "
                     f"{r['peak'] / 2**20:,.0f} | {rs} | {rh} | {rc} | {r['n']} |")
    text = "\n".join(lines)
    print(text)
    checks = []
    if ref and ckpt and "lora-d0.05" in by:
        ours = by["lora-d0.05"]
        checks += [
            ("ours LoRA d0.05 held ≤ 0.35× PEFT LoRA d0.05", ours["held"] / ref["held"], 0.35),
            ("ours LoRA d0.05 held ≤ 0.6× PEFT LoRA d0 + ckpt", ours["held"] / ckpt["held"], 0.6),
            ("ours LoRA d0.05 step ≤ 1.0× PEFT LoRA d0.05", ours["step"] / ref["step"], 1.0),
        ]
    for dora, lora in (("dora-d0", "lora-d0"), ("dora-d0.05", "lora-d0.05")):
        if dora in by and lora in by:
            checks += [
                (f"ours {dora} step ≤ 1.10× ours {lora}", by[dora]["step"] / by[lora]["step"], 1.10),
                (f"ours {dora} held ≤ 1.25× ours {lora}", by[dora]["held"] / by[lora]["held"], 1.25),
            ]
    if "peft-dora-d0" in by and "peft-lora-d0" in by:
        p = by["peft-dora-d0"]["held"] / by["peft-lora-d0"]["held"]
        print(f"(PEFT: DoRA held / LoRA held = {p:.2f}×)")
    for what, value, target in checks:
        print(f"{'PASS' if value <= target else 'MISS'}  {what}: {value:.2f}×")
    return text


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in rows:
        color = "tab:red" if r["name"].startswith("peft") else "gray" if r["name"] == "floor" else "tab:blue"
        marker = "s" if "ckpt" in r["name"] else "o"
        ax.scatter(r["held"] / 2**20, r["step"], color=color, marker=marker)
        ax.annotate(r["name"], (r["held"] / 2**20, r["step"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("held for backward (MiB)")
    ax.set_ylabel("step time (s)")
    ax.set_title("Qwen2.5-0.5B dims, 4 layers, batch 2×512 (768 targets), r=16 all-linear, CPU fp32\n"
                 "red: HF+PEFT, blue: ours, gray: frozen floor; squares: gradient checkpointing", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    global SEQ
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="all", help="comma list of config names, or 'all' (see --list)")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per config, interleaved")
    p.add_argument("--steps", type=int, default=2, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=1,
                   help=f"untimed steps per process before the timed ones, on {WARMUP_TOKENS} tokens per row")
    p.add_argument("--plot", default=str(ROOT / "docs" / "llm_step.png"), help="'' = no plot")
    p.add_argument("--json", default="", help="write the per-process results here")
    p.add_argument("--list", action="store_true")
    p.add_argument("--from-json", default="", help="print the table and plot from a --json file of an earlier run")
    p.add_argument("--layers", type=int, default=MODEL["num_hidden_layers"], help="decoder layers (smoke tests)")
    p.add_argument("--seq", type=int, default=SEQ, help="tokens per row (smoke tests)")
    p.add_argument("--vocab", type=int, default=MODEL["vocab_size"], help="vocabulary (smoke tests)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    SEQ = args.seq
    MODEL.update(num_hidden_layers=args.layers, vocab_size=args.vocab)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.warmup)))
        return
    available = configs()
    if args.list:
        print("\n".join(f"{k}: {v}" for k, v in available.items()))
        return
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        print_table(summarise(results))
        if args.plot:
            plot(summarise(results), Path(args.plot))
        return
    names = list(available) if args.configs == "all" else args.configs.split(",")
    unknown = [n for n in names if n not in available]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; see --list")
    results: dict[str, list[dict]] = {n: [] for n in names}
    start = time.perf_counter()
    for k in range(args.rounds):
        for name in names if k % 2 == 0 else reversed(names):  # alternate the order between rounds
            res = run_child(name, args)
            results[name].append(res)
            print(f"[{time.perf_counter() - start:6.0f}s] round {k + 1} {name}: step "
                  f"{statistics.median(res['times']):.2f}s held {res['held'] / 2**20:.0f} MiB "
                  f"peak {res['peak'] / 2**20:.0f} MiB", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    rows = summarise(results)
    print(f"\ntorch threads {results[names[0]][0]['threads']}, {args.rounds} process(es) × {args.steps} timed "
          f"steps per config, after {args.warmup} warm-up step(s)")
    print_table(rows)
    if args.plot:
        plot(rows, Path(args.plot))


if __name__ == "__main__":
    main()
