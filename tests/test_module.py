"""LoRAModule: what trains, what is checkpointed, resume, optimiser groups and schedule, method callbacks;
AdapterCheckpoint on a plain user LightningModule."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import cpu_trainer, tensor_loader, tiny_net
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lora_lightning import (
    AdapterConfig,
    LoRAModule,
    adapter_layers,
    adapter_state_dict,
    inject_adapters,
    load_adapter,
)
from lora_lightning.callbacks import (
    AdapterCheckpoint,
    ALLoRARescaling,
    DropoutRemoval,
    GradientFlowCheck,
    NonFiniteGuard,
    SupervisionCheck,
)


def token_loader(n: int = 8, batch_size: int = 4, vocab: int = 30):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (n, 7), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    mask = torch.ones(7, dtype=torch.long)
    rows = [{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(n)]
    return torch.utils.data.DataLoader(rows, batch_size=batch_size)


class GradRecorder(Callback):
    def __init__(self) -> None:
        self.with_grad: set[str] = set()

    def on_after_backward(self, trainer, pl_module) -> None:
        self.with_grad |= {n for n, p in pl_module.named_parameters() if p.grad is not None}


def test_only_adapter_and_head_parameters_train(tiny_bert_dir):
    module = LoRAModule(tiny_bert_dir, num_classes=2, adapter=AdapterConfig(r=4), lr=1e-2, init_seed=0)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    recorder = GradRecorder()
    cpu_trainer(max_steps=2, callbacks=[recorder]).fit(module, train_dataloaders=token_loader())

    expected = {n for n, p in module.named_parameters() if "lora_" in n or n.startswith("model.classifier.")}
    assert expected and recorder.with_grad == expected
    assert {n for n, p in module.named_parameters() if p.requires_grad} == expected
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert changed == expected  # after 2 steps B and then A have moved; nothing frozen has
    assert module.model.training  # transformers loads in eval mode; dropout must be live while training


def test_checkpoint_holds_only_adapter_tensors(tiny_bert_dir, tmp_path):
    module = LoRAModule(tiny_bert_dir, num_classes=2, adapter=AdapterConfig(r=4), init_seed=0)
    trainer = cpu_trainer(max_steps=1)
    trainer.fit(module, train_dataloaders=token_loader())
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    ckpt = torch.load(tmp_path / "a.ckpt", weights_only=True)  # plain types only: no unpickling needed
    expected = {f"model.{k}" for k in adapter_state_dict(module.model)}
    assert set(ckpt["state_dict"]) == expected
    assert all(".base." not in k for k in expected) and any("classifier" in k for k in expected)
    assert ckpt["hyper_parameters"]["adapter"]["r"] == 4

    reloaded = LoRAModule.load_from_checkpoint(tmp_path / "a.ckpt")
    for k, v in reloaded.state_dict().items():
        torch.testing.assert_close(v, ckpt["state_dict"][k], rtol=0, atol=0)
    # the frozen base comes back from the backbone path, identical to the trained module's
    full = dict(module.model.named_parameters())
    for name, p in reloaded.model.named_parameters():
        assert torch.equal(p, full[name]), name


def test_load_state_dict_rejects_a_checkpoint_without_the_adapter(tiny_bert_dir):
    module = LoRAModule(tiny_bert_dir, num_classes=2, init_seed=0)
    module.configure_model()
    state = module.state_dict()
    state.pop(next(k for k in state if "lora_A" in k))
    with pytest.raises(RuntimeError, match="lacks trainable tensors"):
        module.load_state_dict(state)


def _net_module(**kw) -> LoRAModule:
    kw = {"lr": 5e-2, "warmup": 2, "init_seed": 0, "adapter": AdapterConfig(r=2), **kw}
    return LoRAModule(tiny_net(), num_classes=3, task="image_classification", **kw)


class StateProbe(Callback):
    """Records the optimiser's Adam step count and the scheduler position when training starts."""

    def on_train_start(self, trainer, pl_module) -> None:
        opt = trainer.optimizers[0]
        self.adam_steps = {int(s["step"]) for s in opt.state.values()}
        self.sched_epoch = trainer.lr_scheduler_configs[0].scheduler.last_epoch
        self.global_step = trainer.global_step


