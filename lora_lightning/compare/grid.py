"""The run grid of ``lora-lightning compare``: methods (and variants) × r × α × C × LR × seeds as ``RunSpec``s.

α is swept only for methods whose scaling rule uses it ("lora", "rslora"), C only for "lora_alpha"; ALLoRA
(s = 1) uses neither. Every run is the config plus overrides (``--model.adapter.method=...``,
``--seed_everything=S`` ...), so runs differ only in what the grid names.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

MIN_METRICS = re.compile(r".*(loss|mse|mae|err|perplexity|ppl).*")
AXES = ("r", "alpha", "C", "lr")


@dataclass
class RunSpec:
    """One run: ``cli_args`` (the full LightningCLI argument list, no subcommand) and what identifies it."""

    run_id: str
    group: str
    label: str
    method: str
    seed: int
    values: dict[str, float]
    cli_args: list[str]
    config_hash: str
    target: Optional[tuple[str, str, float]] = None
    record_path: str = ""


def _floats(text: Optional[str], kind=float) -> list:
    if text is None:
        return [None]
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise SystemExit(f"compare: cannot read {text!r} as a comma-separated list of numbers ({err})") from None


def parse_target(text: Optional[str]) -> Optional[tuple[str, str, float]]:
    """"val_acc=0.9" → ("val_acc", ">=", 0.9); "val_loss=0.3" → ("val_loss", "<=", 0.3) (loss-like names are
    minimised); explicit "name>=v" / "name<=v" also work."""
    if not text:
        return None
    m = re.fullmatch(r"\s*([\w/.]+)\s*(>=|<=|=)\s*([-+0-9.eE]+)\s*", text)
    if not m:
        raise SystemExit(f"compare: --target {text!r}: write it as metric=value, e.g. val_acc=0.9 or val_loss<=0.3")
    name, op, value = m.group(1), m.group(2), float(m.group(3))
    if op == "=":
        op = "<=" if MIN_METRICS.match(name) else ">="
    return name, op, value


def _method_of(args: list[str], default: str) -> str:
    for i, a in enumerate(args):
        if a.startswith("--model.adapter.method="):
            return a.split("=", 1)[1]
        if a == "--model.adapter.method" and i + 1 < len(args):
            return args[i + 1]
    return default


def _fmt(v: float) -> str:
    return f"{v:g}"


def _fragments(args: list[str]) -> str:
    """The text of the config files a variant's arguments name, so that editing one re-runs its runs."""
    names = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    names += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    return "".join(Path(n).read_text() for n in names if Path(n).is_file())


def build_runs(ns: argparse.Namespace, passthrough: list[str], out: Path) -> list[RunSpec]:
    """The grid (module docstring) as RunSpecs, seeds outermost so that a partial result covers every method."""
    from ..adapters import ADAPTER_METHODS

    families: list[tuple[str, str, list[str]]] = []  # (label, method, extra args)
    for m in [m.strip() for m in (ns.methods or "").split(",") if m.strip()]:
        if m not in ADAPTER_METHODS:
            raise SystemExit(f"compare: unknown method {m!r}; choose from {', '.join(sorted(ADAPTER_METHODS))}")
        families.append((m, m, [f"--model.adapter.method={m}"]))
    for v in ns.variant or []:
        label, sep, rest = v.partition("=")
        if not sep or not re.fullmatch(r"[\w.+-]+", label):
            raise SystemExit(
                f"compare: --variant {v!r}: write it as LABEL='--override ...' (LABEL: letters, digits, _.+-)"
            )
        args = shlex.split(rest)
        families.append((label, _method_of(args, "lora"), args))
    if not families:
        raise SystemExit("compare: nothing to run; give --methods (e.g. lora,dora) and/or --variant")
    labels = [f[0] for f in families]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"compare: duplicate method/variant labels in {labels}")

    configs = [Path(c) for c in ns.config]
    for c in configs:
        if not c.is_file():
            raise SystemExit(f"compare: config {c} not found")
    digest = hashlib.sha1()
    for c in configs:
        digest.update(c.read_bytes())
    digest.update(json.dumps(passthrough).encode())

    grid = {"r": _floats(ns.r, int), "alpha": _floats(ns.alpha), "C": _floats(ns.C), "lr": _floats(ns.lr)}
    target = parse_target(ns.target)
    runs = []
    for seed in _floats(ns.seeds, int):
        for label, method, extra in families:
            rule = ADAPTER_METHODS[method].scaling if method in ADAPTER_METHODS else "lora"
            used = {"r": True, "lr": True, "alpha": rule in ("lora", "rslora"), "C": rule == "lora_alpha"}
            points: list[dict[str, float]] = [{}]
            for axis in AXES:
                values = grid[axis] if used[axis] else [None]
                points = [{**p, axis: v} if v is not None else p for p in points for v in values]
            for values in points:
                group = label + "".join(f"-{k}{_fmt(v)}" for k, v in values.items())
                run_id = f"{group}-s{seed}"
                args = ["--config", str(configs[0])]
                for c in configs[1:]:
                    args += ["--config", str(c)]
                args += [f"--seed_everything={seed}"]
                if method in ADAPTER_METHODS and ADAPTER_METHODS[method].forces_no_dropout:
                    args.append("--model.adapter.dropout=0.0")
                flags = {"r": "--model.adapter.r", "alpha": "--model.adapter.alpha", "C": "--model.adapter.C",
                         "lr": "--model.lr"}
                args += [f"{flags[k]}={v}" for k, v in values.items()]
                run_dir = out / "runs" / run_id
                args += [f"--trainer.default_root_dir={run_dir}", "--trainer.enable_progress_bar=false",
                         "--trainer.enable_model_summary=false", *passthrough, *extra]
                h = hashlib.sha1((digest.hexdigest() + json.dumps(extra) + _fragments(extra)).encode()).hexdigest()[:16]
                runs.append(RunSpec(run_id, group, label, method, seed, values, args, h, target,
                                    str(out / "runs" / f"{run_id}.json")))
    return runs

