"""QLoRA vs LoRA on the offline SFT task: exact match and time per step with the frozen base in NF4 or not.

    python benchmarks/qlora_sft.py                                   # 3 seeds × {none, nf4}
    python benchmarks/qlora_sft.py --seeds 0 --extra --trainer.max_steps=20

Each run is ``lora-lightning fit --config configs/sft_offline.yaml --config configs/compare_sft_offline.yaml``
(SmolLM2-135M-Instruct from benchmarks/prepare_smollm2.py, the number-words task; 10 steps of 8 examples,
exact match on a fixed 100-row validation subset) with ``--model.quantize none|nf4`` and
``--seed_everything S``, in a fresh process; configs are interleaved (none, nf4 for seed 0, then seed 1, ...).
Both compute in the config's dtype (float32): the only difference is W0's 4-bit rounding. Reported per run:
val_exact_match, val_loss, the median time of a training step (forward + backward + AdamW, the first excluded)
and the peak RSS; then the mean over seeds. ``--config`` replaces the two configs; ``--extra`` arguments go to
every run (e.g. ``--model.backbone=... --data.init_args.train_file=...`` when the model/data live elsewhere).
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
CONFIGS = ["configs/sft_offline.yaml", "configs/compare_sft_offline.yaml"]


def child(args: list[str]) -> dict:
    import torch
    from lightning.pytorch import Callback, LightningDataModule

    from lora_lightning.cli import LoRALightningCLI
    from lora_lightning.module import LoRAModule

    torch.set_num_threads(1)

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.times.append(time.perf_counter() - self.start)

    cli = LoRALightningCLI(LoRAModule, LightningDataModule, subclass_mode_data=True, run=False, args=args,
                           save_config_callback=None)
    timer = StepTimer()
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val_")}
    return {**metrics, "step_s": statistics.median(timer.times[1:]), "steps": len(timer.times),
            "peak_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--config", action="append", help="replaces the default configs (repeatable)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--extra"]
    configs = args.config or [str(ROOT / c) for c in CONFIGS]
    if args.child:
        print("RESULT " + json.dumps(child([a for c in configs for a in ("--config", c)] + extra)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    runs: dict[str, list[dict]] = {"none": [], "nf4": []}
    for seed in args.seeds.split(","):
        for quantize in runs:
            cmd = [sys.executable, __file__, "--child", *[a for c in configs for a in ("--config", c)],
                   f"--model.quantize={quantize}", f"--seed_everything={seed}", *extra]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            line = [s for s in out.stdout.splitlines() if s.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"run failed ({quantize}, seed {seed}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
            result = {"seed": int(seed), **json.loads(line[-1][len("RESULT "):])}
            runs[quantize].append(result)
            print(f"{quantize:5} seed {seed}: exact match {result.get('val_exact_match', float('nan')):.3f}, "
                  f"val_loss {result.get('val_loss', float('nan')):.4f}, step {result['step_s']:.2f} s, "
                  f"peak {result['peak_MiB']:.0f} MiB", flush=True)
    print(f"\n{'base':6} {'exact match':>12} {'per seed':>20} {'val_loss':>9} {'step s':>7} {'peak MiB':>9}")
    for quantize, rs in runs.items():
        em = [r.get("val_exact_match", float("nan")) for r in rs]
        print(f"{quantize:6} {statistics.mean(em):>12.3f} {' '.join(f'{e:.2f}' for e in em):>20} "
              f"{statistics.mean(r.get('val_loss', float('nan')) for r in rs):>9.4f} "
              f"{statistics.median(r['step_s'] for r in rs):>7.2f} {statistics.median(r['peak_MiB'] for r in rs):>9.0f}")


if __name__ == "__main__":
    main()
