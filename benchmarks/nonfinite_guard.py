"""Step time with NonFiniteGuard off / stop / skip (and the safety checks), in a real Lightning fit.

    python benchmarks/nonfinite_guard.py                        # CPU, MiniLM-sized BERT, 16 × 64 tokens
    python benchmarks/nonfinite_guard.py --device cuda --batch 64

Each configuration trains a randomly initialised BERT of all-MiniLM-L6-v2's shape (6 layers, 384 wide; no
download) with LoRA r=8 on every Linear, AdamW, in a fresh process; configurations are interleaved over
``--rounds`` rounds so machine noise hits all alike. Per run: the median wall time of a training batch
(``on_train_batch_start`` → ``on_train_batch_end``, CUDA-synchronised at both ends on GPU, after warm-up) and
the median time spent inside the guard's own hooks (``on_before_backward`` + ``on_before_optimizer_step``;
on GPU "stop" only enqueues kernels there, "skip" waits for the flag). The table gives the median over rounds.

    off     LoRAModule(nonfinite="ignore", checks=False): no guard, no checks
    ignore  the guard present in mode "ignore" (checks off)
    stop    the default guard (device-side flag, read every log_every_n_steps) (checks off)
    skip    the guard deciding before every step (one host read per step) (checks off)
    default LoRAModule's defaults: guard "stop" + GradientFlowCheck + SupervisionCheck
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = ("off", "ignore", "stop", "skip", "default")


def child(config: str, args: argparse.Namespace) -> dict:
    import torch
    from lightning.pytorch import Callback, Trainer
    from transformers import BertConfig, BertForSequenceClassification

    from lora_lightning import AdapterConfig, LoRAModule
    from lora_lightning.callbacks import NonFiniteGuard

    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(hidden_size=args.hidden, num_hidden_layers=args.layers,
                                                    num_attention_heads=args.hidden // 32,
                                                    intermediate_size=4 * args.hidden, num_labels=2))
    kw = {"off": dict(nonfinite="ignore", checks=False), "ignore": dict(nonfinite="ignore", checks=False),
          "stop": dict(nonfinite="stop", checks=False), "skip": dict(nonfinite="skip", checks=False),
          "default": {}}[config]
    module = LoRAModule(bert, num_classes=2, task="sequence_classification", adapter=AdapterConfig(r=8), lr=1e-4,
                        init_seed=0, **kw)
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1000, 30000, (args.seq,), generator=g),
             "attention_mask": torch.ones(args.seq, dtype=torch.long), "labels": torch.tensor(i % 2)}
            for i in range(args.batch * (args.warmup + args.steps))]
    loader = torch.utils.data.DataLoader(rows, batch_size=args.batch)

    class Timer(Callback):
        def __init__(self):
            self.steps, self.hooks, self._t = [], [], 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sync()
            self._t, self._hook = time.perf_counter(), 0.0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync()
            if batch_idx >= args.warmup:
                self.steps.append(time.perf_counter() - self._t)
                self.hooks.append(self._hook)

    timer = Timer()
    callbacks = [timer]
    if config == "ignore":
        callbacks.append(NonFiniteGuard("ignore"))
    trainer = Trainer(accelerator="gpu" if cuda else "cpu", devices=1, max_epochs=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, log_every_n_steps=50, callbacks=callbacks)

    def timed(fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timer._hook += time.perf_counter() - t
        return wrapper

    original_setup = module.configure_callbacks

    def configure_callbacks():
        cbs = original_setup()
        for cb in cbs + callbacks:
            if isinstance(cb, NonFiniteGuard):
                cb.on_before_backward = timed(cb.on_before_backward)
                cb.on_before_optimizer_step = timed(cb.on_before_optimizer_step)
        return cbs

    module.configure_callbacks = configure_callbacks
    trainer.fit(module, loader)
    return {"step_ms": statistics.median(timer.steps) * 1e3, "guard_ms": statistics.median(timer.hooks) * 1e3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)))
        return
    configs = args.configs.split(",")
    results: dict[str, list[dict]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for c in configs:  # interleaved, each in a fresh process
            cmd = [sys.executable, __file__, "--child", c] + [f"--{k}={v}" for k, v in vars(args).items()
                                                              if k not in ("child", "configs")]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{c} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
            results[c].append(json.loads(line[7:]))
            print(f"round {r + 1}/{args.rounds} {c}: {results[c][-1]}", file=sys.stderr)
    base = statistics.median(x["step_ms"] for x in results[configs[0]])
    print(f"\nNonFiniteGuard overhead — {args.device}, BERT {args.layers}×{args.hidden} + LoRA r=8 (all Linear), "
          f"batch {args.batch}×{args.seq}, "
          f"median of {args.steps} steps, median over {args.rounds} rounds")
    print(f"{'config':<9} {'step ms':>9} {'vs ' + configs[0]:>9} {'guard hooks ms':>15}")
    for c in configs:
        step = statistics.median(x["step_ms"] for x in results[c])
        hook = statistics.median(x["guard_ms"] for x in results[c])
        print(f"{c:<9} {step:9.2f} {100 * (step / base - 1):+8.1f}% {hook:15.3f}")


if __name__ == "__main__":
    main()
