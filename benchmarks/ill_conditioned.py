"""SDS-LoRA (arXiv 2606.16454): LoRA's steps-to-target grow with the condition number of the factors; SDS-LoRA's
must not. Also chooses SDS-LoRA's defaults: its refresh/schedule/moment/scale options side by side.

    python benchmarks/ill_conditioned.py --part variants   # the SDS options table, writes docs/sds_variants.png
    python benchmarks/ill_conditioned.py --part main       # LoRA vs SDS-LoRA vs full ΔW, docs/ill_conditioned.png

Task (``lora_lightning.data.synthetic``): frozen 32×32 W0, ΔW* of rank 4 with singular values 1 … 1/κ
(geometric), whitened inputs (X·Xᵀ/n = I, n = 32), so the loss is ‖ΔW − ΔW*‖_F²/32 and only ΔW's conditioning
matters. A rank-4 adapter (r = k, s = α/r = 1) learns ΔW* from B = 0; its factors must become as ill-conditioned
as ΔW* itself (balanced: κ(A) = κ(B) = √κ). Target: ‖ΔW − ΔW*‖_F ≤ 0.1·σ_min(ΔW*), i.e. every direction of ΔW*
recovered to 10 % of the weakest (checked every 5 steps). Full-batch GD (plain SGD) and Adam, each method at its
best learning rate from a small grid (the LR with the fewest mean steps; not reached = the cap), mean ± std over
3 seeds (A's init). Reference: full fine-tuning of ΔW (a dense out×in parameter) with the same optimiser.

SDS-LoRA uses lora_lightning's SDSLayer on ``SDSReorthonormalization``'s ``RefreshSchedule`` (plain-LoRA
warm-up of 10 steps, then rebalance with the moments cleared). The options table (``VARIANTS``) crosses the
[ours] truncating refresh with the [reading] re-orthonormalise-only refresh, a fixed interval with the phased
schedule (5 phases of ``PHASE_STEPS`` = 100 steps: every step, every 2nd, ... then every 5th), Adam's moments
kept or cleared at every refresh, and s = α/r with s = α/√r (r = 4: s = 1 vs 2), at κ = 1 and 100 with
Adam (``--optimisers``, ``--variant-kappas``); plain GD has no moments and its steps barely depend on the schedule.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from typing import Any, Optional

import torch
from synth_utils import DOCS, adapted_layer, delta, mse, sds_schedule, train
from torch import Tensor, nn

from lora_lightning.callbacks.sds import RefreshSchedule
from lora_lightning.data.synthetic import make_teacher

KAPPAS = (1, 10, 100, 1000)
LRS = {"GD": (3.0, 10.0, 20.0), "Adam": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)}


class FullDelta(nn.Module):
    """Full fine-tuning reference: y = (W0 + D)·x with a dense trainable D (zero init)."""

    def __init__(self, W0: Tensor) -> None:
        super().__init__()
        self.register_buffer("W0", W0.clone())
        self.D = nn.Parameter(torch.zeros_like(W0))

    def forward(self, x: Tensor) -> Tensor:
        return x @ (self.W0 + self.D).T

    def delta_matrix(self) -> Tensor:
        return self.D


@dataclass(frozen=True)
class SDSVariant:
    """One SDS-LoRA option set (``SDSReorthonormalization``'s arguments; ``scaling`` = the adapter's rule)."""

    label: str
    refresh: str = "truncate"
    every: int = 100  # schedule "every": the interval (0 = never); ignored when phased
    phased: bool = False
    reset: bool = False
    warmup: int = 10
    scaling: str = "lora"

    def schedule(self) -> RefreshSchedule:
        if self.phased:
            return RefreshSchedule(self.warmup, phases=PHASES, phase_steps=PHASE_STEPS)
        return RefreshSchedule(self.warmup, refresh_every=self.every)


DEFAULT = SDSVariant("default", every=10)  # what SDSReorthonormalization() does
PHASES, PHASE_STEPS = 5, 100  # the phased schedule: 5 phases of 100 steps after warm-up (then every 5 steps)
VARIANTS = [  # SDS options compared: [ours] truncating refresh vs the [reading] re-orthonormalisation
    SDSVariant("truncate, every 100, moments reset (old default)", reset=True),
    SDSVariant("truncate, every 100, moments kept"),
    SDSVariant("truncate, every 10, moments kept", every=10),
    SDSVariant("truncate, phased, moments kept", phased=True),
    SDSVariant("reorthonormalize, every 100, moments kept", refresh="reorthonormalize"),
    SDSVariant("reorthonormalize, phased, moments kept", refresh="reorthonormalize", phased=True),
    SDSVariant("reorthonormalize, phased, moments reset", refresh="reorthonormalize", phased=True, reset=True),
    SDSVariant("truncate, every 10, moments kept, s = α/√r", every=10, scaling="rslora"),
]


def one_run(method: str, kappa: float, opt_name: str, lr: float, seed: int, cap: int,
            variant: SDSVariant = DEFAULT) -> dict:
    t = make_teacher(d_in=32, d_out=32, rank=4, condition_number=kappa, n_train=32, n_val=32, whiten=True, seed=0)
    star, tol = t.delta.double(), 0.1 * float(t.sigma[-1])
    if method == "full":
        layer = FullDelta(t.W0)
    else:
        scaling = variant.scaling if method == "sds" else "lora"
        layer = adapted_layer(t, seed, method=method, r=4, alpha=4, scaling=scaling)
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr) if opt_name == "GD" else torch.optim.Adam(params, lr=lr)
    hook = None
    if method == "sds":
        hook = sds_schedule(layer, opt, variant.schedule(), variant.reset, variant.refresh)
    trace = train(layer, t.x_train, t.y_train, cap, opt, after_step=hook, check_every=5,
                  done=lambda m: float((delta(m) - star).norm()) <= tol)
    cond_b = None
    if hasattr(layer, "lora_B") and torch.isfinite(layer.lora_B).all():
        s = torch.linalg.svdvals(layer.lora_B.detach().double())
        cond_b = float(s[0] / s[-1]) if s[-1] > 0 else float("inf")
    return {"steps": trace.reached, "cond_B": cond_b, "final_error": float((delta(layer) - star).norm()) / tol,
            "diverged": not torch.isfinite(mse(layer, t.x_train, t.y_train)).item()}


def best_lr(method: str, kappa: float, opt_name: str, seeds: list[int], cap: int, quick: bool = False,
            **options: Any) -> dict:
    """Every LR of the grid; the LR with the fewest mean steps (unreached = cap) wins. ``quick`` (the options
    table): an LR whose first seed misses the cap is not run on the other seeds."""
    best = None
    for lr in LRS[opt_name]:
        runs = [one_run(method, kappa, opt_name, lr, seeds[0], cap, **options)]
        if runs[0]["steps"] is not None or not quick:
            runs += [one_run(method, kappa, opt_name, lr, s, cap, **options) for s in seeds[1:]]
        score = statistics.fmean(r["steps"] if r["steps"] is not None else cap for r in runs)
        if best is None or score < best["score"]:
            best = {"score": score, "lr": lr, "runs": runs}
    return best


def fmt(entry: dict, cap: int) -> str:
    steps = [r["steps"] for r in entry["runs"]]
    reached = [s for s in steps if s is not None]
    if not reached:
        return f"> {cap}"
    mean = statistics.fmean(reached)
    std = statistics.stdev(reached) if len(reached) > 1 else 0.0
    miss = f", {len(steps) - len(reached)}/{len(steps)} > {cap}" if len(reached) < len(steps) else ""
    return f"{mean:.0f} ± {std:.0f}{miss} (lr {entry['lr']:g})"


def variants_table(opt_name: str, kappas: tuple[int, ...], seeds: list[int], cap: int,
                   only: Optional[list[int]] = None) -> dict:
    """The SDS options (``VARIANTS``, or those numbered in ``only``) at each κ, best LR each; plain GD skips the
    moment options (no moments)."""
    chosen = [v for i, v in enumerate(VARIANTS) if (opt_name == "Adam" or not v.reset) and (not only or i in only)]
    print(f"\nSDS-LoRA options, {opt_name}: steps to ‖ΔW−ΔW*‖_F ≤ 0.1·σ_min (best LR of {LRS[opt_name]}; "
          f"cap {cap}; mean ± std over {len(seeds)} seeds)")
    print("| refresh, schedule, moments, scale | " + " | ".join(f"κ = {k}" for k in kappas) + " |")
    print("|---|" + "---|" * len(kappas))
    out = {}
    for v in chosen:
        cells = []
        for kappa in kappas:
            out[(v.label, kappa)] = entry = best_lr("sds", kappa, opt_name, seeds, cap, quick=True, variant=v)
            cells.append(fmt(entry, cap))
        print(f"| {v.label} | " + " | ".join(cells) + " |", flush=True)
    return out


def plot_variants(results: dict, kappas: tuple[int, ...], cap: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optimisers = list(dict.fromkeys(o for (o, _, _) in results))
    fig, axes = plt.subplots(1, len(optimisers), figsize=(6 * len(optimisers), 4.5), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, opt_name in zip(axes, optimisers):
        labels = dict.fromkeys(label for (o, label, _) in results if o == opt_name)
        for label in labels:
            ys = [results[(opt_name, label, k)]["score"] for k in kappas]
            ax.plot(kappas, ys, "o-" if "truncate" in label else "s--", label=label, ms=4)
        ax.axhline(cap, color="grey", lw=0.8, ls="--")
        ax.set(xscale="log", yscale="log", xlabel="κ = σ_max/σ_min of ΔW*", title=f"SDS-LoRA options, {opt_name}")
    axes[0].set_ylabel(f"mean steps to target (unreached = cap {cap})")
    axes[-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("all", "main", "variants"), default="all",
                   help="main: LoRA vs SDS-LoRA (defaults) vs full over κ; variants: the SDS options")
    p.add_argument("--cap", type=int, default=10000, help="step budget per run (main table)")
    p.add_argument("--variant-cap", type=int, default=1500, help="step budget per run (SDS options table)")
    p.add_argument("--variant-kappas", default="1,100", help="κ of the SDS options table")
    p.add_argument("--optimisers", default="Adam", help="optimisers of the SDS options table (GD,Adam)")
    p.add_argument("--variants", help="indices into VARIANTS to run (default: all), e.g. 0,2")
    p.add_argument("--methods", default="full,lora,sds", help="columns of the main table")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--plot", default=str(DOCS / "ill_conditioned.png"))
    p.add_argument("--variants-plot", default=str(DOCS / "sds_variants.png"))
    args = p.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]

    if args.part in ("all", "variants"):
        kappas = tuple(int(k) for k in args.variant_kappas.split(","))
        found = {}
        for opt_name in args.optimisers.split(","):
            only = [int(i) for i in args.variants.split(",")] if args.variants else None
            for (label, kappa), entry in variants_table(opt_name, kappas, seeds, args.variant_cap, only).items():
                found[(opt_name, label, kappa)] = entry
        if not args.variants:
            plot_variants(found, kappas, args.variant_cap, args.variants_plot)
    if args.part == "variants":
        return

    results: dict = {}
    for opt_name in ("GD", "Adam"):
        print(f"\nsteps to ‖ΔW−ΔW*‖_F ≤ 0.1·σ_min, {opt_name} (best LR of {LRS[opt_name]}), "
              f"mean ± std over {len(seeds)} seeds; SDS-LoRA with SDSReorthonormalization's defaults")
        methods = args.methods.split(",")
        heads = {"full": "full ΔW (reference)", "lora": "LoRA", "sds": "SDS-LoRA"}
        print("| κ | " + " | ".join(heads[m] for m in methods) + (" | κ(B) at the end, LoRA |" if "lora" in methods
              else " |"))
        print("|---|" + "---|" * (len(methods) + ("lora" in methods)))
        for kappa in KAPPAS:
            row = {m: best_lr(m, kappa, opt_name, seeds, args.cap) for m in methods}
            results[(opt_name, kappa)] = row
            cells = [fmt(row[m], args.cap) for m in methods]
            if "lora" in methods:
                cells.append(f"{statistics.fmean(r['cond_B'] for r in row['lora']['runs'] if r['cond_B']):.3g}")
            print(f"| {kappa} | " + " | ".join(cells) + " |", flush=True)
    if methods != ["full", "lora", "sds"]:
        return  # the plot needs every column

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, opt_name in zip(axes, ("GD", "Adam")):
        for method, label, style in (("full", "full ΔW (reference)", "k:"), ("lora", "LoRA", "o-"),
                                     ("sds", "SDS-LoRA", "s-")):
            ys = [results[(opt_name, kappa)][method]["score"] for kappa in KAPPAS]
            ax.plot(KAPPAS, ys, style, label=label)
        ax.axhline(args.cap, color="grey", lw=0.8, ls="--")
        ax.set(xscale="log", yscale="log", xlabel="κ = σ_max/σ_min of ΔW*", title=f"{opt_name}, best LR per point")
    axes[0].set_ylabel("steps to ‖ΔW−ΔW*‖ ≤ 0.1·σ_min (cap dashed)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
