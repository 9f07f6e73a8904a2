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

Modules (none imports ``lora_lightning.cli``; cli.py imports this package lazily for ``compare``):
    grid.py      the run grid: ``RunSpec``, ``build_runs``, ``parse_target``
    runner.py    one run: in this process or a child process; its record (JSON)
    summary.py   the table over seeds: ``summarize``, ``markdown_table``, ``write_summary``
    plots.py     loss / metric / spectra PNGs
    command.py   the ``lora-lightning compare`` argument parser and ``main``
"""

from .command import main, parser
from .grid import AXES, MIN_METRICS, RunSpec, build_runs, parse_target
from .plots import plot
from .runner import _steps_to_target, execute, run_in_process, run_in_subprocess
from .summary import markdown_table, summarize, write_summary

__all__ = [
    "AXES",
    "MIN_METRICS",
    "RunSpec",
    "build_runs",
    "execute",
    "main",
    "markdown_table",
    "parse_target",
    "parser",
    "plot",
    "run_in_process",
    "run_in_subprocess",
    "summarize",
    "write_summary",
    "_steps_to_target",
]