def test_resume_continues_the_run(tmp_path):
    # uninterrupted: 8 steps (2 epochs of 4 fixed batches), with a checkpoint written at step 4
    full = _net_module()
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    cpu_trainer(max_steps=8, enable_checkpointing=True, callbacks=[saver]).fit(full, train_dataloaders=tensor_loader())
    final = adapter_state_dict(full.model)

    # resumed: a fresh module, continue from the step-4 checkpoint to step 8
    resumed, probe = _net_module(), StateProbe()
    trainer = cpu_trainer(max_steps=8, callbacks=[probe])
    trainer.fit(resumed, train_dataloaders=tensor_loader(), ckpt_path=tmp_path / "step=4.ckpt")
    assert (probe.global_step, probe.sched_epoch, probe.adam_steps) == (4, 4, {4})
    assert trainer.global_step == 8
    got = adapter_state_dict(resumed.model)
    for k in final:
        torch.testing.assert_close(got[k], final[k], rtol=1e-5, atol=1e-6)

    # control: the same weights with a fresh optimiser and schedule do NOT give the same result
    restarted = _net_module()
    restarted.configure_model()
    restarted.load_state_dict(torch.load(tmp_path / "step=4.ckpt", weights_only=True)["state_dict"])
    cpu_trainer(max_steps=4).fit(restarted, train_dataloaders=tensor_loader())
    diff = max((adapter_state_dict(restarted.model)[k] - final[k]).abs().max().item() for k in final)
    assert diff > 1e-3


def test_param_groups_decay_only_matrices_and_lr_defaults():
    module = _net_module(lr=None, head_lr=0.5, weight_decay=0.1)
    module.configure_model()
    groups = {g["name"]: g for g in module.param_groups()}
    assert set(groups) == {"adapter", "head", "head_no_decay"}
    assert groups["adapter"]["lr"] == 1e-3 and groups["head"]["lr"] == 0.5  # LoRA default; head_lr
    assert groups["head"]["weight_decay"] == 0.1 and groups["head_no_decay"]["weight_decay"] == 0.0
    assert [p.ndim for p in groups["head_no_decay"]["params"]] == [1]  # classifier.bias
    assert len(groups["adapter"]["params"]) == 4  # lora_A, lora_B of fc1 and fc2
    assert _net_module(lr=None, adapter=AdapterConfig(method="lora_alpha")).lr == 5e-5
    no_decay = _net_module(decay_on=[])
    no_decay.configure_model()
    assert all(g["weight_decay"] == 0.0 for g in no_decay.param_groups())


