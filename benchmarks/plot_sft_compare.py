"""Plot of the offline SFT comparison (docs/results.md §6): exact match and validation loss per method.

    python benchmarks/plot_sft_compare.py runs/compare_sft_offline --base-em 0.0 --base-loss 1.80 \\
        --out docs/sft_offline.png

Reads the per-run records ``<compare out>/runs/*.json`` written by ``lora-lightning compare`` and draws, per
method, the final ``val_exact_match`` and ``val_loss`` of every seed (dots) with their mean (bar), next to the
base model before fine-tuning (dashed line: ``lora-lightning validate`` on the same config, adapters at B = 0).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

ORDER = ["lora", "rslora", "lora_alpha", "dora", "sds", "allora"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("compare_out", type=Path)
    p.add_argument("--base-em", type=float, help="exact match of the base model (before fine-tuning)")
    p.add_argument("--base-loss", type=float, help="validation loss of the base model")
    p.add_argument("--out", type=Path, default=Path("docs/sft_offline.png"))
    args = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: dict[str, list[dict]] = {}
    for path in sorted((args.compare_out / "runs").glob("*.json")):
        if path.name.endswith(".spec.json"):
            continue
        record = json.loads(path.read_text())
        if record.get("status") == "ok":
            runs.setdefault(record["group"], []).append(record)
    groups = [g for g in ORDER if g in runs] + sorted(set(runs) - set(ORDER))
    if not groups:
        raise SystemExit(f"no finished runs under {args.compare_out / 'runs'}")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, base, label in ((axes[0], "val_exact_match", args.base_em, "exact match (validation)"),
                                    (axes[1], "val_loss", args.base_loss, "validation loss (answer tokens)")):
        for i, g in enumerate(groups):
            values = [r[f"final_{metric}"] for r in runs[g] if r.get(f"final_{metric}") is not None]
            if not values:
                continue
            ax.bar(i, statistics.fmean(values), color=f"C{i}", alpha=0.45)
            ax.scatter([i] * len(values), values, color=f"C{i}", s=18, zorder=3)
        if base is not None:
            ax.axhline(base, color="k", ls="--", lw=1, label=f"base model before fine-tuning ({base:g})")
            ax.legend(fontsize=8, loc="best")
        ax.set_xticks(range(len(groups)), groups)
        ax.set_title(label, fontsize=10)
    n = {len(runs[g]) for g in groups}
    fig.suptitle(f"SmolLM2-135M-Instruct, number-words task, 10 steps of 8 (bars: mean, dots: "
                 f"{'/'.join(map(str, sorted(n)))} seeds)", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
