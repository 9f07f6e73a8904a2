"""Kim, Kim & Ryu (2025): LoRA reaches a low-rank small-norm solution, or a high-rank large-norm one; zero-init of B
and weight decay push it to the first.

    python benchmarks/teacher_landscape.py            # prints the table, writes docs/teacher_landscape.png
    python benchmarks/teacher_landscape.py --optimisers Adam+L2     # only the coupled-decay Adam rows

Task (``lora_lightning.data.synthetic``): frozen 64×64 W0, ΔW* of rank 4 (σ = 1, 1, 1, 1), only n = 32 < 64
training inputs, so every ΔW*·P + N (N·X = 0) fits the training set exactly; the smallest one (Frobenius and
nuclear norm) is ΔW*·P, rank 4. LoRA r = 16, s = α/r = 1, full-batch training for 8,000 steps on the teacher's
mean squared error, from
    zero init:   A kaiming-uniform (PEFT's), B = 0
    large init:  the same A, B ~ N(0, 0.3²)   (‖s·B·A‖_F = 5.6–5.7 at init for seeds 0–2, vs ‖ΔW*‖_F = 2)
with weight decay λ on A and B, for three optimisers: GD (plain SGD; its L2 decay is the penalty λ/2·(‖A‖²+‖B‖²)
in the loss, which at the balanced optimum is λ·‖ΔW‖_* for s = 1, (λ/s)·‖ΔW‖_* in general), Adam with the same
coupled L2 penalty ("Adam+L2", LoRAModule's ``weight_decay_mode: coupled``: the same objective, another
optimiser) and AdamW (decoupled decay, LoRAModule's default: not a penalty in the loss, so the equivalence
does not apply to it).

Reported at the end, mean ± std over 3 seeds (seed = A/B init): training and held-out MSE, numerical rank
(#σ > 10⁻³·σ_max) and stable rank of ΔW, ‖ΔW‖_F, ‖ΔW‖_*, distance to ΔW* and to the min-norm interpolant ΔW*·P,
and balance = (‖A‖²+‖B‖²)/(2‖ΔW‖_*) (1 at the nuclear-norm-equivalent optimum).
"""

from __future__ import annotations

import argparse

import torch
from synth_utils import DOCS, adapted_layer, delta, mean_std, mse, numerical_rank, stable_rank, train

from lora_lightning.data.synthetic import make_teacher

CONFIGS = [  # (optimiser, lr, init_b_std, weight decays)
    ("GD", 0.5, 0.0, (0.0, 1e-3, 1e-2)),
    ("GD", 0.5, 0.3, (0.0, 1e-3, 1e-2)),
    ("AdamW", 1e-2, 0.0, (0.0, 1e-2, 1e-1)),
    ("AdamW", 1e-2, 0.3, (0.0, 1e-2, 1e-1)),
    ("Adam+L2", 1e-2, 0.0, (1e-3,)),  # coupled decay: the penalty λ/2·(‖A‖²+‖B‖²) in the loss, as with GD
    ("Adam+L2", 1e-2, 0.3, (1e-3,)),
]


def run(opt_name: str, lr: float, init_b: float, wd: float, seed: int, steps: int, teacher) -> dict:
    layer = adapted_layer(teacher, seed, method="lora", r=16, alpha=16, init_b_std=init_b)
    params = [layer.lora_A, layer.lora_B]
    if opt_name == "GD":
        opt = torch.optim.SGD(params, lr=lr, weight_decay=wd)
    elif opt_name == "Adam+L2":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=wd)  # λ·p added to the gradient (coupled)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    trace = train(layer, teacher.x_train, teacher.y_train, steps, opt, every=50)
    d = delta(layer)
    nuc = float(torch.linalg.matrix_norm(d, "nuc"))
    with torch.no_grad():
        factor_sq = float(layer.lora_A.double().pow(2).sum() + layer.lora_B.double().pow(2).sum())
        return {
            "train_mse": float(mse(layer, teacher.x_train, teacher.y_train)),
            "val_mse": float(mse(layer, teacher.x_val, teacher.y_val)),
            "rank": numerical_rank(d),
            "stable_rank": stable_rank(d),
            "fro": float(d.norm()),
            "nuc": nuc,
            "dist_star": float((d - teacher.delta.double()).norm()),
            "dist_minnorm": float((d - teacher.min_norm_solution().double()).norm()),
            "balance": factor_sq / (2 * nuc / layer.scaling) if nuc > 0 else None,
            "sigma": torch.linalg.svdvals(d)[:16].tolist(),
            "curve": (trace.steps, trace.losses),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--plot", default=str(DOCS / "teacher_landscape.png"))
    p.add_argument("--optimisers", default="GD,AdamW,Adam+L2", help="rows to run (the plot needs GD)")
    args = p.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    teacher = make_teacher(d_in=64, d_out=64, rank=4, n_train=32, n_val=1024, seed=0)
    mn = teacher.min_norm_solution().double()
    print(f"teacher: ‖ΔW*‖_F = {teacher.delta.norm():.4f}, min-norm interpolant ΔW*·P: ‖·‖_F = {mn.norm():.4f}, "
          f"‖·‖_* = {torch.linalg.matrix_norm(mn, 'nuc'):.4f}, rank {numerical_rank(mn)}, held-out MSE of ΔW*·P = "
          f"{((teacher.x_val.double() @ (teacher.W0.double() + mn).T - teacher.y_val.double())**2).mean():.4g}")
    keys = ["train_mse", "val_mse", "rank", "stable_rank", "fro", "nuc", "dist_star", "dist_minnorm", "balance"]
    heads = ["optimiser", "init", "λ", "train MSE", "held-out MSE", "num. rank", "stable rank", "‖ΔW‖_F", "‖ΔW‖_*",
             "‖ΔW−ΔW*‖_F", "‖ΔW−ΔW*P‖_F", "balance"]
    print("| " + " | ".join(heads) + " |\n|" + "---|" * len(heads))
    results = {}
    for opt_name, lr, init_b, decays in CONFIGS:
        if opt_name not in args.optimisers.split(","):
            continue
        for wd in decays:
            runs = [run(opt_name, lr, init_b, wd, s, args.steps, teacher) for s in seeds]
            results[(opt_name, init_b, wd)] = runs
            init = "zero" if init_b == 0 else f"large (B std {init_b})"
            cells = [opt_name, init, f"{wd:g}"] + [mean_std([r[k] for r in runs]) for k in keys]
            print("| " + " | ".join(cells) + " |", flush=True)

    if not any(key[0] == "GD" for key in results):
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (opt_name, init_b, wd), runs in results.items():
        if opt_name != "GD":
            continue
        label = f"{'zero' if init_b == 0 else 'large'} init, λ={wd:g}"
        style = "-" if init_b == 0 else "--"
        axes[0].plot(range(1, 17), runs[0]["sigma"], style, marker="o", ms=3, label=label)
        axes[1].plot(*runs[0]["curve"], style, label=label)
    axes[0].plot(range(1, 17), torch.linalg.svdvals(mn)[:16].tolist(), "k:", lw=2, label="ΔW*·P (min-norm)")
    axes[0].set(yscale="log", ylim=(1e-6, 10), xlabel="i", ylabel="σ_i(ΔW)",
                title="ΔW spectrum after training (GD, seed 0)")
    axes[1].set(yscale="log", xlabel="step", ylabel="training MSE", title="training loss (GD, seed 0)")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
