"""Causal-LM SFT on 2 CPU processes (gloo): DDP and FSDP2 on a tiny Llama give the weights of 1 process with the
doubled batch, with the loss normalised over the target tokens of the whole step.

One launch of this file as a script (``python tests/test_causal_lm_distributed.py OUT``) runs, in the same 2
processes, DDP (configs/ddp.yaml; per-device batch 1 with ``accumulate_grad_batches: 2``) and then FSDP2
(configs/fsdp.yaml; per-device batch 2, LoRA with gradient checkpointing on) for LoRA (float64) and DoRA
(float32, its base in the adapter's unit), STEPS optimizer steps each; the test compares with 1 process
(batch 4, no accumulation, no checkpointing) computed in the pytest process while the workers run.

The examples hold different numbers of target tokens and the two ranks see different ones, so a per-device or
per-micro-batch mean would not match: only the mean over the step's global token count does. Measured
max |2 ranks − 1 process| after 3 steps (weights move 0.04): DDP LoRA 6e-16, FSDP2 LoRA 8e-15 (float64),
DDP DoRA 7e-7, FSDP2 DoRA 6e-7 (float32); checked at TOL = 1e-12 and 1e-5. Both strategies run in ONE 2-process
launch (Lightning reuses the process group): 122 s measured on the 2 shared cores at load average ~10.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(REPO), str(TESTS)]

from lightning.pytorch import Trainer  # noqa: E402
from test_causal_lm import examples, lm_loader  # noqa: E402
from test_distributed import _DIST_ENV, RankSlice, _free_port, full_state, strategy_from  # noqa: E402
from tiny_models import tiny_llama  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from lora_lightning import AdapterConfig, LoRAModule  # noqa: E402
from lora_lightning.data.causal_lm import pad_right  # noqa: E402

METHODS = ("lora", "dora")
N, BATCH, STEPS, WORLD = 12, 4, 3, 2
TOL = 1e-12
TIMEOUT = 300


def dtype(method: str) -> torch.dtype:
    return torch.float32 if method == "dora" else torch.float64


def module(method: str, checkpointing: bool = False, base_dtype: str | None = None) -> LoRAModule:
    adapter = AdapterConfig(method=method, r=3, alpha=6)
    model = tiny_llama(seed=0).to(dtype(method))
    return LoRAModule(model, adapter=adapter, lr=0.02, warmup=0, init_seed=0, gradient_checkpointing=checkpointing,
                      dtype=base_dtype)


def loader(batch_size: int) -> DataLoader:
    rows = examples(seed=5, n=N)
    return DataLoader(rows, batch_size=batch_size, sampler=RankSlice(N), collate_fn=lambda b: pad_right(b, 2))


def trainer(strategy, devices: int, accumulate: int = 1) -> Trainer:
    return Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS, accumulate_grad_batches=accumulate,
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0, use_distributed_sampler=False,
    )


def worker(out: Path) -> None:
    torch.set_num_threads(1)
    results: dict = {}
    # DDP: 2 devices × 2 micro-batches of 1 = 4 examples per step; FSDP2: 2 devices × 2
    for kind, batch, accumulate in (("ddp", 1, 2), ("fsdp", 2, 1)):
        strategy, devices = strategy_from(f"{kind}.yaml")
        for method in METHODS:
            checkpointing = kind == "fsdp" and method == "lora"
            mod = module(method, checkpointing)
            t = trainer(strategy(), devices, accumulate)
            t.fit(mod, train_dataloaders=loader(batch))
            types = sorted({type(p).__name__ for p in mod.model.parameters() if p.requires_grad})
            results[f"{kind}_{method}"] = {"state": full_state(mod.model), "types": types, "steps": t.global_step}
    # FSDP2 over a bf16 base with float32 adapters (model.dtype: bf16): DoRA's unit holds both dtypes
    mod = module("dora", base_dtype="bf16")
    trainer(strategy(), devices).fit(mod, train_dataloaders=loader(2))
    results["fsdp_dora_bf16_base"] = {"state": full_state(mod.model)}
    rank = torch.distributed.get_rank()
    torch.save(results, out / f"rank{rank}.pt")
    torch.distributed.barrier()


def reference() -> dict[str, dict[str, torch.Tensor]]:
    refs = {}
    for method in METHODS:
        start = module(method)
        start.configure_model()
        mod = module(method)
        trainer("auto", 1).fit(mod, train_dataloaders=lm_loader(examples(seed=5, n=N), BATCH))
        refs[method] = {"init": full_state(start.model), "state": full_state(mod.model)}
    mod = module("dora", base_dtype="bf16")
    trainer("auto", 1).fit(mod, train_dataloaders=lm_loader(examples(seed=5, n=N), BATCH))
    refs["dora_bf16_base"] = {"state": full_state(mod.model)}
    return refs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("causal_lm_dist")
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
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_match_one_process_with_the_doubled_batch(runs, kind, method):
    ref = runs["reference"][method]
    moved = max((ref["state"][k].double() - ref["init"][k].double()).abs().max().item() for k in ref["init"])
    assert moved > 0.01  # the runs really train
    r0, r1 = (r[f"{kind}_{method}"] for r in runs["ranks"])
    assert r0["steps"] == STEPS
    if kind == "fsdp":
        assert r0["types"] == ["DTensor"]  # every trainable tensor sharded
    assert set(r0["state"]) == set(ref["state"])
    tol = TOL if dtype(method) == torch.float64 else 1e-5
    worst = max((r0["state"][k].double() - want.double()).abs().max().item() for k, want in ref["state"].items())
    print(f"{kind} {method}: max |2 ranks - 1 process| = {worst:.2e} (weights moved {moved:.3f})")
    for k, want in ref["state"].items():
        assert torch.equal(r0["state"][k], r1["state"][k])  # the ranks agree bitwise
        torch.testing.assert_close(r0["state"][k], want, rtol=0, atol=tol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.multiprocess
def test_fsdp2_trains_float32_adapters_over_a_bf16_base(runs):
    ref = runs["reference"]["dora_bf16_base"]["state"]
    r0, r1 = (r["fsdp_dora_bf16_base"]["state"] for r in runs["ranks"])
    assert {v.dtype for v in r0.values()} == {torch.float32}
    start = runs["reference"]["dora"]["init"]
    for k, want in ref.items():
        assert torch.equal(r0[k], r1[k])
        assert (want - start[k]).abs().max() > 0.01 or k.endswith("magnitude")  # trained
        # bf16 base matmuls round differently with the batch split in two, and Adam's first steps magnify that for
        # near-zero gradients (measured before the fused layers: 1 of 96 entries of one factor off by 3.5e-3; with
        # the fused Function's bf16 accumulation order: 1 of 96 off by 1.5e-2, the rest < 2e-3). The tight parity
        # checks are the float64/float32 runs above; this one checks fp32 adapters train over a bf16 base.
        torch.testing.assert_close(r0[k], want, rtol=0, atol=3e-2, msg=lambda m, k=k: f"{k}: {m}")


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
    sys.exit(0)
