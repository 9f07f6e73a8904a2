"""``lora-lightning compare``: run several adapter methods side by side on one fit config and tabulate them.

    lora-lightning compare --config configs/minilm_sst2.yaml --methods lora,rslora,dora,sds,allora \\
        --seeds 0,1,2 --target val_acc=0.85 --out runs/compare_sst2 [--r 4,16] [--alpha 8,16] [--C 64,256] \\
        [--lr 1e-4,1e-3] [--variant 'allora_product=--config configs/compare_allora_product.yaml'] \\
        [-- any other fit override, e.g. --trainer.max_steps=100]

The grid is methods (and variants) × r × α × C × LR × seeds; α is swept only for methods whose scaling rule
uses it ("lora", "rslora": LoRA, rsLoRA, DoRA, SDS-LoRA), C only for "lora_alpha"; ALLoRA (s = 1) uses
neither. Every run is the config plus overrides (``--model.adapter.method=...``, ``--seed_everything=S``,
``--model.adapter.r=...`` ...): same data, same trainer budget (max_steps / max_epochs of the config), and at
the same seed the same initial RNG state, hence the same data order. Each run records a fingerprint of its first
training batches (``data_order``) so that this is visible in the results; after the first epoch the global
RNG is reseeded from (seed, epoch) at every epoch start, so later epochs' shuffles do not depend on how much
randomness a method consumed (dropout).

Per run, ``<out>/runs/<run-id>.json``: the train loss and wall time at every step, every ``val_*`` metric at
every validation (plus one validation after the last step if the config's schedule did not end on one),
final and best values, steps to ``--target`` (the first validation meeting it: resolution = the validation
interval), median step time, peak memory, and the ΔW spectrum of every adapter layer at the end
(``lora_lightning.spectra``: the AdapterMonitor's math, singular values from the factors). A run whose JSON
holds ``status: ok`` for the same config is skipped when compare is re-run; a failed run writes
``status: error`` with the error and log tail, and the others go on (failed runs are retried on re-run).
Each run's output (Lightning, warnings) goes to ``<run-id>.log``.

Isolation: by default each run is a child process (``python -m lora_lightning.compare --run-spec ...``): a
crash, an out-of-memory kill or leaked global state cannot touch the other runs, and peak memory is that
run's own (``getrusage`` max RSS of the child; on GPU ``torch.cuda.max_memory_allocated``). It costs one
interpreter start (~5-10 s) per run. ``--in-process`` runs everything in this process (for tiny runs): then
CPU peak memory is the process's max RSS so far, which only grows from run to run.

Outputs in ``<out>``: ``summary.csv`` / ``summary.json`` (one row per grid point: mean and std over seeds),
``summary.md`` (the table printed at the end), ``loss.png`` (train loss per step), ``<metric>.png``
(validation metric per step, mean ± std over seeds), ``spectra.png`` (σ_i of ΔW per layer, first seed).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

MIN_METRICS = re.compile(r".*(loss|mse|mae|err|perplexity|ppl).*")
AXES = ("r", "alpha", "C", "lr")
FORMAT_VERSION = 1


# -- the grid ------------------------------------------------------------------------------------------
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
    from .adapters import ADAPTER_METHODS

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


# -- one run ---------------------------------------------------------------------------------------------
def _batch_bytes(batch: Any) -> bytes:
    import torch

    if isinstance(batch, torch.Tensor):
        return batch.detach().cpu().contiguous().numpy().tobytes()
    if isinstance(batch, dict):
        return b"".join(k.encode() + _batch_bytes(batch[k]) for k in sorted(batch))
    if isinstance(batch, (list, tuple)):
        return b"".join(_batch_bytes(b) for b in batch)
    return repr(batch).encode()


def _recorder(seed: int):
    """A Callback that records the run (module docstring); built lazily so importing compare stays cheap."""
    import torch
    from lightning.pytorch import Callback

    from .inject import adapter_layers
    from .spectra import delta_singular_values, spectrum_stats

    class RunRecorder(Callback):
        def __init__(self) -> None:
            self.train: list[list[float]] = []  # [step, loss, seconds since train start]
            self.val: list[dict[str, float]] = []
            self.step_seconds: list[float] = []
            self.spectra: dict[str, dict[str, Any]] = {}
            self._order = hashlib.sha1()
            self._t0 = self._tb = 0.0

        @property
        def data_order(self) -> str:
            return self._order.hexdigest()[:16]

        def on_train_start(self, trainer, pl_module) -> None:
            self._t0 = time.perf_counter()

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if trainer.current_epoch > 0:  # the next epoch's shuffle is drawn after this hook
                torch.manual_seed(seed * 100_003 + trainer.current_epoch)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx < 2 and trainer.current_epoch < 2:
                self._order.update(_batch_bytes(batch))
            self._tb = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            now = time.perf_counter()
            self.step_seconds.append(now - self._tb)
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if loss is not None:
                self.train.append([trainer.global_step, float(loss), now - self._t0])

        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking:
                return
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
            entry = {"step": trainer.global_step, "time": time.perf_counter() - self._t0, **metrics}
            if self.val and self.val[-1]["step"] == trainer.global_step:
                self.val[-1] = entry
            else:
                self.val.append(entry)

        @torch.no_grad()
        def on_train_end(self, trainer, pl_module) -> None:
            for name, layer in adapter_layers(pl_module).items():
                sigma = delta_singular_values(layer)
                self.spectra[name] = {"sigma": [float(s) for s in sigma], **spectrum_stats(layer, sigma=sigma)}

    return RunRecorder()


def _steps_to_target(val: list[dict], train: list[list], target) -> Optional[int]:
    if target is None:
        return None
    name, op, value = target
    series = [(t[0], t[1]) for t in train] if name == "train_loss" else [(v["step"], v[name]) for v in val if name in v]
    for step, x in series:
        if (x >= value) if op == ">=" else (x <= value):
            return int(step)
    return None


def _final_and_best(val: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    keys = dict.fromkeys(k for v in val for k in v if k.startswith("val_"))
    for k in keys:
        xs = [v[k] for v in val if k in v and not math.isnan(v[k])]
        if xs:
            out[f"final_{k}"] = [v[k] for v in val if k in v][-1]
            out[f"best_{k}"] = min(xs) if MIN_METRICS.match(k) else max(xs)
    return out


def execute(spec: RunSpec, isolated: bool) -> dict[str, Any]:
    """Run one spec in this process and return its record (raises on failure)."""
    import torch
    from lightning.pytorch import LightningDataModule

    from .cli import LoRALightningCLI
    from .module import LoRAModule

    start = time.perf_counter()
    argv, sys.argv = sys.argv, sys.argv[:1]  # the CLI reads spec.cli_args only (and warns if sys.argv has more)
    try:
        cli = LoRALightningCLI(
            LoRAModule, LightningDataModule, subclass_mode_data=True, save_config_callback=None, run=False,
            args=spec.cli_args,
        )
    finally:
        sys.argv = argv
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    recorder = _recorder(spec.seed)
    trainer.callbacks.append(recorder)
    cuda = trainer.strategy.root_device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, datamodule=data)
    fit_seconds = time.perf_counter() - start
    if trainer.limit_val_batches != 0 and (not recorder.val or recorder.val[-1]["step"] != trainer.global_step):
        trainer.validate(model, datamodule=data, verbose=False)  # the final metrics are at the last step
    if cuda:
        peak, source = torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        source = "max_rss_run_process" if isolated else "max_rss_shared_process"
    steps = recorder.step_seconds[1:] or recorder.step_seconds  # the first step pays one-off costs
    return {
        "global_step": trainer.global_step,
        "wall_s": fit_seconds,
        "step_ms": 1000 * statistics.median(steps) if steps else None,
        "peak_mem_mb": peak,
        "peak_mem_source": source,
        "data_order": recorder.data_order,
        "steps_to_target": _steps_to_target(recorder.val, recorder.train, spec.target),
        **_final_and_best(recorder.val),
        "train": recorder.train,
        "val": recorder.val,
        "spectra": recorder.spectra,
        "callbacks": [type(cb).__name__ for cb in trainer.callbacks],
        "scale": model.adapter_config.scale,
        "lr_used": model.lr,
    }


def _base_record(spec: RunSpec) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "run_id": spec.run_id, "group": spec.group, "label": spec.label,
            "method": spec.method, "seed": spec.seed, **spec.values, "config_hash": spec.config_hash,
            "cli_args": spec.cli_args}


def _write(path: Path, record: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_in_process(spec: RunSpec, isolated: bool = False) -> dict[str, Any]:
    """Execute one run here, stdout/stderr into ``<run-id>.log``; write and return its record (ok or error)."""
    import logging

    path = Path(spec.record_path)
    log_path = path.with_suffix(".log")
    record = _base_record(spec)
    quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in quiet]
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        for lg in quiet:
            lg.setLevel(logging.WARNING)
        try:
            record.update(status="ok", **execute(spec, isolated))
        except (Exception, SystemExit) as err:  # noqa: BLE001 - one failed run must not stop the others
            if isinstance(err, SystemExit):
                message = f"configuration error (exit {err.code}); see the log"
            else:
                message = f"{type(err).__name__}: {err}"
            traceback.print_exc()
            record.update(status="error", error=message)
        finally:
            for lg, level in zip(quiet, levels):
                lg.setLevel(level)
    if record["status"] == "error":
        record["log_tail"] = _tail(log_path)
    _write(path, record)
    return record


def run_in_subprocess(spec: RunSpec, timeout: Optional[float]) -> dict[str, Any]:
    """Execute one run in a child process; an error record if it dies without writing one."""
    path = Path(spec.record_path)
    spec_path = path.with_suffix(".spec.json")
    spec_path.write_text(json.dumps(asdict(spec)))
    path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "lora_lightning.compare", "--run-spec", str(spec_path)]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=timeout)
        failure = f"the run process exited with code {proc.returncode}" if proc.returncode else ""
        stderr = proc.stderr
    except subprocess.TimeoutExpired:
        failure, stderr = f"timed out after {timeout:g} s (--run-timeout)", ""
    if path.is_file():
        record = json.loads(path.read_text())
        if record.get("status") == "ok" or not failure:
            return record
    record = {**_base_record(spec), "status": "error", "error": failure,
              "log_tail": (_tail(path.with_suffix(".log")) + "\n" + stderr[-3000:]).strip()}
    _write(path, record)
    return record


def _run_spec_main(spec_path: str) -> int:
    data = json.loads(Path(spec_path).read_text())
    data["target"] = tuple(data["target"]) if data.get("target") else None
    record = run_in_process(RunSpec(**data), isolated=True)
    return 0 if record["status"] == "ok" else 1


# -- summary -----------------------------------------------------------------------------------------------
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


# -- plots -------------------------------------------------------------------------------------------------
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
    """loss.png, <metric>.png and spectra.png (module docstring); returns the files written."""
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


# -- entry point ---------------------------------------------------------------------------------------------
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


if __name__ == "__main__":
    sys.exit(main())
