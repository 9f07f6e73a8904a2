"""ALLoRARescaling: the paper's backward rule configured and logged (default), and the ablations that apply
c_i = 1/√(‖θ_i‖ + 1/η²) to the update or the gradient (the layers' own rule switched off for the fit)."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_lightning import AdapterConfig, adapter_layers, inject_adapters
from lora_lightning.callbacks.allora import ALLoRARescaling

ETA = 2.0


class UserModule(L.LightningModule):
    """A plain user LightningModule (not LoRAModule) that injects adapters itself. float64 for exact ratios."""

    def __init__(
        self, make_opt, init_b_std: float = 0.3, manual: bool = False, scaling: str = "none", method: str = "lora"
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 3)).double()
        # method "lora" with s = 1: plain LoRA layers (the rule off), so an ablation's effect is all the callback's
        cfg = AdapterConfig(method=method, r=2, init_b_std=init_b_std, scaling=scaling)
        inject_adapters(self.net, cfg, verbose=False)
        self.make_opt = make_opt
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self):
        return self.make_opt([p for p in self.parameters() if p.requires_grad])


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randn(16, 3, generator=g, dtype=torch.float64)
    return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)


def fit(module: L.LightningModule, callbacks=(), steps: int = 1, accumulate: int = 1) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps, accumulate_grad_batches=accumulate, callbacks=list(callbacks), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, loader())
    return trainer


def factors(module) -> dict[str, torch.Tensor]:
    layers = adapter_layers(module).items()
    return {f"{n}.{k}": getattr(l, k).detach().clone() for n, l in layers for k in ("lora_A", "lora_B")}


def expected_coefs(module, rows: str = "factors", norm: str = "norm") -> dict[str, torch.Tensor]:
    """c per row, straight from the definition (dense ΔW for rows='product')."""
    def c(n):
        return 1 / torch.sqrt((n**2 if norm == "squared" else n) + ETA**-2)

    out = {}
    for name, layer in adapter_layers(module).items():
        A, B = layer.lora_A.detach(), layer.lora_B.detach()
        if rows == "factors":
            out[f"{name}.lora_A"], out[f"{name}.lora_B"] = c(A.norm(dim=1))[:, None], c(B.norm(dim=1))[:, None]
        else:
            cb = c(layer.delta_matrix().detach().norm(dim=1))
            out[f"{name}.lora_A"], out[f"{name}.lora_B"] = cb.mean().expand(A.shape[0], 1), cb[:, None]
    return out


def run_pair(make_opt, cb, accumulate=1, **kw):
    with_cb, plain = UserModule(make_opt, **kw), UserModule(make_opt, **kw)
    plain.load_state_dict(with_cb.state_dict())
    before = factors(with_cb)
    coefs = expected_coefs(with_cb, cb.rows, cb.norm)
    trainer = fit(with_cb, [cb], accumulate=accumulate)
    fit(plain, accumulate=accumulate)
    after_cb, after_plain = factors(with_cb), factors(plain)
    d_cb = {k: after_cb[k] - before[k] for k in before}
    d_plain = {k: after_plain[k] - before[k] for k in before}
    return d_cb, d_plain, before, coefs, trainer


def adamw(wd=0.1):
    return lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=wd)


@pytest.mark.parametrize("rows", ["factors", "product"])
@pytest.mark.parametrize("norm", ["norm", "squared"])
def test_adamw_update_is_scaled_per_row_by_c(rows, norm):
    cb = ALLoRARescaling(eta=ETA, rows=rows, norm=norm, mode="update")
    d_cb, d_plain, _, coefs, trainer = run_pair(adamw(), cb)
    for k in d_cb:
        assert d_plain[k].abs().min() > 0
        ratio = d_cb[k] / d_plain[k]  # every element of row i: c_i
        torch.testing.assert_close(ratio, coefs[k].expand_as(ratio), rtol=1e-6, atol=0)
    # the coefficients differ between rows (so the check above is not a global factor) ...
    assert torch.cat([c.flatten() for c in coefs.values()]).std() > 1e-3
    # ... and their mean over all rescaled rows is logged
    mean = torch.cat([c.flatten() for c in coefs.values()]).mean()
    assert trainer.logged_metrics["allora/coef_mean"].item() == pytest.approx(mean.item(), rel=1e-6)
    # hooks are removed at teardown
    assert not trainer.optimizers[0]._optimizer_step_pre_hooks and not trainer.optimizers[0]._optimizer_step_post_hooks


def test_norm_and_squared_give_different_coefficients():
    module = UserModule(adamw())
    layer = next(iter(adapter_layers(module).values()))
    c_norm = ALLoRARescaling(norm="norm", rows="factors", mode="update").coefficients(layer)[1]
    c_sq = ALLoRARescaling(norm="squared", rows="factors", mode="update").coefficients(layer)[1]
    n = layer.lora_B.detach().norm(dim=1, keepdim=True)
    torch.testing.assert_close(c_norm, 1 / torch.sqrt(n + 0.25))
    torch.testing.assert_close(c_sq, 1 / torch.sqrt(n**2 + 0.25))
    assert not torch.allclose(c_norm, c_sq)


def test_product_rows_include_the_scale():
    module = UserModule(adamw(), scaling="lora")  # s = α/r = 8 ≠ 1
    layer = next(iter(adapter_layers(module).values()))
    c_a, c_b = ALLoRARescaling(rows="product").coefficients(layer)
    n = layer.delta_matrix().detach().norm(dim=1, keepdim=True)  # rows of s·B·A
    torch.testing.assert_close(c_b, 1 / torch.sqrt(n + 0.25))
    torch.testing.assert_close(c_a, c_b.mean().expand(layer.r, 1))


@pytest.mark.parametrize("rows", ["factors", "product"])
def test_zero_rows_get_eta(rows):
    layer = next(iter(adapter_layers(UserModule(adamw(), init_b_std=0.0)).values()))  # B = 0
    c_a, c_b = ALLoRARescaling(eta=3.0, rows=rows, mode="update").coefficients(layer)
    torch.testing.assert_close(c_b, torch.full_like(c_b, 3.0))
    if rows == "product":  # ΔW = 0: every row of ΔW has norm 0
        torch.testing.assert_close(c_a, torch.full_like(c_a, 3.0))


@pytest.mark.parametrize("accumulate,manual", [(2, False), (1, True)])
def test_update_mode_with_accumulation_and_manual_optimisation(accumulate, manual):
    cb = ALLoRARescaling(eta=ETA, rows="factors", mode="update")
    d_cb, d_plain, _, coefs, _ = run_pair(adamw(), cb, accumulate=accumulate, manual=manual)
    for k in d_cb:
        torch.testing.assert_close(d_cb[k], coefs[k] * d_plain[k], rtol=1e-6, atol=1e-14)


def test_sgd_update_equals_gradient_equals_scaled_gradient():
    lr = 0.1
    sgd = lambda params: torch.optim.SGD(params, lr=lr)  # noqa: E731
    d_update, d_plain, before, coefs, _ = run_pair(sgd, ALLoRARescaling(eta=ETA, mode="update"))
    d_grad, _, _, _, _ = run_pair(sgd, ALLoRARescaling(eta=ETA, mode="gradient"))
    # gradients of the first batch, by hand
    module = UserModule(sgd)
    x, y = next(iter(loader()))
    F.mse_loss(module.net(x), y).backward()
    grads = {f"{n}.{k}": getattr(l, k).grad for n, l in adapter_layers(module).items() for k in ("lora_A", "lora_B")}
    for k in d_update:
        torch.testing.assert_close(d_update[k], d_grad[k], rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(d_update[k], -lr * coefs[k] * grads[k], rtol=1e-9, atol=1e-14)
        assert not torch.allclose(d_update[k], d_plain[k])


def test_adamw_weight_decay_scaled_and_unscaled():
    lr, wd = 1e-2, 0.5
    upd = dict(eta=ETA, mode="update", rows="factors")
    d_scaled, d_wd, before, coefs, _ = run_pair(adamw(wd), ALLoRARescaling(**upd, weight_decay="scaled"))
    _, d_nowd, _, _, _ = run_pair(adamw(0.0), ALLoRARescaling(**upd))
    d_unscaled, _, _, _, _ = run_pair(adamw(wd), ALLoRARescaling(**upd, weight_decay="unscaled"))
    for k in d_scaled:
        decay = -lr * wd * before[k]
        # scaled: decoupled decay is part of the update, so it is rescaled with it
        torch.testing.assert_close(d_scaled[k], coefs[k] * d_wd[k], rtol=1e-6, atol=1e-14)
        # unscaled: full decay step + c × (the Adam step alone, i.e. AdamW with weight_decay=0)
        torch.testing.assert_close(d_unscaled[k], decay + coefs[k] * d_nowd[k], rtol=1e-6, atol=1e-14)


def test_unscaled_decay_refused_where_not_separable():
    cb = ALLoRARescaling(weight_decay="unscaled", mode="update")
    module = UserModule(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1))
    with pytest.raises(ValueError, match="weight_decay='scaled'"):
        fit(module, [cb])


def test_bad_input_and_no_adapters():
    with pytest.raises(ValueError, match="factors, product"):
        ALLoRARescaling(rows="columns")
    with pytest.raises(ValueError, match="mode='update' or mode='gradient'"):
        ALLoRARescaling(rows="factors")  # the paper's backward rule has the rows of B·A only
    with pytest.raises(ValueError, match="eta must be > 0"):
        ALLoRARescaling(eta=0)

    class NoAdapters(UserModule):
        def __init__(self):
            L.LightningModule.__init__(self)
            self.net = nn.Linear(6, 3).double()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="inject_adapters"):
        fit(NoAdapters(), [ALLoRARescaling()])


# -- the paper's rule (mode="backward", the default) ------------------------------------------------------------
def sgd(lr=0.1):
    return lambda params: torch.optim.SGD(params, lr=lr)


def grads_by_hand(module) -> dict[str, torch.Tensor]:
    x, y = next(iter(loader()))
    F.mse_loss(module.net(x), y).backward()
    layers = adapter_layers(module).items()
    return {f"{n}.{k}": getattr(l, k).grad.clone() for n, l in layers for k in ("lora_A", "lora_B")}


def test_default_is_the_papers_rule_in_the_layers_and_logs_its_coefficients():
    """method=allora: training with the default callback = training without it (the rule is in the layers'
    backward); the step is −lr × the rule's gradient, not plain LoRA's; the log holds the rule's c."""
    cb = ALLoRARescaling()
    assert (cb.eta, cb.rows, cb.norm, cb.mode) == (None, "product", "norm", "backward")
    with_cb, without = UserModule(sgd(), method="allora"), UserModule(sgd(), method="allora")
    before = factors(with_cb)
    c = [layer.allora_coefficients() for layer in adapter_layers(with_cb).values()]
    trainer = fit(with_cb, [cb])
    fit(without)
    rule = grads_by_hand(UserModule(sgd(), method="allora"))
    plain = grads_by_hand(UserModule(sgd(), method="lora"))
    after_cb, after = factors(with_cb), factors(without)
    for k in before:
        torch.testing.assert_close(after_cb[k], after[k], rtol=0, atol=0)
        torch.testing.assert_close(after_cb[k] - before[k], -0.1 * rule[k], rtol=1e-9, atol=1e-14)
        assert not torch.allclose(rule[k], plain[k])
    flat = torch.cat(c)
    assert trainer.logged_metrics["allora/coef_mean"].item() == pytest.approx(flat.mean().item(), rel=1e-6)
    assert trainer.logged_metrics["allora/coef_min"].item() == pytest.approx(flat.min().item(), rel=1e-6)
    assert all(layer.allora_eta == ETA for layer in adapter_layers(with_cb).values())


