"""Multi-device training on CPU processes (gloo): DDP and FSDP2 (ModelParallelStrategy) against one process.

Two launches of this file as a script (``python tests/test_distributed.py ddp|fsdp OUT``), each a
2-process Lightning run that trains every registered method (ADAPTER_METHODS) for STEPS steps with a
per-device batch of BATCH // 2 and writes what every rank holds to OUT; the tests compare it with
1-process runs (batch BATCH) computed here, in the pytest process, while the workers run.

Tolerance: the runs are float64 (DoRA float32: its weight_norm refuses float64), so the only differences
are reduction orders (all-reduce / reduce-scatter of two half-batch gradients vs one batch gradient).
Measured after 6 steps, max |2 ranks − 1 process|: LoRA 7e-17, ALLoRA 1e-16, SDS 7e-14 (QR/SVD), DoRA
(float32) 6e-8; checked at TOL = 1e-10 (float64) and 1e-5 (float32), far below the 0.05+ the weights
move. Strategy settings come from configs/ddp.yaml and configs/fsdp.yaml, so the ready configs are tested.
Each launch takes ~15-20 s (two processes importing torch + Lightning); every process of a launch is in
its own process group and is killed when the launch ends, whatever happened.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(REPO), str(TESTS)]

from conftest import tiny_net  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from lora_lightning import (  # noqa: E402
    ADAPTER_METHODS,
    AdapterConfig,
    LoRAModule,
    adapter_layers,
    adapter_state_dict,
    export_merged,
    load_adapter,
    merge_adapters,
)
from lora_lightning.callbacks import AdapterCheckpoint, ALLoRARescaling, SDSReorthonormalization  # noqa: E402
from lora_lightning.distributed import merge_sharded  # noqa: E402
from lora_lightning.state import full_tensor, save_adapter  # noqa: E402

METHODS = tuple(sorted(ADAPTER_METHODS))  # every registered method: none escapes the parity checks
N, BATCH, STEPS = 24, 8, 6  # 2 epochs of 3 global batches of 8 (resume at the epoch boundary, step 3)
TOL = 1e-10
WORLD = 2
TIMEOUT = 240


# -- the run, shared by the workers and the 1-process reference ------------------------------------------
def dtype(method: str) -> torch.dtype:
    return torch.float32 if method == "dora" else torch.float64  # DoRA's weight_norm refuses float64


class RankSlice(torch.utils.data.Sampler):
    """Samples rank, rank + world, ...: Lightning's own distributed sampler shuffles training data, this one
    keeps the order, so the 2 ranks' batches of BATCH // 2 together are the 1-process batch of BATCH."""

    def __init__(self, n: int) -> None:
        self.n = n

    def _rank_world(self) -> tuple[int, int]:
        dist = torch.distributed
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

    def __iter__(self):
        rank, world = self._rank_world()
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        return self.n // self._rank_world()[1]


def loader(batch_size: int, method: str) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 16, generator=g, dtype=torch.float64).to(dtype(method))
    y = torch.randint(0, 3, (N,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, sampler=RankSlice(N))


def module(method: str) -> LoRAModule:
    # r=3 over 2 ranks: uneven Shard(0) (2 + 1 rows) of A; the 3×32 head is uneven too
    adapter = AdapterConfig(method=method, r=3, alpha=6, dropout=0.0)  # no randomness: runs must agree
    net = tiny_net(seed=0).to(dtype(method))
    return LoRAModule(net, num_classes=3, task="image_classification", adapter=adapter, lr=0.02, init_seed=0)


def trainer(strategy, devices: int, steps: int = STEPS, callbacks=(), checkpointing: bool = False) -> Trainer:
    return Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, callbacks=list(callbacks),
        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=checkpointing,
        num_sanity_val_steps=0, use_distributed_sampler=False,
    )


def method_callbacks(method: str) -> list:
    return [SDSReorthonormalization(warmup_steps=2, refresh_every=2)] if method == "sds" else []


