"""One run of ``lora-lightning compare``: build the LightningCLI objects from a ``RunSpec``, fit with a recorder
callback, write the run's JSON record. ``run_in_subprocess`` isolates it in a child process
(``python -m lora_lightning.compare --run-spec <file>``); ``run_in_process`` runs it here."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import resource
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from .grid import MIN_METRICS, RunSpec

FORMAT_VERSION = 1


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
    """A Callback that records the run (package docstring); built lazily so importing compare stays cheap."""
    import torch
    from lightning.pytorch import Callback

    from ..inject import adapter_layers
    from ..spectra import delta_singular_values, spectrum_stats

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

    from ..lightning_cli import LoRALightningCLI
    from ..module import LoRAModule

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