def test_coupled_weight_decay_is_the_gradient_of_the_l2_penalty():
    """weight_decay_mode="coupled": the gradient Adam sees is that of L + λ/2·Σ‖p‖² over the decayed matrices
    (its first moment after one step is (1 − β1)·that gradient), and the step equals a penalty-in-the-loss step;
    "decoupled" (AdamW) is a different step."""
    lam, beta1 = 0.3, 0.9
    x, y = next(iter(tensor_loader()))

    def stepped(mode: str, penalty: bool):
        module = _net_module(weight_decay=0.0 if penalty else lam, weight_decay_mode=mode)
        module.configure_model()
        opt = module.optimizer()
        decayed = [p for g in module.param_groups() if g["name"] in ("adapter", "head") for p in g["params"]]
        with torch.no_grad():  # B ≠ 0, so every factor has a non-zero gradient and decay
            for layer in adapter_layers(module.model).values():
                layer.lora_B.normal_(std=0.5, generator=torch.Generator().manual_seed(1))
        loss = nn.functional.cross_entropy(module.model(x), y)
        if penalty:
            loss = loss + lam / 2 * sum(p.pow(2).sum() for p in decayed)
        loss.backward()
        grads = {id(p): p.grad.clone() for p in decayed}
        opt.step()
        return module, opt, decayed, grads

    coupled, opt, decayed, _ = stepped("coupled", penalty=False)
    assert type(opt) is torch.optim.Adam and {g["weight_decay"] for g in opt.param_groups} == {0.0, lam}
    loss_penalty, _, decayed_p, penalty_grads = stepped("coupled", penalty=True)
    for p, q in zip(decayed, decayed_p):
        torch.testing.assert_close(opt.state[p]["exp_avg"], (1 - beta1) * penalty_grads[id(q)], rtol=1e-6, atol=1e-9)
    for p, q in zip(coupled.parameters(), loss_penalty.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)
    decoupled, opt_w, decayed_w, _ = stepped("decoupled", penalty=False)
    assert type(opt_w) is torch.optim.AdamW
    assert max((p - q).abs().max() for p, q in zip(decayed, decayed_w)) > 1e-4
    with pytest.raises(ValueError, match="decoupled, coupled"):
        _net_module(weight_decay_mode="l2")


def test_warmup_then_cosine_schedule():
    module = _net_module(warmup=0.25, min_lr_ratio=0.1)
    f = module.lr_factor(total_steps=100)
    assert [f(0), f(12), f(24)] == pytest.approx([1 / 26, 13 / 26, 25 / 26])  # 25 warm-up steps
    assert f(25) == pytest.approx(1.0)
    assert f(25 + 75 / 2) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(100) == pytest.approx(0.1)
    const = _net_module(warmup=3, scheduler="constant").lr_factor(total_steps=math.inf)
    assert [const(0), const(3), const(10**6)] == pytest.approx([0.25, 1.0, 1.0])


def test_configure_model_is_idempotent():
    module = _net_module()
    module.configure_model()
    model = module.model
    module.configure_model()
    assert module.model is model
    layers = adapter_layers(model)
    assert len(layers) == 2 and not any(adapter_layers(layer.base) for layer in layers.values())  # no double wrap


def test_method_callbacks_added_unless_present():
    safety = [NonFiniteGuard, GradientFlowCheck, SupervisionCheck]  # every method: on by default
    module = _net_module()
    module.trainer = cpu_trainer()
    assert [type(c) for c in module.configure_callbacks()] == safety  # plain LoRA needs no method callback
    assert module.configure_callbacks()[0].mode == "stop"
    allora = _net_module(adapter=AdapterConfig(method="allora", r=2))
    allora.trainer = cpu_trainer()
    assert [type(c) for c in allora.configure_callbacks()] == [ALLoRARescaling, DropoutRemoval, *safety]
    allora.trainer = cpu_trainer(callbacks=[ALLoRARescaling(eta=4.0), NonFiniteGuard(mode="skip")])
    # the user's own instances win
    assert [type(c) for c in allora.configure_callbacks()] == [DropoutRemoval, GradientFlowCheck, SupervisionCheck]
    off = _net_module(nonfinite="ignore", checks=False)
    off.trainer = cpu_trainer()
    assert off.configure_callbacks() == []


def test_sds_method_trains_through_its_callback():
    """method=sds in LoRAModule: plain-LoRA warm-up, then the callback's re-balance activates the bases."""
    module = _net_module(adapter=AdapterConfig(method="sds", r=2))
    cpu_trainer(max_steps=3).fit(module, train_dataloaders=tensor_loader())
    assert not any(bool(layer.sds_active) for layer in adapter_layers(module.model).values())  # warm-up: 10 steps
    module = _net_module(adapter=AdapterConfig(method="sds", r=2))
    cpu_trainer(max_steps=12).fit(module, train_dataloaders=tensor_loader())
    for layer in adapter_layers(module.model).values():
        assert bool(layer.sds_active)
        for q in (layer.Q_A, layer.Q_B):
            torch.testing.assert_close(q.T @ q, torch.eye(2), atol=1e-5, rtol=0)