def full_state(model) -> dict[str, torch.Tensor]:
    """Whole adapter tensors (gathered on every rank under FSDP2)."""
    return {k: full_tensor(v).detach().clone() for k, v in adapter_state_dict(model).items()}


def sharded_bert():
    """A tiny BERT with trained-looking DoRA adapters (the same on every rank: seeded), to be sharded."""
    from tiny_models import randomize_adapters, tiny_bert

    from lora_lightning import inject_adapters

    model = tiny_bert()
    inject_adapters(model, AdapterConfig(method="dora", r=2, target_modules=["query", "value", "dense"]), verbose=False)
    randomize_adapters(model, seed=0)
    return model


# -- the worker ---------------------------------------------------------------------------------------------
def strategy_from(config: str):
    """(a function making a fresh strategy, devices) from the trainer section of configs/<config>."""
    section = yaml.safe_load((REPO / "configs" / config).read_text())["trainer"]
    spec = section["strategy"]
    if isinstance(spec, str):
        return (lambda: spec), section["devices"]
    mod, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(mod), name)
    return (lambda: cls(**spec.get("init_args", {}))), section["devices"]


def count_writes(module=None) -> list[int]:
    """A counter of what this rank writes: adapter directories (``write_directory`` where save_adapter, both
    formats, and AdapterCheckpoint call it) or, given ``module``, the files its ``save_file`` writes (interop:
    merged exports)."""
    import lora_lightning.callbacks.adapter_checkpoint as adapter_checkpoint
    import lora_lightning.state as state

    count = [0]

    def wrap(real):
        def counting(*args, **kwargs):
            count[0] += 1
            return real(*args, **kwargs)

        return counting

    if module is None:
        state.write_directory = adapter_checkpoint.write_directory = wrap(state.write_directory)
    else:
        module.save_file = wrap(module.save_file)
    return count


