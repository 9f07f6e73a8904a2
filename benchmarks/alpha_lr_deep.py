"""LoRA-α (arXiv 2606.12883) on a deep non-linear network: raising α vs raising the learning rate at equal budget.

    python benchmarks/alpha_lr_deep.py          # prints the table, writes docs/alpha_lr_deep.png

The paper's argument is about depth: a large LR moves every factor of every layer a lot at once, and in a deep
network these moves compound (the loss jumps or diverges), while a large α enlarges the update of ΔW = s·B·A
without enlarging the steps of A and B. A single linear layer (benchmarks/alpha_sweep.py) cannot show that, so
this task is deep and non-linear [ours]:

Task: a frozen 8-layer tanh MLP (32 → 64 × 7 → 8, orthogonal init; the "pretrained" base, seed 0) and a teacher
that is the same network with a rank-4 change ΔW*_l on every layer (σ = 0.5 each, the base layers' σ = 1);
x ~ N(0, I), 4,096 training and 1,024 held-out inputs. The student is the base with LoRA (r = 8, B = 0,
A kaiming-uniform; ``inject_adapters`` on all 8 Linear layers), trained by Adam (constant LR, no decay) on
mini-batches of 128 for a fixed budget of 300 steps. Score: held-out MSE after the budget / at step 0 (lower is
better; 1 = nothing learned). "unstable": a run whose training loss ever exceeds 3× its initial value, or is not
finite. From the baseline α0 = 8 (s = 1), LR0 = 1e-4: α-scaling (α = c·α0 at LR0) against LR-scaling
(LR = c·LR0 at α0), c ∈ {1, 10, 100, 316, 1000}; 5 seeds (A's init and the batch order); mean ± std.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from synth_utils import DOCS
from torch import nn

from lora_lightning import AdapterConfig, inject_adapters

D_IN, WIDTH, DEPTH, D_OUT, RANK_STAR, SIGMA_STAR = 32, 64, 8, 8, 4, 0.5
R, ALPHA0, LR0, STEPS, BATCH = 8, 8.0, 1e-4, 300, 128
SCALES = [1.0, 10.0, 100.0, 10**2.5, 1000.0]
UNSTABLE = 3.0


def base_net() -> nn.Sequential:
    g = torch.Generator().manual_seed(0)
    dims = [D_IN] + [WIDTH] * (DEPTH - 1) + [D_OUT]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(max(a, b), min(a, b), generator=g))
            lin.weight.copy_(q if b > a else q.T)
            lin.bias.zero_()
        layers += [lin] + ([nn.Tanh()] if i < DEPTH - 1 else [])
    return nn.Sequential(*layers)


def teacher_data(n_train: int = 4096, n_val: int = 1024) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    teacher = base_net()
    with torch.no_grad():
        for lin in (m for m in teacher if isinstance(m, nn.Linear)):
            out, inp = lin.weight.shape
            u, _ = torch.linalg.qr(torch.randn(out, RANK_STAR, generator=g))
            v, _ = torch.linalg.qr(torch.randn(inp, RANK_STAR, generator=g))
            lin.weight.add_(SIGMA_STAR * u @ v.T)
        x = torch.randn(n_train + n_val, D_IN, generator=g)
        y = teacher(x)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def run(data: tuple[torch.Tensor, ...], alpha: float, lr: float, seed: int) -> dict:
    x, y, xv, yv = data
    model = base_net()
    names = [str(i) for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    torch.manual_seed(seed)
    inject_adapters(model, AdapterConfig(r=R, alpha=alpha, target_modules=names, modules_to_save=[]), verbose=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    order = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        start_val = float(nn.functional.mse_loss(model(xv), yv))
    first, worst, finite = None, 0.0, True
    for step in range(STEPS):
        if step % (len(x) // BATCH) == 0:
            perm = torch.randperm(len(x), generator=order)
        idx = perm[(step % (len(x) // BATCH)) * BATCH:][:BATCH]
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        value = float(loss.detach())
        if not math.isfinite(value):
            finite = False
            break
        first = value if first is None else first
        worst = max(worst, value)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = float(nn.functional.mse_loss(model(xv), yv)) if finite else math.inf
    score = final / start_val if math.isfinite(final) else math.inf
    return {"score": score, "unstable": not finite or worst > UNSTABLE * first}


def summary(runs: list[dict]) -> str:
    scores = [r["score"] for r in runs]
    bad = sum(r["unstable"] for r in runs)
    finite = [s for s in scores if math.isfinite(s)]
    if not finite:
        return f"diverged ({bad}/{len(runs)} unstable)"
    std = statistics.stdev(finite) if len(finite) > 1 else 0.0
    div = f", {len(scores) - len(finite)} diverged" if len(finite) < len(scores) else ""
    return f"{statistics.fmean(finite):.4g} ± {std:.2g} ({bad}/{len(runs)} unstable{div})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--plot", default=str(DOCS / "alpha_lr_deep.png"))
    args = p.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    data = teacher_data()
    results = {}
    print(f"\nα-scaling vs LR-scaling on a {DEPTH}-layer tanh MLP from α0 = {ALPHA0:g} (s = {ALPHA0 / R:g}), "
          f"LR0 = {LR0:g}; {STEPS} Adam steps; score = held-out MSE after / before (mean ± std over {len(seeds)} "
          f"seeds); unstable = training loss ever > {UNSTABLE:g}× its first value")
    print("| c | α-scaling (α = c·α0, LR0) | LR-scaling (α0, LR = c·LR0) |\n|---|---|---|")
    for c in SCALES:
        results[c] = {"alpha": [run(data, c * ALPHA0, LR0, s) for s in seeds],
                      "lr": [run(data, ALPHA0, c * LR0, s) for s in seeds]}
        print(f"| {c:.3g} | {summary(results[c]['alpha'])} | {summary(results[c]['lr'])} |", flush=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, style in (("alpha", "α-scaling (α = c·α0)", "o-"), ("lr", "LR-scaling (LR = c·LR0)", "s--")):
        means = [statistics.fmean(min(r["score"], 10.0) for r in results[c][key]) for c in SCALES]
        ax.plot(SCALES, means, style, label=label)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set(xscale="log", yscale="log", xlabel="c", ylabel="held-out MSE after / before (capped at 10)",
           title=f"{DEPTH}-layer tanh MLP, LoRA r = {R}, {STEPS} Adam steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
