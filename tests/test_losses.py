"""The target-only chunked causal-LM loss equals HF's own loss, in value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_lightning.losses import causal_lm_loss, linear_cross_entropy, liger_available, shifted_targets


def tiny_qwen2(tied: bool, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied, attn_implementation="eager",
    )
    return Qwen2ForCausalLM(config).double().float()  # float(): a fresh fp32 copy, grads on every tensor


def labelled_batch(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (4, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding
    labels = ids.clone()
    labels[:, :3] = -100  # prompt
    labels[1, 7:] = -100  # padding
    labels[2, :] = -100  # a row with no target token at all
    labels[3, :10] = -100  # only the last token is a label: its target sits at position 9
    return {"input_ids": ids, "attention_mask": mask}, labels


def ours(model, batch, labels, **kw):
    hidden = model.model(**batch).last_hidden_state
    return causal_lm_loss(hidden, labels, model.lm_head.weight, model.lm_head.bias, **kw)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_chunked_loss_equals_hf_loss_and_gradients(tied):
    model = tiny_qwen2(tied)
    batch, labels = labelled_batch()
    model(**batch, labels=labels).loss.backward()
    expected_loss = model(**batch, labels=labels).loss.detach()
    expected = grads(model)
    model.zero_grad(set_to_none=True)

    loss_sum, n, n_correct = ours(model, batch, labels, chunk_size=5)  # 13 targets: three chunks, the last one ragged
    assert int(n) == int((labels[:, 1:] != -100).sum()) == 13
    (loss_sum / n).backward()
    got = grads(model)
    torch.testing.assert_close(loss_sum / n, expected_loss, rtol=1e-5, atol=1e-6)
    logits = model(**batch).logits[:, :-1][labels[:, 1:] != -100]
    assert int(n_correct) == int((logits.argmax(-1) == labels[:, 1:][labels[:, 1:] != -100]).sum())
    assert set(got) == set(expected)
    assert ("lm_head.weight" in got) is (not tied)  # untied: the lm_head has its own gradient
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_rows_without_targets_and_all_masked_batch():
    model = tiny_qwen2(tied=True)
    batch, labels = labelled_batch()
    hidden = model.model(**batch).last_hidden_state.detach().requires_grad_()
    # a row with no target adds nothing and gets a zero gradient
    loss_sum, n, _ = causal_lm_loss(hidden, labels, model.lm_head.weight.detach())
    loss_sum.backward()
    assert torch.all(hidden.grad[2] == 0)
    assert torch.all(hidden.grad[3, :9] == 0) and torch.any(hidden.grad[3, 9] != 0)
    assert torch.all(hidden.grad[:, -1] == 0)  # the last position never has a target
    # a batch without a single target: (0, 0), a zero gradient, no NaN
    hidden.grad = None
    loss_sum, n, n_correct = causal_lm_loss(hidden, torch.full_like(labels, -100), model.lm_head.weight.detach())
    (loss_sum / n.clamp(min=1)).backward()
    assert float(loss_sum) == 0.0 and int(n) == 0 and int(n_correct) == 0
    assert torch.all(hidden.grad == 0)


def test_bias_and_dtypes_follow_plain_cross_entropy():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(13, 16, generator=g)
    w, b = torch.randn(50, 16, generator=g), torch.randn(50, generator=g)
    y = torch.randint(0, 50, (13,), generator=g)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        hs, ws, bs = (t.to(dtype).clone().requires_grad_() for t in (h, w, b))
        linear_cross_entropy(hs, ws, y, bs, chunk_size=4)[0].backward()
        got = [t.grad.float() for t in (hs, ws, bs)]
        hr, wr, br = (t.to(dtype).clone().requires_grad_() for t in (h, w, b))
        logits = F.linear(hr, wr, br)
        ref = F.cross_entropy(logits.to(torch.promote_types(dtype, torch.float32)), y, reduction="sum")  # upcast
        ref.backward()
        for a, e in zip(got, (hr.grad, wr.grad, br.grad)):
            torch.testing.assert_close(a, e.float(), rtol=tol, atol=tol)


def test_no_grad_forward_gives_the_loss_only():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(6, 8, generator=g, requires_grad=True), torch.randn(20, 8, generator=g)
    y = torch.randint(0, 20, (6,), generator=g)
    with torch.no_grad():
        loss, n_correct = linear_cross_entropy(h, w, y, chunk_size=4)
    assert not loss.requires_grad
    logits = h.detach() @ w.T
    torch.testing.assert_close(loss, F.cross_entropy(logits, y, reduction="sum"))
    assert int(n_correct) == int((logits.argmax(-1) == y).sum())


def test_shifted_targets_and_bad_input():
    labels = torch.tensor([[-100, 5, 6, -100], [1, 2, -100, -100]])
    mask, targets = shifted_targets(labels)
    assert mask.tolist() == [[True, True, False, False], [True, False, False, False]]
    assert targets.tolist() == [5, 6, 2]
    with pytest.raises(ValueError, match="labels must be B×T"):
        causal_lm_loss(torch.zeros(2, 3, 4), labels, torch.zeros(7, 4))
    with pytest.raises(ValueError, match="backend='liger' runs Triton kernels on CUDA only"):
        linear_cross_entropy(torch.zeros(2, 4), torch.zeros(7, 4), torch.zeros(2, dtype=torch.long),
                                 backend="liger")


@pytest.mark.skipif(not (torch.cuda.is_available() and liger_available()), reason="needs CUDA and liger-kernel")
def test_liger_matches_ours_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(300, 64, device="cuda", generator=g, requires_grad=True)
    w = torch.randn(1000, 64, device="cuda", generator=g, requires_grad=True)
    y = torch.randint(0, 1000, (300,), device="cuda", generator=g)
    results = []
    for backend in ("torch", "liger"):
        loss, n_correct = linear_cross_entropy(h, w, y, chunk_size=64, backend=backend)
        gh, gw = torch.autograd.grad(loss, (h, w))
        results.append((loss, n_correct, gh, gw))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