def worker(kind: str, out: Path) -> None:
    """One rank of the 2-process run: train every method, save adapters (every rank calls, rank 0 writes),
    merge, reload, resume, and write what this rank holds to ``out/<kind>_rank<r>.pt``."""
    torch.set_num_threads(1)
    strategy, devices = strategy_from(f"{kind}.yaml")
    writes = count_writes()
    import lora_lightning.interop as interop

    export_writes = count_writes(interop)  # merged models
    results: dict = {}
    for method in METHODS:
        callbacks = method_callbacks(method)
        if method == "lora":
            callbacks.append(AdapterCheckpoint(dirpath=out / f"{kind}_adapter_ckpt"))
        if method == "sds":  # a resumable checkpoint at the end of epoch 1 (step 3)
            callbacks.append(ModelCheckpoint(out / f"{kind}_ckpt", "{step}", every_n_train_steps=3, save_top_k=-1))
        mod = module(method)
        t = trainer(strategy(), devices, callbacks=callbacks, checkpointing=method == "sds")
        t.fit(mod, train_dataloaders=loader(BATCH // WORLD, method))
        layers = adapter_layers(mod.model)
        entry = {
            "state": full_state(mod.model),
            "types": sorted({type(v).__name__ for v in adapter_state_dict(mod.model).values()}),
        }
        if method == "sds":
            entry["bases"] = {n: (layer.Q_A.clone(), layer.Q_B.clone(), layer.active) for n, layer in layers.items()}
        if method == "allora":  # this rank's rows only under FSDP2
            entry["coef"] = {n: ALLoRARescaling().coefficients(layer) for n, layer in layers.items()}
        save_adapter(mod.model, out / f"{kind}_{method}")
        save_adapter(mod.model, out / f"{kind}_{method}_peft", format="peft")  # gathered, rank 0 writes
        export_merged(mod.model, out / f"{kind}_{method}_merged")
        if kind == "fsdp":
            with torch.no_grad():
                for v in adapter_state_dict(mod.model).values():
                    v.zero_()
            entry["zeroed"] = max(t.double().abs().max().item() for t in full_state(mod.model).values())
            load_adapter(mod.model, out / f"{kind}_{method}")  # into the DTensors, shard by shard
            entry["reloaded"] = full_state(mod.model)
            try:
                merge_adapters(mod.model)
            except RuntimeError as err:
                entry["plain_merge_error"] = str(err)
            merge_sharded(mod.model)
            entry["merged"] = {n: full_tensor(layer.base.weight.detach()).clone() for n, layer in layers.items()}
            merge_sharded(mod.model, unmerge=True)
            entry["unmerged"] = {n: full_tensor(layer.base.weight.detach()).clone() for n, layer in layers.items()}
        results[method] = entry

    # resume the SDS run from its step-3 checkpoint: it must end where the uninterrupted run ended
    t = trainer(strategy(), devices, callbacks=method_callbacks("sds"))
    mod = module("sds")
    t.fit(mod, train_dataloaders=loader(BATCH // WORLD, "sds"), ckpt_path=out / f"{kind}_ckpt" / "step=3.ckpt")
    results["resumed"] = {"state": full_state(mod.model), "global_step": t.global_step}
    if kind == "fsdp":  # a transformers model sharded by hand: merged export through save_pretrained on rank 0
        from torch.distributed.device_mesh import init_device_mesh

        from lora_lightning.distributed import shard_adapters

        export_merged(shard_adapters(sharded_bert(), init_device_mesh("cpu", (WORLD,))), out / "fsdp_bert_merged")
    results["writes"] = writes[0]
    results["export_writes"] = export_writes[0]
    torch.save(results, out / f"{kind}_rank{t.global_rank}.pt")
    torch.distributed.barrier()  # rank 0 exits only once every rank has written its results


# -- launching (pytest side) ----------------------------------------------------------------------------------
_DIST_ENV = {"LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(kind: str, out: Path) -> subprocess.Popen:
    """Rank 0 as a child in its own process group; Lightning starts rank 1 from it (same group)."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV and not k.startswith("SLURM_")}
    env.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")]),
    )
    cmd = [sys.executable, str(Path(__file__).resolve()), kind, str(out)]
    return subprocess.Popen(
        cmd, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        log, _ = proc.communicate(timeout=TIMEOUT)
        return proc.returncode, log
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {TIMEOUT} s"
    finally:
        try:  # every rank, whatever happened: no process outlives the test
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """1 process, batch BATCH: final adapter tensors, SDS bases, ALLoRA coefficients, saved file, merged W0."""
    out = tmp_path_factory.mktemp("reference")
    refs = {}
    for method in METHODS:
        start = module(method)
        start.configure_model()
        mod = module(method)
        trainer("auto", 1, callbacks=method_callbacks(method)).fit(mod, train_dataloaders=loader(BATCH, method))
        layers = adapter_layers(mod.model)
        refs[method] = {
            "init": full_state(start.model),
            "state": full_state(mod.model),
            "bases": {n: (layer.Q_A.clone(), layer.Q_B.clone()) for n, layer in layers.items() if method == "sds"},
            "coef": {n: ALLoRARescaling().coefficients(layer) for n, layer in layers.items()},
            "file": save_adapter(mod.model, out / method),
            "peft": save_adapter(mod.model, out / f"{method}_peft", format="peft"),
            "base": {n: layer.base.weight.detach().clone() for n, layer in layers.items()},
        }
        merge_adapters(mod.model)
        refs[method]["merged"] = {n: layer.base.weight.detach().clone() for n, layer in layers.items()}
    return refs


def _run(kind: str, request, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp(kind)
    proc = _launch(kind, out)
    try:
        request.getfixturevalue("reference")  # computed here while the 2 ranks train
    finally:
        code, log = _finish(proc)
    assert code == 0, f"{kind} worker failed (exit {code}):\n{log[-6000:]}"
    ranks = [torch.load(out / f"{kind}_rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"out": out, "ranks": ranks}


@pytest.fixture(scope="module")
def ddp(request, tmp_path_factory) -> dict:
    return _run("ddp", request, tmp_path_factory)


@pytest.fixture(scope="module")
def fsdp(request, tmp_path_factory) -> dict:
    return _run("fsdp", request, tmp_path_factory)


def tol(method: str) -> float:
    return 1e-5 if dtype(method) == torch.float32 else TOL


def assert_states_close(got: dict, want: dict, atol: float) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


# -- DDP -----------------------------------------------------------------------------------------------------
@pytest.mark.multiprocess
@pytest.mark.parametrize("method", METHODS)
def test_ddp_two_ranks_match_one_process_with_twice_the_batch(ddp, reference, method):
    # configs/ddp.yaml: plain "ddp", i.e. find_unused_parameters off: a parameter without a gradient would
    # have stopped the run at its 2nd step
    assert strategy_from("ddp.yaml")[0]() == "ddp"
    ref = reference[method]
    moved = max((ref["state"][k].double() - ref["init"][k].double()).abs().max().item() for k in ref["init"])
    assert moved > 0.05  # the runs really train
    r0, r1 = (r[method]["state"] for r in ddp["ranks"])
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # DDP replicas stay bitwise identical
    assert_states_close(r0, ref["state"], tol(method))


@pytest.mark.multiprocess
def test_ddp_sds_bases_and_allora_coefficients_identical_on_every_rank(ddp, reference):
    r0, r1 = ddp["ranks"]
    for name, (q_a, q_b, active) in r0["sds"]["bases"].items():
        q_a1, q_b1, active1 = r1["sds"]["bases"][name]
        assert active and active1
        assert torch.equal(q_a, q_a1) and torch.equal(q_b, q_b1)
        eye = torch.eye(q_a.shape[1], dtype=q_a.dtype)
        torch.testing.assert_close(q_a.T @ q_a, eye, rtol=0, atol=1e-12)  # real orthonormal bases
        torch.testing.assert_close(q_b.T @ q_b, eye, rtol=0, atol=1e-12)
    for name, (c_a, c_b) in r0["allora"]["coef"].items():
        assert torch.equal(c_a, r1["allora"]["coef"][name][0]) and torch.equal(c_b, r1["allora"]["coef"][name][1])
        want = reference["allora"]["coef"][name]
        torch.testing.assert_close(c_a, want[0], rtol=0, atol=TOL)
        torch.testing.assert_close(c_b, want[1], rtol=0, atol=TOL)


# -- FSDP2 ---------------------------------------------------------------------------------------------------
@pytest.mark.multiprocess
@pytest.mark.parametrize("method", METHODS)
def test_fsdp2_two_ranks_match_one_process(fsdp, reference, method):
    r0, r1 = fsdp["ranks"]
    assert "DTensor" in r0[method]["types"]  # the adapter tensors really were sharded
    assert all(torch.equal(r0[method]["state"][k], r1[method]["state"][k]) for k in r0[method]["state"])
    assert_states_close(r0[method]["state"], reference[method]["state"], tol(method))


@pytest.mark.multiprocess
def test_fsdp2_sds_refresh_and_allora_rescaling_on_sharded_parameters(fsdp, reference):
    r0, r1 = fsdp["ranks"]
    for name, (q_a, q_b, active) in r0["sds"]["bases"].items():  # replicated buffers from gathered factors
        q_a1, q_b1, active1 = r1["sds"]["bases"][name]
        assert active and active1 and torch.equal(q_a, q_a1) and torch.equal(q_b, q_b1)
        want_a, want_b = reference["sds"]["bases"][name]
        torch.testing.assert_close(q_a, want_a, rtol=0, atol=TOL)
        torch.testing.assert_close(q_b, want_b, rtol=0, atol=TOL)
    for name, want in reference["allora"]["coef"].items():
        (a0, b0), (a1, b1) = r0["allora"]["coef"][name], r1["allora"]["coef"][name]
        assert (a0.shape[0], a1.shape[0]) == (2, 1)  # r = 3 rows of A split 2 + 1: whole rows per rank
        torch.testing.assert_close(torch.cat([a0, a1]), want[0], rtol=0, atol=TOL)
        torch.testing.assert_close(torch.cat([b0, b1]), want[1], rtol=0, atol=TOL)


@pytest.mark.multiprocess
@pytest.mark.parametrize("method", METHODS)
def test_fsdp2_load_adapter_and_merge_sharded(fsdp, reference, method):
    for rank in fsdp["ranks"]:
        entry, ref = rank[method], reference[method]
        assert entry["zeroed"] == 0  # the sharded parameters really were cleared before loading
        assert "merge_sharded(model)" in entry["plain_merge_error"]  # plain merge refuses, naming the fix
        assert all(torch.equal(entry["reloaded"][k], entry["state"][k]) for k in entry["state"])  # shard by shard
        for name, merged in entry["merged"].items():  # gathered, merged, shards written back
            torch.testing.assert_close(merged, ref["merged"][name], rtol=0, atol=tol(method))
            torch.testing.assert_close(entry["unmerged"][name], ref["base"][name], rtol=0, atol=tol(method))
        assert any((m - ref["base"][n]).abs().max() > 1e-3 for n, m in entry["merged"].items())


# -- both: adapter files and resume --------------------------------------------------------------------------
@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_adapter_files_written_once_complete_and_equal_to_one_process(kind, reference, request):
    run = request.getfixturevalue(kind)
    r0, r1 = run["ranks"]
    # per method one save_adapter in each format, + AdapterCheckpoint's last/: rank 0 only
    assert (r0["writes"], r1["writes"]) == (2 * len(METHODS) + 1, 0)
    for method in METHODS:
        got_dir, ref_dir = run["out"] / f"{kind}_{method}", reference[method]["file"]
        got, want = load_file(got_dir / "adapter_model.safetensors"), load_file(ref_dir / "adapter_model.safetensors")
        assert_states_close(got, want, tol(method))  # every shard there: full shapes, all values
        assert json.loads((got_dir / "adapter_config.json").read_text()) == json.loads(
            (ref_dir / "adapter_config.json").read_text()
        )
    last = load_file(run["out"] / f"{kind}_adapter_ckpt" / "last" / "adapter_model.safetensors")
    assert_states_close(last, r0["lora"]["state"], 0.0)


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_peft_and_merged_exports_written_once_and_equal_to_one_process(kind, reference, request):
    run = request.getfixturevalue(kind)
    r0, r1 = run["ranks"]
    assert (r0["export_writes"], r1["export_writes"]) == (len(METHODS), 0)  # merged: rank 0 only, once each
    for method in METHODS:
        ref, out = reference[method], run["out"] / f"{kind}_{method}"
        got = load_file(out.with_name(out.name + "_peft") / "adapter_model.safetensors")
        assert_states_close(got, load_file(ref["peft"] / "adapter_model.safetensors"), tol(method))
        assert json.loads((out.with_name(out.name + "_peft") / "adapter_config.json").read_text()) == json.loads(
            (ref["peft"] / "adapter_config.json").read_text()
        )
        merged = load_file(out.with_name(out.name + "_merged") / "model.safetensors")
        assert set(merged) == set(tiny_net().state_dict())  # the bare model's names, whole tensors
        for name, weight in ref["merged"].items():
            torch.testing.assert_close(merged[f"{name}.weight"].to(weight.dtype), weight, rtol=0, atol=tol(method))
        torch.testing.assert_close(merged["classifier.weight"], ref["state"]["classifier.weight"], rtol=0,
                                   atol=tol(method))  # fmt: skip


@pytest.mark.multiprocess
def test_export_merged_of_a_sharded_transformers_model_reloads_with_the_same_logits(fsdp):
    from tiny_models import token_batch
    from transformers import AutoModelForSequenceClassification

    batch = token_batch()
    with torch.no_grad():
        want = sharded_bert()(**batch).logits  # the same model, unsharded, in this process
        got = AutoModelForSequenceClassification.from_pretrained(fsdp["out"] / "fsdp_bert_merged")(**batch).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (fsdp["ranks"][0]["export_writes"], fsdp["ranks"][1]["export_writes"]) == (len(METHODS), 0)


@pytest.mark.multiprocess
def test_export_reads_the_sharded_checkpoint_directory(ddp, fsdp, reference):
    from lora_lightning.export import load_checkpoint

    loaded = {}
    for kind, run in (("ddp", ddp), ("fsdp", fsdp)):  # the same training: a .ckpt file and a DCP directory
        mod = module("sds")
        mod.configure_model()
        load_checkpoint(mod, run["out"] / f"{kind}_ckpt" / "step=3.ckpt")
        loaded[kind] = full_state(mod.model)
    assert_states_close(loaded["fsdp"], loaded["ddp"], TOL)
    init = reference["sds"]["init"]
    assert max((loaded["fsdp"][k].double() - init[k].double()).abs().max().item() for k in init) > 0.05


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_resume_continues_the_same_run(kind, request):
    run = request.getfixturevalue(kind)
    r0 = run["ranks"][0]
    assert r0["resumed"]["global_step"] == STEPS
    assert_states_close(r0["resumed"]["state"], r0["sds"]["state"], TOL)  # SDS: buffers, moments, schedule
    ckpt = run["out"] / f"{kind}_ckpt" / "step=3.ckpt"
    adapter_keys = {f"model.{k}" for k in r0["sds"]["state"]}
    if kind == "ddp":
        assert set(torch.load(ckpt, weights_only=True)["state_dict"]) == adapter_keys
    else:  # distributed checkpoint: one shard file per rank, adapter tensors only
        from torch.distributed.checkpoint import FileSystemReader

        assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        keys = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
        assert {k[len("state_dict.") :] for k in keys if k.startswith("state_dict.")} == adapter_keys


# -- FSDP1 units and refusals (single process: FSDP1 itself needs GPUs) --------------------------------------
def _own_params(unit, units) -> list:
    """The parameters FSDP would flatten into ``unit``'s own FlatParameter: not in a nested unit."""
    nested = {id(p) for u in units if u is not unit and any(u is m for m in unit.modules()) for p in u.parameters()}
    return [p for p in unit.parameters() if id(p) not in nested]


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_fsdp_units_never_put_frozen_and_trainable_tensors_together(method):
    from tiny_models import tiny_bert

    from lora_lightning import inject_adapters
    from lora_lightning.adapters import DoRALayer
    from lora_lightning.distributed import adapter_fsdp_policy, fsdp_units

    model = tiny_bert()
    inject_adapters(model, AdapterConfig(method=method, r=2), verbose=False)
    units = fsdp_units(model)
    names = {id(m): n for n, m in model.named_modules()}
    assert sum(type(u).__name__ == "BertLayer" for u in units) == 2  # blocks from _no_split_modules
    assert any(names[id(u)] == "classifier" for u in units)  # modules_to_save
    mixed = []
    for unit in [*units, model]:
        flags = {p.requires_grad for p in _own_params(unit, units)}
        if len(flags) > 1:
            mixed.append(unit)
    layers = adapter_layers(model)
    if method == "lora":
        assert mixed == []  # no unit mixes: use_orig_params=False would work, no frozen gradient buffers
        assert sum(1 for u in units if any(u is layer.base for layer in layers.values())) == len(layers)
    else:  # DoRA reads W0 in its own forward: W0 stays in the layer's unit (documented), nothing else mixes
        assert mixed and all(isinstance(u, DoRALayer) for u in mixed)
    assert any(names[id(u)] == "bert.embeddings" for u in units)  # also in BERT's _no_split_modules
    assert {p.requires_grad for p in _own_params(model, units)} <= {False}  # the root: frozen leftovers only
    trainable_units = {id(u) for u in units if any(p.requires_grad for p in _own_params(u, units))}
    for p in (p for p in model.parameters() if p.requires_grad):
        assert any(id(u) in trainable_units and any(p is q for q in _own_params(u, units)) for u in units)
    policy = adapter_fsdp_policy(model)  # FSDP1 auto-wrap policy: wraps exactly these units
    wrapped = [m for m in model.modules() if policy(module=m, recurse=False, nonwrapped_numel=0)]
    assert {id(m) for m in wrapped} == {id(u) for u in units}


def test_fsdp1_strategy_on_cpu_names_fsdp2():
    from lora_lightning.distributed import AdapterFSDPStrategy

    t = trainer(AdapterFSDPStrategy(), 1)
    with pytest.raises(ValueError, match="ModelParallelStrategy"):
        t.fit(module("lora"), train_dataloaders=loader(BATCH, "lora"))


@pytest.mark.parametrize("fragment", ["ddp", "fsdp", "fsdp1"])
def test_distributed_configs_stack_on_a_run_config(fragment, tmp_path, capsys):
    from lora_lightning.cli import main

    path = REPO / "configs" / f"{fragment}.yaml"
    if fragment == "fsdp1":  # the FSDP1 block documented (commented out) in configs/fsdp.yaml
        lines = (REPO / "configs" / "fsdp.yaml").read_text().splitlines()
        start = lines.index("#  strategy:")
        block = [line[1:] for line in lines[start:] if line.startswith("#  ")]
        path = tmp_path / "fsdp1.yaml"
        path.write_text("trainer:\n" + "\n".join(block) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    trainer_cfg = yaml.safe_load(capsys.readouterr().out)["trainer"]
    strategy = trainer_cfg["strategy"]
    if fragment != "fsdp1":  # the FSDP1 block only swaps the strategy
        assert trainer_cfg["devices"] == 2
    if fragment == "ddp":
        assert strategy == "ddp"
    elif fragment == "fsdp":
        assert strategy["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
        assert (strategy["init_args"]["data_parallel_size"], strategy["init_args"]["tensor_parallel_size"]) == (2, 1)
    else:
        assert strategy["class_path"] == "lora_lightning.distributed.AdapterFSDPStrategy"
        assert strategy["init_args"]["block_classes"] == "auto"


@pytest.mark.parametrize("what", ["save_adapter", "sds", "allora"])
def test_fsdp1_flat_shards_are_refused_with_the_fix(what, tmp_path):
    mod = module("lora" if what == "save_adapter" else what)
    mod.configure_model()
    next(iter(adapter_layers(mod.model).values())).lora_A._fsdp_flattened = True  # as FSDP1 marks its shards
    with pytest.raises(RuntimeError, match="FSDP2"):
        if what == "save_adapter":
            save_adapter(mod.model, tmp_path)
        else:
            t = trainer("auto", 1, steps=1, callbacks=method_callbacks(what))
            t.fit(mod, train_dataloaders=loader(BATCH, what))


def test_tensor_parallel_mesh_is_refused_with_the_fix():
    from lora_lightning.distributed import data_parallel_mesh

    class Mesh2D:  # Lightning's default on one node: data_parallel=1, tensor_parallel=<devices>
        ndim, mesh_dim_names, shape = 2, ("data_parallel", "tensor_parallel"), (1, 2)

        def size(self):
            return 2

        def __getitem__(self, name):
            return type("Mesh1D", (), {"size": lambda self: 1})()

    with pytest.raises(ValueError, match="data_parallel_size=<number of devices>, tensor_parallel_size=1"):
        data_parallel_mesh(Mesh2D())



if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
    sys.exit(0)
