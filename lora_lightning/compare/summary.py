"""The summary of ``lora-lightning compare``: one row per grid point (mean ± std over seeds) as CSV, JSON and a
markdown table."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any, Optional

from .grid import AXES

SUMMARY_FIELDS = ("steps_to_target", "wall_s", "step_ms", "peak_mem_mb")
SPECTRUM_FIELDS = ("stable_rank", "numerical_rank", "fro_norm", "nuclear_norm")


def _mean_std(xs: list[float]) -> tuple[Optional[float], Optional[float]]:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(records: list[dict], target) -> tuple[list[dict[str, Any]], dict[int, bool]]:
    """One row per group (grid point without the seed): mean and std over its ok runs; and, per seed, whether
    all ok runs of that seed saw the same first batches."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["group"], []).append(r)
    rows = []
    for group, runs in groups.items():
        ok = [r for r in runs if r.get("status") == "ok"]
        first = runs[0]
        row: dict[str, Any] = {"group": group, "label": first["label"], "method": first["method"],
                               **{a: first.get(a) for a in AXES}, "runs": len(runs), "ok": len(ok),
                               "failed": ", ".join(f"{r['run_id']}: {r.get('error', '?')}" for r in runs
                                                   if r.get("status") != "ok")}
        keys = dict.fromkeys(k for r in ok for k in r if k.startswith(("final_", "best_")))
        for k in [*keys, *SUMMARY_FIELDS]:
            row[f"{k}_mean"], row[f"{k}_std"] = _mean_std([r.get(k) for r in ok])
        if target is not None:
            row["target_reached"] = f"{sum(r.get('steps_to_target') is not None for r in ok)}/{len(ok)}"
        for k in SPECTRUM_FIELDS:  # per run: mean over layers; then mean/std over seeds
            per_run = [statistics.fmean(s[k] for s in r["spectra"].values()) for r in ok if r.get("spectra")]
            row[f"dW_{k}_mean"], row[f"dW_{k}_std"] = _mean_std(per_run)
        rows.append(row)
    by_seed: dict[int, set] = {}
    for r in records:
        if r.get("status") == "ok":
            by_seed.setdefault(r["seed"], set()).add(r.get("data_order"))
    return rows, {seed: len(orders) == 1 for seed, orders in by_seed.items()}


def _pm(row: dict, key: str, digits: int = 4) -> str:
    mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
    if mean is None:
        return "–"
    return f"{mean:.{digits}g} ± {std:.2g}" if row["ok"] > 1 else f"{mean:.{digits}g}"


def markdown_table(rows: list[dict], metric: Optional[str], target) -> str:
    head = ["run", "ok"]
    if metric:
        head += [f"final {metric}", f"best {metric}"]
    if target:
        head += [f"steps to {target[0]}{target[1]}{target[2]:g}"]
    head += ["wall s", "step ms", "peak MB", "ΔW stable rank", "‖ΔW‖_F"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["group"], f"{row['ok']}/{row['runs']}"]
        if metric:
            cells += [_pm(row, f"final_{metric}"), _pm(row, f"best_{metric}")]
        if target:
            cells += [f"{_pm(row, 'steps_to_target')} ({row['target_reached']})"]
        cells += [_pm(row, "wall_s", 3), _pm(row, "step_ms", 3), _pm(row, "peak_mem_mb", 4),
                  _pm(row, "dW_stable_rank", 3), _pm(row, "dW_fro_norm", 3)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(out: Path, rows: list[dict], same_order: dict, records: list[dict], metric, target) -> str:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    runs = [{k: r.get(k) for k in ("run_id", "group", "seed", "status", "error", "data_order", "global_step",
                                    "steps_to_target", "wall_s", "peak_mem_mb", "lr_used", "scale")}
            | {k: v for k, v in r.items() if k.startswith(("final_", "best_"))} for r in records]
    summary = {"metric": metric, "target": list(target) if target else None, "groups": rows, "runs": runs,
               "same_data_order_per_seed": {str(k): v for k, v in same_order.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    table = markdown_table(rows, metric, target)
    (out / "summary.md").write_text(table + "\n")
    return table

