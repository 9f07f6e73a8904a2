"""Runs that go wrong lose nothing: crash-safe adapter directories and checkpoints (killed at every operation,
ENOSPC halfway), named errors for damaged files, NaN steps stopped or skipped, silent no-learning caught, and a
CLI run SIGKILLed at several points and resumed to the uninterrupted run's weights."""

from __future__ import annotations

import copy
import errno
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cpu_trainer, tiny_net
from lightning.pytorch import Callback, LightningModule
from safetensors.torch import load_file
from tiny_models import randomize_adapters, tiny_bert, token_batch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_lightning import AdapterConfig, LoRAModule, inject_adapters, load_adapter, save_adapter
from lora_lightning import atomic
from lora_lightning.callbacks import (
    AdapterCheckpoint,
    GradientFlowCheck,
    GradientFlowError,
    NonFiniteGuard,
    NonFiniteLossError,
    NoSupervisionError,
    SupervisionCheck,
)
from lora_lightning.checkpoint_io import AtomicCheckpointIO
from lora_lightning.state import CONFIG_NAME, WEIGHTS_NAME, adapter_files, gathered_adapter_tensors

REPO = Path(__file__).resolve().parents[1]


def _adapted_bert(seed: int = 0):
    model = tiny_bert()
    inject_adapters(model, AdapterConfig(r=2, target_modules=["query", "value"]), verbose=False)
    randomize_adapters(model, seed=seed)
    return model


def _leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name and p.name.startswith(path.name))


# -- crash-safe adapter directories -----------------------------------------------------------------------
def _versions() -> list[dict[str, bytes]]:
    """Three versions of a two-adapter directory (several adapted submodules are one unit)."""
    out = []
    for seed in range(3):
        files = {}
        for sub in ("encoder", "decoder"):
            model = _adapted_bert(seed)
            for name, data in adapter_files(gathered_adapter_tensors(model), model._lora_lightning_config).items():
                files[f"{sub}/{name}"] = data
        out.append(files)
    return out


