"""``lora-lightning compare``'s argument parser and ``main``: build the grid, run what is not done yet, summarise,
plot (see the package docstring)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

from .grid import build_runs
from .plots import plot
from .runner import _run_spec_main, run_in_process, run_in_subprocess
from .summary import summarize, write_summary

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lora-lightning compare",
        description="Run adapter methods side by side on one fit config (same data, budget and seeds).",
        epilog="Arguments after the known options (or after --) are passed to every run, e.g. --trainer.max_steps=50.",
    )
    p.add_argument("--config", action="append", required=True, help="the fit YAML (repeat to stack fragments)")
    p.add_argument("--methods", help="comma-separated methods, e.g. lora,rslora,lora_alpha,dora,sds,allora")
    p.add_argument("--variant", action="append", metavar="LABEL=ARGS",
                   help="an extra run family: LABEL='--model.adapter.method=allora --config fragment.yaml'")
    p.add_argument("--r", help="ranks to sweep, e.g. 4,16")
    p.add_argument("--alpha", help="α values to sweep (methods with the lora/rslora scaling rule)")
    p.add_argument("--C", help="LoRA-α's C values to sweep (method lora_alpha)")
    p.add_argument("--lr", help="learning rates to sweep")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    p.add_argument("--target", help="steps-to-target, e.g. val_acc=0.9 or val_loss<=0.3")
    p.add_argument("--metric", help="metric of the table and plot (default: the target's, else val_acc/val_mse/val_loss)")
    p.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    p.add_argument("--in-process", action="store_true", help="run everything in this process (fast for tiny runs)")
    p.add_argument("--run-timeout", type=float, help="seconds per run (child processes only)")
    p.add_argument("--no-plots", action="store_true")
    return p


def _default_metric(records: list[dict], target) -> Optional[str]:
    if target:
        return target[0]
    keys = {k for r in records for v in r.get("val", []) for k in v}
    return next((m for m in ("val_acc", "val_mse", "val_loss") if m in keys), None)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--run-spec"] and len(argv) == 2:  # a child process started by run_in_subprocess
        return _run_spec_main(argv[1])
    if os.getcwd() not in sys.path:  # class paths may name modules of the working directory, as with python -m
        sys.path.insert(0, os.getcwd())
    ns, passthrough = parser().parse_known_args(argv)
    passthrough = [a for a in passthrough if a != "--"]
    out = Path(ns.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs = build_runs(ns, passthrough, out)

    from tqdm.auto import tqdm

    records, counts = [], {"ok": 0, "error": 0, "skipped": 0}
    bar = tqdm(runs, desc="compare", unit="run", file=sys.stderr)
    for spec in bar:
        bar.set_postfix_str(spec.run_id)
        path = Path(spec.record_path)
        if path.is_file():
            previous = json.loads(path.read_text())
            if previous.get("status") == "ok" and previous.get("config_hash") == spec.config_hash:
                records.append(previous)
                counts["skipped"] += 1
                continue
        if ns.in_process:
            record = run_in_process(spec)
        else:
            record = run_in_subprocess(spec, ns.run_timeout)
        counts[record["status"]] += 1
        records.append(record)
        if record["status"] != "ok":
            tqdm.write(f"compare: run {spec.run_id} failed: {record.get('error')} (log: {path.with_suffix('.log')})",
                       file=sys.stderr)
    bar.close()

    target = runs[0].target
    metric = ns.metric or _default_metric(records, target)
    rows, same_order = summarize(records, target)
    table = write_summary(out, rows, same_order, records, metric, target)
    if not ns.no_plots:
        plot(out, records, metric)
    print(table)
    mismatch = [s for s, same in same_order.items() if not same]
    if mismatch:
        print(f"note: runs with seed(s) {mismatch} saw different first batches (data_order differs)")
    print(f"{counts['ok']} run(s) done, {counts['skipped']} skipped (already done), {counts['error']} failed; "
          f"results in {out}/summary.csv, summary.json and PNGs")
    return 1 if counts["error"] else 0

