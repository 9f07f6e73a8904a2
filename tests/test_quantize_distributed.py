"""QLoRA on 2 CPU processes (gloo): DDP and FSDP2 on a tiny Llama whose frozen linears are NF4 give the adapter
weights of 1 process with the doubled batch.

One launch of this file as a script (``python tests/test_quantize_distributed.py OUT``) runs, in the same 2
processes, DDP (configs/ddp.yaml) and then FSDP2 (configs/fsdp.yaml, LoRA with gradient checkpointing) for LoRA
and DoRA (QDoRA: W0 gathered as NF4 inside the DoRA layer's unit), STEPS optimizer steps each; the test compares
with 1 process (batch 4) computed in the pytest process while the workers run. The Llama computes in float64
(NF4 codes, float64 levels and scales), so the only differences are reduction orders (in float32 Adam's first
steps magnify them to 2e-4 on near-zero gradients, as in test_causal_lm_distributed).

Under FSDP2 the 256×128 gate/up/down weights (32768 = 2·64·256 weights) are sharded as NF4 across the ranks;
the q/o/k/v weights (one double-quantisation group each) cannot split in two and are kept whole on each rank
(``ignored_params``), so both cases are covered. Measured max |2 ranks − 1 process| after 3 steps (weights
move 0.04): DDP and FSDP2 LoRA 3e-16, DDP and FSDP2 DoRA 9e-15; checked at 1e-10. Without
``ignore_4bit_in_ddp`` (LoRAModule calls it) DDP's start-up broadcast re-quantised W0 and the DDP runs ended as
far from one process as the weights had moved. About 2 min on the shared 2-core machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchao")

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(REPO), str(TESTS)]

from lightning.pytorch import Trainer  # noqa: E402
from test_causal_lm import examples, lm_loader  # noqa: E402
from test_distributed import _DIST_ENV, RankSlice, _free_port, full_state, strategy_from  # noqa: E402
from tiny_models import quantizable_llama  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lora_lightning import AdapterConfig, LoRAModule  # noqa: E402
from lora_lightning.data.causal_lm import pad_right  # noqa: E402
from lora_lightning.quantize import is_quantized  # noqa: E402

METHODS = ("lora", "dora")
N, BATCH, STEPS, WORLD = 12, 4, 3, 2
TOL = 1e-10
TIMEOUT = 300


def module(method: str, checkpointing: bool = False) -> LoRAModule:
    adapter = AdapterConfig(method=method, r=3, alpha=6)
    return LoRAModule(quantizable_llama().double(), adapter=adapter, lr=0.02, warmup=0, init_seed=0,
                      gradient_checkpointing=checkpointing, quantize="nf4")


def loader(batch_size: int) -> DataLoader:
    rows = examples(seed=5, n=N, vocab=96)
    return DataLoader(rows, batch_size=batch_size, sampler=RankSlice(N), collate_fn=lambda b: pad_right(b, 2))


def trainer(strategy, devices: int) -> Trainer:
    return Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0, use_distributed_sampler=False,
    )


def nf4_layout(model) -> dict[str, str]:
    """{weight name: "NF4Tensor" | "DTensor(NF4Tensor)"} for the 4-bit weights this rank holds."""
    out = {}
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if is_quantized(local):
            out[name] = f"{type(p).__name__}({type(local).__name__})" if local is not p else type(p).__name__
    return out


def worker(out: Path) -> None:
    torch.set_num_threads(1)
    results: dict = {}
    for kind in ("ddp", "fsdp"):
        strategy, devices = strategy_from(f"{kind}.yaml")
        for method in METHODS:
            mod = module(method, checkpointing=kind == "fsdp" and method == "lora")
            t = trainer(strategy(), devices)
            t.fit(mod, train_dataloaders=loader(BATCH // WORLD))
            results[f"{kind}_{method}"] = {
                "state": full_state(mod.model), "steps": t.global_step, "nf4": nf4_layout(mod.model)
            }
    torch.save(results, out / f"rank{torch.distributed.get_rank()}.pt")
    torch.distributed.barrier()


def reference() -> dict:
    refs = {}
    for method in METHODS:
        start = module(method)
        start.configure_model()
        mod = module(method)
        trainer("auto", 1).fit(mod, train_dataloaders=lm_loader(examples(seed=5, n=N, vocab=96), BATCH))
        refs[method] = {"init": full_state(start.model), "state": full_state(mod.model)}
    return refs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("qlora_dist")
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV and not k.startswith("SLURM_")}
    env.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")]),
    )
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), str(out)], cwd=out, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        refs = reference()  # computed here while the 2 ranks train
        log, _ = proc.communicate(timeout=TIMEOUT)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code, log = -1, f"timed out after {TIMEOUT} s"
    finally:
        try:  # every rank, whatever happened: no process outlives the test
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
    assert code == 0, f"worker failed (exit {code}):\n{log[-6000:]}"
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"ranks": ranks, "reference": refs}


@pytest.mark.multiprocess
@pytest.mark.timeout(TIMEOUT + 120)
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_on_an_nf4_base_match_one_process(runs, kind, method):
    ref = runs["reference"][method]
    moved = max((ref["state"][k] - ref["init"][k]).abs().max().item() for k in ref["init"])
    assert moved > 0.01  # the runs really train
    r0, r1 = (r[f"{kind}_{method}"] for r in runs["ranks"])
    assert r0["steps"] == STEPS
    layout = set(r0["nf4"].values())
    if kind == "fsdp":  # gate/up/down sharded as NF4, q/o (one group each) kept whole
        assert layout == {"DTensor(NF4Tensor)", "NF4Tensor"}
        assert all(v == "DTensor(NF4Tensor)" for k, v in r0["nf4"].items() if "mlp" in k)
    else:
        assert layout == {"NF4Tensor"}
    assert len(r0["nf4"]) == 14
    worst = max((r0["state"][k] - want).abs().max().item() for k, want in ref["state"].items())
    print(f"{kind} {method} on NF4: max |2 ranks - 1 process| = {worst:.2e} (weights moved {moved:.3f})")
    for k, want in ref["state"].items():
        assert torch.equal(r0["state"][k], r1["state"][k])  # the ranks agree bitwise
        torch.testing.assert_close(r0["state"][k], want, rtol=0, atol=TOL, msg=lambda m, k=k: f"{k}: {m}")


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
    sys.exit(0)
