"""The plots of ``lora-lightning compare``: train loss, the validation metric (mean ± std over seeds) and ΔW
spectra, as PNGs (matplotlib, Agg backend, imported only when plotting)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Optional

from .grid import MIN_METRICS

def _smooth(ys: list[float], window: int) -> list[float]:
    if window <= 1:
        return ys
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(out: Path, records: list[dict], metric: Optional[str]) -> list[Path]:
    """loss.png, <metric>.png and spectra.png (package docstring); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("status") == "ok"]
    groups: dict[str, list[dict]] = {}
    for r in ok:
        groups.setdefault(r["group"], []).append(r)
    written = []
    if not groups:
        return written

    def mean_curve(series: list[list[tuple[float, float]]]):
        steps = sorted(set.intersection(*[{s for s, _ in xs} for xs in series]))
        per = [dict(xs) for xs in series]
        ys = [[p[s] for p in per] for s in steps]
        return steps, [statistics.fmean(y) for y in ys], [statistics.pstdev(y) for y in ys]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for group, runs in groups.items():
        series = []
        for r in runs:
            by_step: dict[int, float] = {}
            for step, loss, _ in r["train"]:
                by_step[step] = loss  # the last micro-batch of each optimiser step
            steps = sorted(by_step)
            series.append(list(zip(steps, _smooth([by_step[s] for s in steps], max(1, len(steps) // 50)))))
        if all(series):
            steps, mean, _ = mean_curve(series)
            ax.plot(steps, mean, label=f"{group} (n={len(runs)})")
    ax.set(xlabel="optimiser step", ylabel="train loss (moving average)", yscale="log", title="training loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=110)
    plt.close(fig)
    written.append(out / "loss.png")

    if metric:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for group, runs in groups.items():
            series = [[(v["step"], v[metric]) for v in r["val"] if metric in v] for r in runs]
            if all(series):
                steps, mean, std = mean_curve(series)
                ax.plot(steps, mean, marker="o", ms=3, label=f"{group} (n={len(runs)})")
                ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                alpha=0.15)
        ax.set(xlabel="optimiser step", ylabel=metric, title=f"{metric} (mean ± std over seeds)")
        if MIN_METRICS.match(metric):
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{metric.replace('/', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    shown = list(groups.items())[:12]
    cols = min(4, len(shown))
    rows_n = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.6 * rows_n), squeeze=False, sharey=True)
    for ax, (group, runs) in zip(axes.flat, shown):
        for name, s in runs[0].get("spectra", {}).items():
            sigma = [x for x in s["sigma"] if x > 0]
            if sigma:
                ax.plot(range(1, len(sigma) + 1), sigma, lw=0.8, alpha=0.6)
        ax.set(title=group, yscale="log", xlabel="i")
        ax.title.set_fontsize(8)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    axes[0][0].set_ylabel("σ_i(ΔW), one line per layer")
    fig.tight_layout()
    fig.savefig(out / "spectra.png", dpi=110)
    plt.close(fig)
    written.append(out / "spectra.png")
    return written

