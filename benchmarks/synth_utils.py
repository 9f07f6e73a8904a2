"""Shared by the synthetic benchmarks: one adapted linear layer on the low-rank teacher, trained by a plain loop.

Everything here is lora_lightning's own code path except the loop: the layer is built by ``inject_adapters``
(so it is the same LoRALayer / DoRALayer / SDSLayer a LoRAModule trains), SDS re-balancing and refreshes use
the layer's ``rebalance()`` / ``refresh()`` / ``reorthonormalize()`` on ``SDSReorthonormalization``'s
``RefreshSchedule``, and ALLoRA's per-row step uses ``ALLoRARescaling.coefficients``. The loss is the teacher's mean squared
error, (1/(n·out))·‖(W0 + ΔW)·X − Y‖_F².
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: import the checkout

from lora_lightning import AdapterConfig, adapter_layers, inject_adapters  # noqa: E402
from lora_lightning.callbacks.sds import RefreshSchedule  # noqa: E402
from lora_lightning.data.synthetic import LowRankTeacher  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"


def adapted_layer(teacher: LowRankTeacher, seed: int, **adapter: object) -> nn.Module:
    """A bias-free Linear holding W0, wrapped by ``inject_adapters`` with ``AdapterConfig(**adapter)``; A is drawn
    from torch's generator seeded with ``seed``."""
    d_out, d_in = teacher.W0.shape
    holder = nn.Module()
    holder.linear = nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        holder.linear.weight.copy_(teacher.W0)
    torch.manual_seed(seed)
    inject_adapters(holder, AdapterConfig(target_modules=["linear"], modules_to_save=[], **adapter), verbose=False)
    (layer,) = adapter_layers(holder).values()
    return layer


def mse(layer: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return (layer(x) - y).pow(2).mean()


@torch.no_grad()
def delta(layer: nn.Module) -> Tensor:
    return layer.delta_matrix().detach().double()


def numerical_rank(m: Tensor, rtol: float = 1e-3) -> int:
    """#{σ_i > rtol·σ_max} (a threshold far above float rounding: counts directions that carry weight)."""
    s = torch.linalg.svdvals(m.double())
    return int((s > rtol * s[0]).sum()) if s[0] > 0 else 0


def stable_rank(m: Tensor) -> float:
    s = torch.linalg.svdvals(m.double())
    return float((s**2).sum() / s[0] ** 2) if s[0] > 0 else 0.0


@dataclass
class Trace:
    steps: list[int]
    losses: list[float]
    reached: Optional[int]


def train(
    layer: nn.Module,
    x: Tensor,
    y: Tensor,
    steps: int,
    optimizer: torch.optim.Optimizer,
    done: Optional[Callable[[nn.Module], bool]] = None,
    every: int = 1,
    after_step: Optional[Callable[[int], None]] = None,
    check_every: int = 1,
) -> Trace:
    """Full-batch training for ``steps`` steps; stops early when ``done(layer)`` (checked every ``check_every``
    steps) and returns the first such step as ``reached``; records the loss every ``every`` steps."""
    trace = Trace([], [], None)
    for step in range(1, steps + 1):
        optimizer.zero_grad(set_to_none=True)
        loss = mse(layer, x, y)
        loss.backward()
        optimizer.step()
        value = loss.item()
        if step % every == 0:
            trace.steps.append(step)
            trace.losses.append(value)
        if not math.isfinite(value) or not all(torch.isfinite(p).all() for p in layer.parameters()):
            break  # diverged
        if after_step is not None:
            after_step(step)
        if done is not None and step % check_every == 0 and done(layer):
            trace.reached = step
            break
    return trace


def sds_schedule(layer: nn.Module, optimizer: torch.optim.Optimizer, schedule: "RefreshSchedule",
                 reset_on_refresh: bool = False, refresh: str = "truncate") -> Callable[[int], None]:
    """After-step hook doing what ``SDSReorthonormalization`` does: rebalance at ``schedule.warmup_steps`` (moments
    of A and B cleared), then at ``schedule.due(step)`` ``refresh()`` ("truncate") or ``reorthonormalize()``,
    clearing the moments again if ``reset_on_refresh``."""

    def reset() -> None:
        for p in (layer.lora_A, layer.lora_B):
            optimizer.state.pop(p, None)

    def hook(step: int) -> None:
        if not layer.active and step >= schedule.warmup_steps:
            layer.rebalance()
            reset()
        elif layer.active and schedule.due(step):
            layer.refresh() if refresh == "truncate" else layer.reorthonormalize()
            if reset_on_refresh:
                reset()

    return hook


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` with (key, header) columns; floats in 4 significant digits."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "–" if v is None else str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def mean_std(xs: list[float]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    t = torch.tensor(xs, dtype=torch.float64)
    std = float(t.std()) if len(xs) > 1 else 0.0
    return f"{float(t.mean()):.4g} ± {std:.2g}"
