"""LoRA-α (arXiv 2606.12883): the best α grows like √r (α = C·√r, C large), and at equal budget raising α beats
raising the learning rate (α raises the first-order "signal" of a step without raising its second-order
"drift" ratio; the LR raises both).

    python benchmarks/alpha_sweep.py          # prints the tables, writes docs/alpha_sweep.png

Task (``lora_lightning.data.synthetic``): frozen 128×128 W0, ΔW* of rank 8 with σ = 1 … 0.1 (geometric),
n = 512 training inputs, 512 held out. LoRA (s = α/r, B = 0, A kaiming-uniform) at r ∈ {4, 16, 64}, Adam
(constant LR, no decay), full batch, a fixed budget of 200 steps. Grid: α ∈ 10^{0, 0.25, …, 4.5} (19 values),
LR ∈ 10^{-5, -4.5, …, -1} (9 values), 1 seed (``--grid-seeds``; A's init). Score: held-out MSE after 200 steps
relative to its value at step 0 (= the fraction of ‖ΔW*‖² not yet learned; lower is better), mean over seeds.

Reported: (1) per r, the best α at each LR and overall, and the slope of log α_best against log r (√r ⇒ 0.5);
C = α_best/√r. (2) from the baseline α0 = 10, LR0 = 1e-4, the score of α-scaling (α = c·α0 at LR0) against
LR-scaling (LR = c·LR0 at α0) for c = 1 … 10^{2.5}, and the mean signal ‖s·(δB·A + B·δA)‖_F and drift ratio
‖s·δB·δA‖/‖s·(δB·A + B·δA)‖ of their steps (``lora_lightning.spectra.signal_drift``, measured every 10 steps); 2 seeds (``--seeds``).
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from synth_utils import DOCS, adapted_layer, mse

from lora_lightning.data.synthetic import make_teacher
from lora_lightning.spectra import signal_drift

RANKS = (4, 16, 64)
ALPHAS = [10 ** (k / 4) for k in range(19)]
LRS = [10 ** (-5 + k / 2) for k in range(9)]
ALPHA0, LR0 = 10.0, 1e-4
SATURATED = 1e-3
SCALES = [10 ** (j / 2) for j in range(6)]


def run(teacher, r: int, alpha: float, lr: float, seed: int, steps: int, drift: bool = False) -> dict:
    layer = adapted_layer(teacher, seed, method="lora", r=r, alpha=alpha)
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=lr)
    x, y = teacher.x_train, teacher.y_train
    ratios, signals = [], []
    with torch.no_grad():
        start = float(mse(layer, teacher.x_val, teacher.y_val))
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        mse(layer, x, y).backward()
        before = (layer.lora_A.detach().clone(), layer.lora_B.detach().clone()) if drift and step % 10 == 0 else None
        opt.step()
        if before is not None:
            sd = signal_drift(*before, layer.lora_A, layer.lora_B, layer.scaling)
            if math.isfinite(sd["drift_ratio"]):
                ratios.append(sd["drift_ratio"])
                signals.append(sd["signal"])
    with torch.no_grad():
        final = float(mse(layer, teacher.x_val, teacher.y_val))
    score = final / start if math.isfinite(final) else float("inf")
    return {"score": score, "drift_ratio": statistics.fmean(ratios) if ratios else None,
            "signal": statistics.fmean(signals) if signals else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", default="0,1", help="seeds of part (2)")
    p.add_argument("--grid-seeds", default="0", help="seeds of the α × LR grid, part (1)")
    p.add_argument("--plot", default=str(DOCS / "alpha_sweep.png"))
    args = p.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    grid_seeds = [int(s) for s in args.grid_seeds.split(",")]
    teacher = make_teacher(d_in=128, d_out=128, rank=8, condition_number=10.0, n_train=512, n_val=512, seed=0)

    grid: dict[tuple[int, float, float], float] = {}
    for r in RANKS:
        for lr in LRS:
            for alpha in ALPHAS:
                scores = [run(teacher, r, alpha, lr, s, args.steps)["score"] for s in grid_seeds]
                grid[(r, lr, alpha)] = statistics.fmean(scores) if all(map(math.isfinite, scores)) else float("inf")
        print(f"r={r}: grid done", flush=True)

    floor = {r: min(v for (r2, _, _), v in grid.items() if r2 == r) for r in RANKS}
    print("\n(1) best α per LR (score = held-out MSE after the budget / at start; mean of "
          f"{len(grid_seeds)} seed(s)); '*' = at the edge of the α grid, '~' = saturated (score < {SATURATED:g} or "
          "within 10 % of that r's best score anywhere: many α solve it, the argmin is noise)")
    print("| LR | " + " | ".join(f"r={r}: best α (score)" for r in RANKS) + " | slope of log α_best vs log r |")
    print("|---|" + "---|" * len(RANKS) + "---|")
    slopes = []
    for lr in LRS:
        cells, best_alphas, interior = [], [], True
        for r in RANKS:
            alpha = min(ALPHAS, key=lambda a: grid[(r, lr, a)])
            edge = alpha in (ALPHAS[0], ALPHAS[-1])
            score = grid[(r, lr, alpha)]
            flat = score < SATURATED or score <= 1.1 * floor[r]
            interior &= not (edge or flat)
            best_alphas.append(alpha)
            cells.append(f"{alpha:.3g}{'*' if edge else ''}{'~' if flat else ''} ({score:.3g})")
        slope = (math.log(best_alphas[-1]) - math.log(best_alphas[0])) / (math.log(RANKS[-1]) - math.log(RANKS[0]))
        if interior:
            slopes.append(slope)
        print(f"| {lr:.3g} | " + " | ".join(cells) + f" | {slope:.2f}{'' if interior else ' (not used)'} |")
    print("\noverall best (α, LR) per r, and C = α/√r")
    print("| r | best α | best LR | score | C = α/√r | best score at LR ≤ 1e-4 (α, C) |\n|---|---|---|---|---|---|")
    for r in RANKS:
        (lr, alpha) = min(((lr, a) for lr in LRS for a in ALPHAS), key=lambda k: grid[(r, *k)])
        small = min(((lr2, a) for lr2 in LRS if lr2 <= 1.01e-4 for a in ALPHAS), key=lambda k: grid[(r, *k)])
        print(f"| {r} | {alpha:.3g} | {lr:.3g} | {grid[(r, lr, alpha)]:.3g} | {alpha / math.sqrt(r):.3g} | "
              f"{grid[(r, *small)]:.3g} (α {small[1]:.3g} at LR {small[0]:.3g}, C {small[1] / math.sqrt(r):.3g}) |")
    if slopes:
        print("\nslope of log α_best vs log r over the LRs with interior, unsaturated optima: "
              f"mean {statistics.fmean(slopes):.2f} "
              f"(min {min(slopes):.2f}, max {max(slopes):.2f}; √r would be 0.50, α ∝ r 1.00)")

    print("\nthe [reading] default C = 256 (α = 256·√r, nearest grid α) against the best α, at the small LRs")
    print("| LR | " + " | ".join(f"r={r}: C=256 score / best score" for r in RANKS) + " |\n|---|" + "---|" * len(RANKS))
    for lr in LRS[:5]:
        cells = []
        for r in RANKS:
            alpha = min(ALPHAS, key=lambda a: abs(math.log(a / (256 * math.sqrt(r)))))
            cells.append(f"{grid[(r, lr, alpha)]:.3g} / {min(grid[(r, lr, a)] for a in ALPHAS):.3g}")
        print(f"| {lr:.3g} | " + " | ".join(cells) + " |")

    print(f"\n(2) α-scaling vs LR-scaling from α0 = {ALPHA0:g}, LR0 = {LR0:g}, budget {args.steps} steps")
    print("| r | c | α-scaling: score (signal, drift ratio) | LR-scaling: score (signal, drift ratio) |")
    print("|---|---|---|---|")
    curves = {}
    for r in RANKS:
        for c in SCALES:
            a = [run(teacher, r, ALPHA0 * c, LR0, s, args.steps, drift=True) for s in seeds]
            b = [run(teacher, r, ALPHA0, LR0 * c, s, args.steps, drift=True) for s in seeds]

            def agg(runs):
                score = statistics.fmean(x["score"] for x in runs)
                ratios = [x["drift_ratio"] for x in runs if x["drift_ratio"] is not None]
                signals = [x["signal"] for x in runs if x["signal"] is not None]
                nan = float("nan")
                ratio = statistics.fmean(ratios) if ratios else nan
                return score, ratio, (statistics.fmean(signals) if signals else nan)

            curves[(r, c)] = (agg(a), agg(b))
            (sa, da, ga), (sb, db, gb) = curves[(r, c)]
            print(f"| {r} | {c:.3g} | {sa:.3g} ({ga:.2g}, {da:.2g}) | {sb:.3g} ({gb:.2g}, {db:.2g}) |", flush=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in RANKS:
        best = [min(ALPHAS, key=lambda a: grid[(r, lr, a)]) for lr in LRS]
        axes[0].plot(LRS, best, "o-", label=f"r={r}")
        lr_best = min(LRS, key=lambda lr: min(grid[(r, lr, a)] for a in ALPHAS))
        axes[1].plot(ALPHAS, [min(grid[(r, lr_best, a)], 10) for a in ALPHAS], "o-", ms=3,
                     label=f"r={r} (LR {lr_best:.2g})")
        axes[2].plot(SCALES, [curves[(r, c)][0][0] for c in SCALES], "o-", label=f"α-scaling, r={r}")
        axes[2].plot(SCALES, [curves[(r, c)][1][0] for c in SCALES], "s--", label=f"LR-scaling, r={r}")
    axes[0].set(xscale="log", yscale="log", xlabel="LR", ylabel="best α", title="best α per LR")
    axes[1].set(xscale="log", yscale="log", xlabel="α", ylabel="score (held-out MSE ratio)",
                title="score vs α at the best LR")
    axes[2].set(xscale="log", yscale="log", xlabel=f"c (α = c·{ALPHA0:g} or LR = c·{LR0:g})", ylabel="score",
                title="α-scaling vs LR-scaling, equal budget")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