def _read_back(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


class _Kill(Exception):
    pass


def _count_operations(monkeypatch, target: Path, old: dict[str, bytes], files: dict[str, bytes]) -> int:
    atomic.write_directory(target, old)
    calls = []
    for name in ("_write_and_fsync", "fsync_directory", "_remove"):
        real = getattr(atomic, name)
        monkeypatch.setattr(atomic, name, lambda *a, _r=real, _n=name: (calls.append(_n), _r(*a))[1])
    real_rename = os.rename
    monkeypatch.setattr(atomic.os, "rename", lambda a, b: (calls.append("rename"), real_rename(a, b))[1])
    atomic.write_directory(target, files)
    monkeypatch.undo()
    return len(calls)


def test_directory_save_killed_at_every_operation_leaves_one_complete_version(tmp_path, monkeypatch):
    """Fork a child that SIGKILLs itself before its k-th file-system operation (file write, fsync, rename,
    removal) while replacing v0 by v1, for every k: a reader then finds exactly v0 or v1 (never a mix, never
    nothing), load_adapter loads it, and the next save (v2) leaves exactly v2 and no temporaries."""
    v0, v1, v2 = _versions()
    n_ops = _count_operations(monkeypatch, tmp_path / "probe" / "last", v0, v1)
    assert n_ops >= 10
    seen = set()
    for k in range(n_ops + 1):
        target = tmp_path / f"k{k}" / "last"
        atomic.write_directory(target, v0)
        pid = os.fork()
        if pid == 0:  # child: no torch work, plain file operations only
            count = [0]

            def tick(*_):
                count[0] += 1
                if count[0] > k:
                    os.kill(os.getpid(), signal.SIGKILL)

            for name in ("_write_and_fsync", "fsync_directory", "_remove"):
                real = getattr(atomic, name)
                setattr(atomic, name, lambda *a, _r=real: (tick(), _r(*a))[1])
            real_rename = os.rename
            atomic.os.rename = lambda a, b: (tick(), real_rename(a, b))[1]
            atomic.write_directory(target, v1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status)
        assert killed == (k < n_ops), k
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = atomic.complete_directory(target)
        content = _read_back(found)
        assert content in (v0, v1), f"a mix after a kill before operation {k}"
        seen.add(0 if content == v0 else 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_adapter(tiny_bert(), found / "encoder")  # the real loader accepts it
        atomic.write_directory(target, v2)
        assert _read_back(target) == v2 and _leftovers(target) == []
    assert seen == {0, 1}


def test_load_adapter_reads_the_complete_version_when_killed_between_renames(tmp_path):
    model = _adapted_bert(1)
    save_adapter(model, tmp_path / "ad")
    new = tmp_path / "ad.new-1"
    (tmp_path / "ad").rename(new)  # what a kill between the two renames leaves: d.new-*, no d
    with pytest.warns(UserWarning, match=r"ad is missing: a save was interrupted.*the complete version ad\.new-1"):
        fresh = load_adapter(tiny_bert(), tmp_path / "ad")
    batch = token_batch()
    assert torch.equal(fresh(**batch).logits, model(**batch).logits)
    save_adapter(model, tmp_path / "ad")  # the next save settles it
    assert _leftovers(tmp_path / "ad") == [] and (tmp_path / "ad" / WEIGHTS_NAME).is_file()


# -- full disk, damaged files ----------------------------------------------------------------------------
def _fail_halfway(monkeypatch, suffix: str):
    real = atomic._write_and_fsync

    def write(file, data):
        if str(file).endswith(suffix) or suffix in Path(file).name:
            with open(file, "wb") as f:
                f.write(bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(file, data)

    monkeypatch.setattr(atomic, "_write_and_fsync", write)


def test_full_disk_during_adapter_save_names_the_file_and_keeps_the_old_adapter(tmp_path, monkeypatch):
    old = _adapted_bert(0)
    save_adapter(old, tmp_path / "ad")
    _fail_halfway(monkeypatch, WEIGHTS_NAME)
    with pytest.raises(OSError, match=r"could not write .*ad\.tmp-\w+/adapter_model\.safetensors \(No space left on "
                       r"device\): [\d.]+ (KiB|B) to write, .* free there; nothing was replaced, .*ad still "
                       r"holds") as err:
        save_adapter(_adapted_bert(1), tmp_path / "ad")
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert _leftovers(tmp_path / "ad") == []  # the half-written temporary is gone
    batch = token_batch()
    assert torch.equal(load_adapter(tiny_bert(), tmp_path / "ad")(**batch).logits, old(**batch).logits)


def test_full_disk_during_checkpoint_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "step": 1}, tmp_path / "last.ckpt")
    _fail_halfway(monkeypatch, ".ckpt")
    with pytest.raises(OSError, match=r"could not write .*last\.ckpt\.tmp-\w+ \(No space left on device\): [\d.]+ KiB "
                       r"to write"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "step": 2}, tmp_path / "last.ckpt")
    monkeypatch.undo()
    assert _leftovers(tmp_path / "last.ckpt") == []
    assert io.load_checkpoint(tmp_path / "last.ckpt")["step"] == 1


def test_truncated_or_foreign_files_are_named(tmp_path):
    save_adapter(_adapted_bert(), tmp_path / "ad")
    weights = tmp_path / "ad" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{weights} is incomplete or not a safetensors file \(\d+ bytes;"):
        load_adapter(tiny_bert(), tmp_path / "ad")
    (tmp_path / "ad" / CONFIG_NAME).write_text('{"format": "lora_lightn')
    config = tmp_path / "ad" / CONFIG_NAME
    with pytest.raises(ValueError, match=rf"{config} is incomplete or not a JSON adapter config"):
        load_adapter(tiny_bert(), tmp_path / "ad")

    io = AtomicCheckpointIO()
    ckpt = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(100)}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{ckpt} is incomplete or not a PyTorch/Lightning checkpoint file"):
        io.load_checkpoint(ckpt)
    ckpt.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=rf"{ckpt} is incomplete or not a PyTorch/Lightning checkpoint file"):
        io.load_checkpoint(ckpt)