def test_allora_method_rescales_gradients_and_takes_the_papers_base_lr():
    """method=allora in LoRAModule: s = 1, lr=None gives DEFAULT_LR["lora"] / η (the paper's base LR l_b), and
    the rule is in the backward: at B = 0 every c_i = η, so B's gradient is η × plain LoRA's (s = 1)."""
    from lora_lightning.module import DEFAULT_LR

    assert _net_module(lr=None, adapter=AdapterConfig(method="allora", r=2)).lr == DEFAULT_LR["lora"] / 2
    assert _net_module(lr=None, adapter=AdapterConfig(method="allora", r=2, eta=4.0)).lr == DEFAULT_LR["lora"] / 4
    assert _net_module(lr=None, adapter=AdapterConfig(method="lora", r=2, scaling="none")).lr == DEFAULT_LR["none"]
    plain = _net_module(adapter=AdapterConfig(method="lora", r=2, scaling="none"))
    allora = _net_module(adapter=AdapterConfig(method="allora", r=2))
    x, y = next(iter(tensor_loader()))
    for m in (plain, allora):
        m.configure_model()
        nn.functional.cross_entropy(m.model(x), y).backward()
    for a, b in zip(adapter_layers(allora.model).values(), adapter_layers(plain.model).values()):
        assert a.scaling == 1.0 and a.allora_eta == 2.0 and b.allora_eta is None
        assert torch.count_nonzero(b.lora_B.grad) > 0
        torch.testing.assert_close(a.lora_B.grad, 2.0 * b.lora_B.grad)


class PlainUserModule(LightningModule):
    """A user's own LightningModule with adapters injected by hand (no LoRAModule involved)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_net()
        inject_adapters(self.net, AdapterConfig(r=2), verbose=False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.5)


def test_adapter_checkpoint_on_a_plain_lightning_module(tmp_path):
    module = PlainUserModule()
    callback = AdapterCheckpoint(dirpath=tmp_path, monitor="val_loss", mode="min")
    cpu_trainer(max_epochs=3, callbacks=[callback]).fit(module, tensor_loader(), tensor_loader(seed=1))
    assert callback.best_score is not None and math.isfinite(callback.best_score)

    fresh = tiny_net()
    load_adapter(fresh, tmp_path / "last")
    x = torch.randn(5, 16)
    torch.testing.assert_close(fresh(x), module.net(x))  # last = the final weights
    untrained = tiny_net()
    assert not torch.allclose(untrained(x), module.net(x), atol=1e-4)
    assert (tmp_path / "best" / "adapter_model.safetensors").is_file()


def test_adapter_checkpoint_in_peft_format_loads_in_peft(tmp_path):
    from peft import PeftModel

    module = PlainUserModule()
    callback = AdapterCheckpoint(dirpath=tmp_path, format="peft")
    cpu_trainer(max_steps=3, callbacks=[callback]).fit(module, tensor_loader())
    theirs = PeftModel.from_pretrained(tiny_net(), tmp_path / "last")
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), module.net(x), rtol=0, atol=1e-5)  # adapters and the trained head
        assert not torch.allclose(tiny_net()(x), module.net(x), atol=1e-4)
    with pytest.raises(ValueError, match="format must be one of lora_lightning, peft"):
        AdapterCheckpoint(format="merged")


def test_adapter_checkpoint_without_adapters_names_the_fix(tmp_path):
    class NoAdapters(PlainUserModule):
        def __init__(self) -> None:
            LightningModule.__init__(self)
            self.net = tiny_net()

    with pytest.raises(ValueError, match="inject_adapters"):
        cpu_trainer(max_steps=1, callbacks=[AdapterCheckpoint(dirpath=tmp_path)]).fit(NoAdapters(), tensor_loader())