def test_backward_mode_switches_the_rule_on_for_other_methods_and_restores_it():
    """On plain LoRA layers (e.g. the paper's ALLoRA+D: LoRA with dropout + the rule) the callback turns the
    rule on with its η for the fit and off again at teardown."""
    module = UserModule(sgd(), method="lora")
    before = factors(module)
    fit(module, [ALLoRARescaling(eta=3.0)])
    twin = UserModule(sgd(), method="lora")
    for layer in adapter_layers(twin).values():
        layer.set_allora(3.0)
    rule = grads_by_hand(twin)
    after = factors(module)
    for k in before:
        torch.testing.assert_close(after[k] - before[k], -0.1 * rule[k], rtol=1e-9, atol=1e-14)
    assert all(layer.allora_eta is None for layer in adapter_layers(module).values())


def test_ablation_switches_the_layers_rule_off_for_the_fit():
    """mode="update" on method=allora layers: the step is c × plain LoRA's step (no double rescaling), and the
    layers' own rule is back after the fit."""
    cb = ALLoRARescaling(rows="product", mode="update")
    with_cb, plain = UserModule(adamw(), method="allora"), UserModule(adamw(), method="lora")
    plain.load_state_dict(with_cb.state_dict())
    before, coefs = factors(with_cb), expected_coefs(with_cb, "product")
    fit(with_cb, [cb])
    fit(plain)
    after_cb, after_plain = factors(with_cb), factors(plain)
    for k in before:
        torch.testing.assert_close(after_cb[k] - before[k], coefs[k] * (after_plain[k] - before[k]), rtol=1e-6,
                                   atol=1e-14)
    assert all(layer.allora_eta == ETA for layer in adapter_layers(with_cb).values())