# -- never save a broken model ----------------------------------------------------------------------------
def test_nonfinite_adapters_are_refused_unless_allowed(tmp_path):
    good = _adapted_bert()
    save_adapter(good, tmp_path / "ad")
    before = _read_back(tmp_path / "ad")
    bad = _adapted_bert()
    with torch.no_grad():
        bad.bert.encoder.layer[1].attention.self.value.lora_B[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"refusing to save .*ad: 1 of \d+ adapter tensors hold NaN/inf values: "
                       r"bert\.encoder\.layer\.1\.attention\.self\.value\.lora_B \(1 of 64\).*allow_nonfinite=True"):
        save_adapter(bad, tmp_path / "ad")
    assert _read_back(tmp_path / "ad") == before
    with pytest.raises(ValueError, match=r"refusing to save .*peft: 1 of \d+ adapter tensors hold NaN/inf"):
        save_adapter(bad, tmp_path / "peft", format="peft")  # PEFT's layout: the same refusal
    assert not (tmp_path / "peft").exists()
    save_adapter(bad, tmp_path / "ad", allow_nonfinite=True)
    assert load_file(tmp_path / "ad" / WEIGHTS_NAME)["bert.encoder.layer.1.attention.self.value.lora_B"].isnan().any()


def test_save_adapter_verify_reads_back_and_compares_probe_outputs(tmp_path, monkeypatch):
    model = _adapted_bert()
    save_adapter(model, tmp_path / "ok", verify=True)
    import lora_lightning.state as state

    real = state.adapter_files

    def corrupting(tensors, config, *args):  # a writer bug: the file gets other values than the model
        tensors = dict(tensors)
        key = next(k for k in tensors if k.endswith("lora_B"))
        tensors[key] = tensors[key] + 1
        return real(tensors, config, *args)

    monkeypatch.setattr(state, "adapter_files", corrupting)
    with pytest.raises(ValueError, match=r"verify: tensor .*lora_B read back from .*differs"):
        save_adapter(model, tmp_path / "bad", verify=True)


class _Scripted(LightningModule):
    """A plain LightningModule with injected adapters whose logged val metric follows a script."""

    def __init__(self, scores, nan_at_epoch=None) -> None:
        super().__init__()
        self.net = tiny_net()
        inject_adapters(self.net, AdapterConfig(r=2), verbose=False)
        self.scores, self.nan_at_epoch = scores, nan_at_epoch

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def on_train_epoch_end(self):
        if self.current_epoch == self.nan_at_epoch:
            with torch.no_grad():
                self.net.fc1.lora_B.fill_(float("nan"))

    def validation_step(self, batch, batch_idx):
        self.log("score", float(self.scores[self.current_epoch]))

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.01)


def _loader(n=16, bad_batch=None, bs=4):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 16, generator=g), torch.randint(0, 3, (n,), generator=g)
    if bad_batch is not None:
        x[bad_batch * bs] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=bs)


def test_best_is_written_only_for_a_finite_score_and_finite_weights(tmp_path):
    ckpt = AdapterCheckpoint(tmp_path, monitor="score", mode="max")
    module = _Scripted([0.5, float("nan"), 0.7, 0.8], nan_at_epoch=1)
    with pytest.raises(ValueError, match="refusing to save .*best.*NaN/inf"):
        cpu_trainer(max_epochs=4, callbacks=[ckpt]).fit(module, _loader(), _loader(4))
    # epoch 0 (0.5) wrote best; epoch 1 (NaN) did not count; epoch 2 (0.7, NaN weights) was refused
    assert ckpt.best_score == 0.5
    assert torch.isfinite(load_file(tmp_path / "best" / WEIGHTS_NAME)["fc1.lora_B"]).all()


# -- NonFiniteGuard ------------------------------------------------------------------------------------------
def _guarded_module(**kw):
    return LoRAModule(tiny_net(), num_classes=3, task="image_classification", adapter=AdapterConfig(r=2), lr=1e-2,
                      warmup=0, init_seed=0, **kw)


class _StepSnapshot(Callback):
    def __init__(self, batch: int) -> None:
        self.batch, self.before, self.after = batch, None, None

    def _snap(self, trainer, module):
        return ({n: p.detach().clone() for n, p in module.named_parameters()},
                copy.deepcopy(trainer.optimizers[0].state_dict()["state"]))

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.batch:
            self.before = self._snap(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.batch:
            self.after = self._snap(trainer, module)


def test_nan_at_step_k_stops_the_run_naming_step_loss_and_causes(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 2 \(epoch 0, batch 2\) had a non-finite loss or "
                       r"gradient: loss nan, non-finite gradients in model\.fc1\.lora_A.*Likely causes: a learning "
                       r"rate too high \(lr=0\.01.*precision=32-true.*bad data row.*Last good checkpoint: none"):
        cpu_trainer(max_epochs=1).fit(_guarded_module(), _loader(bad_batch=2))


def test_nan_at_step_k_is_skipped_with_weights_and_optimizer_state_bit_equal():
    snap, module = _StepSnapshot(batch=2), _guarded_module(nonfinite="skip")
    trainer = cpu_trainer(max_epochs=1, callbacks=[snap])
    with pytest.warns(UserWarning, match=r"NonFiniteGuard: skipped optimizer step 2 \(loss nan"):
        trainer.fit(module, _loader(bad_batch=2))
    (w0, s0), (w1, s1) = snap.before, snap.after
    assert all(torch.equal(w0[n], w1[n]) for n in w0)
    assert s0.keys() == s1.keys() and all(torch.equal(s0[i][k], s1[i][k]) for i in s0 for k in s0[i])  # incl. step
    guard = next(cb for cb in trainer.callbacks if isinstance(cb, NonFiniteGuard))
    assert guard.skipped_steps == 1 and guard.consecutive_skips == 0
    assert trainer.global_step == 4 and all(torch.isfinite(p).all() for p in module.parameters())


def test_too_many_consecutive_skips_stop_the_run():
    x = torch.full((16, 16), float("nan"))
    loader = DataLoader(TensorDataset(x, torch.zeros(16, dtype=torch.long)), batch_size=4)
    with pytest.raises(NonFiniteLossError, match=r"3 optimizer steps in a row \(max_consecutive_skips=2\)"):
        trainer = cpu_trainer(max_epochs=1, callbacks=[NonFiniteGuard("skip", max_consecutive_skips=2)])
        trainer.fit(_guarded_module(), loader)


def test_gradscaler_skipped_steps_are_not_failures():
    """fp16 with a GradScaler that starts far too high: its first steps overflow to inf gradients, which it skips
    while lowering the scale; the default guard ("stop") lets them be."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    trainer = cpu_trainer(max_steps=4, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    trainer.fit(_guarded_module(), _loader())
    assert trainer.global_step == 4 and scaler.get_scale() < 2.0**100  # the scaler did skip overflowing steps


# -- silent failures -------------------------------------------------------------------------------------------
class _Frozen(LightningModule):
    """fc1's adapter sits behind a detach(): it never gets a gradient (like checkpointed blocks whose input
    does not require grad)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_net()
        inject_adapters(self.net, AdapterConfig(r=2), verbose=False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.relu(self.net.fc1(x)).detach()
        return nn.functional.cross_entropy(self.net.classifier(torch.relu(self.net.fc2(h))), y)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.01)


def test_tensors_without_gradient_are_named_after_step_one():
    with pytest.raises(GradientFlowError, match=r"after optimizer step 1, 2 trainable tensor\(s\) received no gradient "
                       r"at all .*: net\.fc1\.lora_A; net\.fc1\.lora_B.*enable_input_require_grads"):
        cpu_trainer(max_steps=3, callbacks=[GradientFlowCheck()]).fit(_Frozen(), _loader())


class _Gated(LightningModule):
    """fc2's output passes a trainable gate initialised to 0 (timm's ResNets: ``zero_init_last`` BatchNorm weights;
    ReZero): fc2's adapter gets only zero gradients at step 1, non-zero ones once the gate has moved. With
    ``frozen_gate`` the gate never moves and fc2's adapter never learns."""

    def __init__(self, frozen_gate: bool = False) -> None:
        super().__init__()
        self.net = tiny_net()
        inject_adapters(self.net, AdapterConfig(r=2), verbose=False)
        self.gate = nn.Parameter(torch.zeros(()), requires_grad=not frozen_gate)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = torch.relu(self.net.fc1(x))
        h = h + self.gate * torch.relu(self.net.fc2(h))
        return nn.functional.cross_entropy(self.net.classifier(h), y)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.01)


def test_a_layer_behind_a_zero_initialised_gate_passes_once_the_gate_opens():
    cpu_trainer(max_steps=3, callbacks=[GradientFlowCheck()]).fit(_Gated(), _loader())  # no error


def test_a_layer_that_only_ever_gets_zero_gradients_is_named_at_within_steps():
    with pytest.raises(GradientFlowError, match=r"after optimizer step 2, 1 trainable tensor\(s\) had only zero "
                       r"gradients in all of the first 2 optimizer steps: net\.fc2\.lora_A, net\.fc2\.lora_B\."):
        cpu_trainer(max_steps=3, callbacks=[GradientFlowCheck()]).fit(_Gated(frozen_gate=True), _loader())


def test_lora_a_zero_at_step_one_is_expected_and_passes():
    """B = 0 at init: A's gradient is exactly 0 at step 1 and non-zero at step 2; the check accepts it."""
    grads = {}

    class Record(Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            grads[trainer.global_step] = module.model.fc1.lora_A.grad.abs().max().item()

    module = _guarded_module()
    cpu_trainer(max_steps=3, callbacks=[Record()]).fit(module, _loader())
    assert grads[0] == 0.0 and grads[1] > 0


class _TokenTask(LightningModule):
    """Token labels (B×T) with -100 for ignored positions, as a causal-LM batch has."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_net()
        inject_adapters(self.net, AdapterConfig(r=2), verbose=False)
        self.logged = []

    def training_step(self, batch, batch_idx):
        logits = self.net(batch["x"])  # (B, T, 3)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        return torch.nan_to_num(loss)  # an all-ignored batch: 0/0; keep the guard out of this test

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.01)


def _token_loader(empty_batches, n_batches=4, bs=2, t=5):
    g = torch.Generator().manual_seed(0)
    rows = []
    for b in range(n_batches):
        for _ in range(bs):
            labels = torch.randint(0, 3, (t,), generator=g)
            labels[:2] = -100  # the prompt
            if b in empty_batches:
                labels[:] = -100
            mask = torch.ones(t, dtype=torch.long)
            rows.append({"x": torch.randn(t, 16, generator=g), "labels": labels, "attention_mask": mask})
    return DataLoader(rows, batch_size=bs)


def test_all_ignored_batches_are_counted_and_warned_and_an_empty_epoch_is_an_error():
    check = SupervisionCheck()
    fractions = []

    class Frac(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            fractions.append(float(trainer.callback_metrics["supervised_fraction"]))

    with pytest.warns(UserWarning, match=r"2 training batch\(es\) had every label == -100 .*batch indices 1, 3"):
        cpu_trainer(max_epochs=1, callbacks=[check, Frac()]).fit(_TokenTask(), _token_loader({1, 3}))
    assert check.empty_batches == 2
    assert fractions == pytest.approx([0.6, 0.0, 0.6, 0.0])  # 3 of 5 tokens per row are supervised
    with pytest.raises(NoSupervisionError, match=r"none of the 4 training batches of epoch 0 had a label other than "
                       r"-100"):
        cpu_trainer(max_epochs=1, callbacks=[SupervisionCheck()]).fit(_TokenTask(), _token_loader({0, 1, 2, 3}))


# -- SIGKILL at several points, resume, same weights ----------------------------------------------------------
def _run_config(root: Path, tiny_bert_dir: str, sst_files: dict) -> str:
    """SDS (warm-up, rebalance, refreshes), ALLoRA rescaling, dropout removal and the monitor on, gradient
    accumulation 2, a shuffled training set, step checkpoints every optimizer step, adapters best/last."""
    root.mkdir(parents=True)
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_epochs": 3, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(root), "accumulate_grad_batches": 2,
            "log_every_n_steps": 1,
            "callbacks": [
                {"class_path": "lora_lightning.callbacks.AdapterCheckpoint",
                 "init_args": {"dirpath": str(root / "adapters"), "monitor": "val_acc"}},
                {"class_path": "lora_lightning.callbacks.SDSReorthonormalization",
                 "init_args": {"warmup_steps": 2, "refresh_every": 2}},
                {"class_path": "lora_lightning.callbacks.ALLoRARescaling"},
                {"class_path": "lora_lightning.callbacks.DropoutRemoval"},
                {"class_path": "lora_lightning.callbacks.AdapterMonitor", "init_args": {"every_n_steps": 1}},
                {"class_path": "lora_lightning.callbacks.StepCheckpoint",
                 "init_args": {"dirpath": str(root / "checkpoints"), "every_n_train_steps": 1, "save_last": True,
                               "save_top_k": 0}},
            ],
        },
        "model": {"backbone": tiny_bert_dir, "num_classes": 2, "lr": 0.02, "init_seed": 0,
                  "adapter": {"method": "sds", "r": 2, "dropout": 0.1}},
        "data": {"class_path": "lora_lightning.data.TextClassificationDataModule",
                 "init_args": {"train_file": sst_files["train"], "val_file": sst_files["dev"], "batch_size": 2}},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return str(root / "run.yaml")


def _launch(config: str, kill: str | None, resume: bool) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "tests" / "fault_child.py"), "fit", "--config", config]
    cmd += ["--ckpt_path", "last"] if resume else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "LL_KILL_AT": kill or "",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(cmd, cwd=Path(config).parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _wait(proc: subprocess.Popen) -> str:
    try:
        return proc.communicate(timeout=400)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _everything_on_disk_loads(root: Path, tiny_bert_dir: str) -> None:
    from transformers import AutoModelForSequenceClassification

    for name in ("best", "last"):
        if (root / "adapters" / name).exists() or atomic._siblings(root / "adapters" / name, atomic.NEW):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
                load_adapter(base, root / "adapters" / name)
    for ckpt in (root / "checkpoints").glob("*.ckpt"):
        AtomicCheckpointIO().load_checkpoint(ckpt, weights_only=True)


@pytest.mark.multiprocess
def test_killed_runs_resume_to_the_uninterrupted_weights(tmp_path, tiny_bert_dir, sst_files):
    """One run (3 epochs of 3 optimizer steps) is SIGKILLed (1) right after optimizer step 2 (last.ckpt: step 1,
    mid-epoch), (2) halfway through writing the step-3 checkpoint (last.ckpt: step 2), (3) inside the epoch-2
    adapter save, between its renames (last.ckpt: step 6, before that validation), each time resumed with
    `fit --ckpt_path last`; after every kill
    every adapter folder and checkpoint on disk loads, and the final adapters equal the uninterrupted run's."""
    reference = _launch(_run_config(tmp_path / "ref", tiny_bert_dir, sst_files), None, resume=False)
    config = _run_config(tmp_path / "run", tiny_bert_dir, sst_files)
    root = tmp_path / "run"
    try:
        for i, kill in enumerate(["step:2", "ckpt_save:2", "adapter_save:1", None]):
            out = _wait(_launch(config, kill, resume=i > 0))
            if kill:
                assert "Trainer.fit` stopped" not in out, f"{kill} never triggered:\n{out[-3000:]}"
                _everything_on_disk_loads(root, tiny_bert_dir)
            else:
                assert "final validation (step 9)" in out, out[-3000:]
        if kill is None:
            assert "Restored all states from the checkpoint" in out
    finally:
        out_ref = _wait(reference)
    assert "final validation (step 9)" in out_ref, out_ref[-3000:]
    for name in ("last", "best"):
        want = load_file(tmp_path / "ref" / "adapters" / name / WEIGHTS_NAME)
        got = load_file(root / "adapters" / name / WEIGHTS_NAME)
        assert want.keys() == got.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{name}/{k}: {m}")
        assert json.loads((root / "adapters" / name / CONFIG_NAME).read_text())["adapter"]["method"] == "sds"
    assert _leftovers(root / "adapters" / "last") == [] and not list((root / "checkpoints").glob("*.tmp-*"))
