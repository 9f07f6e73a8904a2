"""Causal-LM data: label masking, the tokenizer's own chat template, pad-token fallback, truncation / empty /
bad-row counts, prompts for generation, and packing (packed per-example loss = unpacked)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import write_jsonl
from tiny_models import CHAT_TEMPLATE, tiny_gpt2_lm, tiny_llama, tiny_lm_tokenizer

from lora_lightning.backbones import load_tokenizer
from lora_lightning.data import CausalLMDataModule
from lora_lightning.data.causal_lm import pad_right
from lora_lightning.data.formats import (
    ALPACA_PROMPT_NO_INPUT,
    ChatTemplateError,
    Columns,
    encode_example,
    encode_prompt,
)
from lora_lightning.data.packing import collate_packed, pack_examples, segment_ids
from lora_lightning.data.rows import BadDataError
from lora_lightning.generation import pad_left

CHAT = [
    {"role": "system", "content": "say yes"},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hi"},
    {"role": "user", "content": "how are you ?"},
    {"role": "assistant", "content": "fine thanks"},
]
TEMPLATE = "question {instruction} answer"


@pytest.fixture(scope="module")
def tok():
    return tiny_lm_tokenizer()


def tokens(tok, ids):
    return tok.convert_ids_to_tokens(list(ids))


def test_instruction_labels_mask_the_prompt_exactly(tok):
    row = {"instruction": "what is 2 plus 3 ?", "input": "", "output": "5"}
    enc = encode_example(tok, row, "instruction", Columns(), TEMPLATE, TEMPLATE, False, True, 64)
    assert tokens(tok, enc.input_ids) == ["<s>", "question", "what", "is", "2", "plus", "3", "?", "answer", "5", "</s>"]
    assert enc.labels == [-100] * 9 + [tok.convert_tokens_to_ids("5"), tok.eos_token_id]  # answer + EOS only
    assert enc.n_targets == 2 and not enc.truncated
    everything = encode_example(tok, row, "instruction", Columns(), TEMPLATE, TEMPLATE, True, True, 64)
    assert everything.labels == everything.input_ids  # train_on_prompt: every token
    cut = encode_example(tok, row, "instruction", Columns(), TEMPLATE, TEMPLATE, False, True, 9)
    assert cut.truncated and cut.n_targets == 0  # the answer did not fit: the caller drops it


def test_chat_labels_only_assistant_turns_and_their_end_marker(tok):
    enc = encode_example(tok, {"messages": CHAT}, "chat", Columns(), "", "", False, True, 64)
    toks = tokens(tok, enc.input_ids)
    targets = [t for t, y in zip(toks, enc.labels) if y != -100]
    assert targets == ["hi", "</s>", "fine", "thanks", "</s>"]
    for t, i, y in zip(toks, enc.input_ids, enc.labels):
        assert y in (-100, i)  # a target is the token itself (the shift happens in the loss)
    # system/user turns, role markers and the assistant prompt marker are all masked
    assert all(y == -100 for t, y in zip(toks, enc.labels) if t in ("<|system|>", "<|user|>", "<|assistant|>", "say"))
    every_turn = encode_example(tok, {"messages": CHAT}, "chat", Columns(), "", "", True, True, 64)
    assert every_turn.labels == every_turn.input_ids


def test_chat_is_rendered_with_the_tokenizers_own_template(tok):
    enc = encode_example(tok, {"messages": CHAT}, "chat", Columns(), "", "", False, True, 128)
    rendered = tok.apply_chat_template(CHAT, tokenize=False)
    assert enc.input_ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert tokens(tok, enc.input_ids)[:4] == ["<|system|>", "say", "yes", "</s>"]
    other = tiny_lm_tokenizer()  # the same vocabulary, another template: the encoding follows the template
    other.chat_template = "{% for m in messages %}{{ m['content'] }} </s> {% endfor %}"
    enc2 = encode_example(other, {"messages": CHAT}, "chat", Columns(), "", "", False, True, 128)
    assert tokens(other, enc2.input_ids)[:3] == ["say", "yes", "</s>"]
    assert [t for t, y in zip(tokens(other, enc2.input_ids), enc2.labels) if y != -100] == [
        "hi", "</s>", "fine", "thanks", "</s>"
    ]
    unstable = tiny_lm_tokenizer()  # a template that rewrites earlier turns by what follows: refused
    unstable.chat_template = "{% for m in messages %}{{ m['content'] }}{{ messages|length }} {% endfor %}"
    with pytest.raises(ChatTemplateError, match="train_on_prompt"):
        encode_example(unstable, {"messages": CHAT}, "chat", Columns(), "", "", False, True, 128)
    plain = tiny_lm_tokenizer(chat_template=False)
    with pytest.raises(ValueError, match="no chat template"):
        encode_example(plain, {"messages": CHAT}, "chat", Columns(), "", "", False, True, 128)


def test_tokenizer_without_pad_token_pads_with_eos_and_keeps_its_vocabulary(tiny_llama_dir):
    raw = tiny_lm_tokenizer()
    assert raw.pad_token is None
    tok = load_tokenizer(tiny_llama_dir)
    assert tok.pad_token == "</s>" and tok.pad_token_id == tok.eos_token_id
    assert len(tok) == len(raw)  # no token added: the embedding matrix fits as is


def test_collate_pads_right_with_masked_labels_and_left_for_prompts(tok):
    rows = [{"input_ids": [1, 5, 6], "labels": [-100, 5, 6]}, {"input_ids": [1, 7], "labels": [-100, 7]}]
    batch = pad_right(rows, pad_token_id=2)
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6], [-100, 7, -100]]  # padding is never a target
    prompts = pad_left([{"input_ids": [1, 5, 6], "index": 0}, {"input_ids": [1, 7], "index": 1}], pad_token_id=2)
    assert prompts["input_ids"].tolist() == [[1, 5, 6], [2, 1, 7]]
    assert prompts["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]


def test_prompts_drop_the_answer_and_keep_it_as_reference(tok):
    ids, ref, _ = encode_prompt(tok, {"messages": CHAT}, "chat", Columns(), "", "", 64)
    assert ref == "fine thanks"
    assert ids == tok(tok.apply_chat_template(CHAT[:-1], tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"]
    assert tokens(tok, ids)[-1] == "<|assistant|>"
    ids, ref, _ = encode_prompt(tok, {"instruction": "what is 1 plus 2 ?", "output": "3"}, "instruction", Columns(),
                                TEMPLATE, TEMPLATE, 64)
    assert ref == "3" and tokens(tok, ids)[-1] == "answer"
    ids, ref, cut = encode_prompt(tok, {"text": "a good film"}, "text", Columns(), "", "", 2)
    assert (tokens(tok, ids), ref, cut) == (["good", "film"], None, True)  # a long prompt keeps its end


def _module(tiny_llama_dir, **kw):
    kw = {"backbone": tiny_llama_dir, "prompt_template": TEMPLATE, "max_length": 64, "batch_size": 2, **kw}
    return CausalLMDataModule(**kw)


def test_datamodule_counts_truncation_empty_and_bad_rows(tiny_llama_dir, tmp_path):
    rows = [
        {"instruction": "what is 1 plus 2 ?", "input": "", "output": "3"},
        {"instruction": "", "input": "", "output": "4"},  # bad: empty instruction (row 2)
        {"instruction": "what is 2 plus 2 ? what is 2 plus 2 ? what is 2 plus 2 ?", "input": "", "output": "4"},
        {"instruction": "what is 0 plus 1 ?", "output": None},  # bad: missing output (row 4)
        {"instruction": "what is 3 plus 3 ?", "input": "", "output": "6"},
    ]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    dm = _module(tiny_llama_dir, train_file=train, val_file=train, max_length=12)
    with pytest.warns(UserWarning) as record:
        dm.setup("fit")
    messages = [str(w.message) for w in record]
    bad = next(m for m in messages if "dropped 2 of 5 rows" in m)
    assert "train.jsonl" in bad and "rows 2, 4" in bad and "on_bad_rows: error" in bad
    assert dm.stats["train"] == {"examples": 3, "truncated": 1, "no_target": 1, "rows": 2}
    assert any(m.startswith(f"{train}: truncated 1 of 3 rows longer than max_length=12 tokens (longest: ") and
               "tokens; row 3; row 1 = the first data row)" in m for m in messages)
    assert any(m.startswith(f"{train}: dropped 1 of 3 examples with no target token after truncation to "
                            "max_length=12 (row 3;") for m in messages)
    strict = _module(tiny_llama_dir, train_file=train, val_file=train, on_bad_rows="error")
    with pytest.raises(BadDataError, match=r"train.jsonl: 2 of 5 rows with a missing or empty 'instruction' or 'output' \(rows 2, 4;"):
        strict.setup("fit")


def test_datamodule_chat_text_and_packing(tiny_llama_dir, sft_files):
    chat = _module(tiny_llama_dir, train_file=sft_files["chat"], val_file=sft_files["chat"])
    chat.setup("fit")
    assert chat.format == "chat"
    batch = chat.collate([chat.splits["train"][i] for i in range(2)])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    text = _module(tiny_llama_dir, train_file=sft_files["text"], val_file=sft_files["text"], packing=True, max_length=16)
    text.setup("fit")
    # "<s> a good film </s>" (5) + "<s> tell me a story about dogs </s>" (8) in one row of 16
    assert text.format == "text" and text.stats["train"]["packed_rows"] == 1
    row = text.splits["train"][0]
    assert row["position_ids"] == [*range(5), *range(8)]
    assert row["labels"] == [-100, *row["input_ids"][1:5], -100, *row["input_ids"][6:]]  # all tokens, boundary masked


def test_predict_file_and_writer_rows(tiny_llama_dir, sft_files):
    dm = _module(tiny_llama_dir, predict_file=sft_files["prompts"])
    loader = dm.predict_dataloader()
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "attention_mask", "index"} and batch["index"].tolist() == [0, 1]
    assert (batch["attention_mask"][:, -1] == 1).all()  # left padding: every prompt ends at the last column
    first = json.loads(open(sft_files["prompts"]).readline())
    assert dict(dm.predict_rows[0]) == first


# -- packing ----------------------------------------------------------------------------------------------
def test_pack_examples_resets_positions_and_masks_the_boundary():
    rows = pack_examples([([1, 5, 6], [-100, 5, 6]), ([1, 7], [1, 7]), ([1, 8, 9, 4], [-100, -100, 9, 4])], 6)
    assert rows[0] == {"input_ids": [1, 5, 6, 1, 7], "labels": [-100, 5, 6, -100, 7], "position_ids": [0, 1, 2, 0, 1]}
    assert rows[1]["position_ids"] == [0, 1, 2, 3] and rows[1]["labels"] == [-100, -100, 9, 4]
    batch = collate_packed(rows, pad_token_id=2)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention_mask: positions carry the blocks
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 0] and batch["labels"][1, 4] == -100
    assert segment_ids(batch["position_ids"])[0].tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="truncate before packing"):
        pack_examples([([1] * 7, [1] * 7)], 6)


def _per_example_losses(model, batch) -> list[torch.Tensor]:
    """Σ next-token CE of each example (in the order the examples appear), from one forward of ``batch``."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none").view_as(labels)
    if "position_ids" in batch:
        seg = segment_ids(batch["position_ids"])[:, 1:]  # the example of each predicted token
    else:
        seg = torch.zeros_like(labels)
    out = []
    for row in range(labels.shape[0]):
        for s in seg[row][labels[row] != -100].unique(sorted=True):
            out.append(ce[row][(seg[row] == s) & (labels[row] != -100)].sum())
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_loss_equals_unpacked_loss(arch, attn, tok):
    model = tiny_llama(attn=attn) if arch == "llama" else tiny_gpt2_lm(attn=attn)
    rows = [
        {"instruction": "what is 1 plus 2 ?", "output": "3"},
        {"instruction": "tell me about cats", "output": "cats good good"},
        {"instruction": "what is 4 plus 4 ?", "output": "8"},
        {"instruction": "hello", "output": "hi how are you ?"},
        {"instruction": "say yes", "output": "yes"},
    ]
    encoded = [encode_example(tok, r, "instruction", Columns(), TEMPLATE, TEMPLATE, False, True, 64) for r in rows]
    pairs = [(e.input_ids, e.labels) for e in encoded]
    unpacked = [_per_example_losses(model, pad_right([{"input_ids": i, "labels": y}], 2))[0] for i, y in pairs]
    packs = pack_examples(pairs, max_length=24)
    assert len(packs) < len(pairs) and max(len(p["position_ids"]) for p in packs) <= 24  # several per row
    packed = _per_example_losses(model, collate_packed(packs, pad_token_id=2))
    assert len(packed) == len(unpacked)
    torch.testing.assert_close(torch.stack(packed), torch.stack(unpacked), rtol=0, atol=1e-5)
    # control: the same rows WITHOUT position restarts (one plain causal sequence) give different losses
    plain = {k: v for k, v in collate_packed(packs, 2).items() if k != "position_ids"}
    plain["attention_mask"] = torch.ones_like(plain["input_ids"])
    mixed = model(**{k: plain[k] for k in ("input_ids", "attention_mask")}, use_cache=False).logits
    restarted = model(**{k: collate_packed(packs, 2)[k] for k in ("input_ids", "position_ids")}, use_cache=False).logits
    assert (mixed - restarted).abs().max() > 1e-3


def test_unused_alpaca_no_input_template_follows_a_custom_template(tiny_llama_dir, sft_files):
    assert _module(tiny_llama_dir, train_file=sft_files["train"]).hparams.prompt_template_no_input == TEMPLATE
    default = CausalLMDataModule(backbone=tiny_llama_dir, train_file=sft_files["train"])
    assert default.hparams.prompt_template_no_input == ALPACA_PROMPT_NO_INPUT


def test_chat_template_constant_is_what_the_tokenizer_carries(tok):
    assert tok.chat_template == CHAT_TEMPLATE


def test_malformed_chat_rows_are_dropped_and_a_second_setup_reuses_the_tokenised_cache(tiny_llama_dir, tmp_path,
                                                                                       monkeypatch):
    import datasets

    from lora_lightning.data import causal_lm

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    calls = []
    encode = causal_lm.encode_example
    monkeypatch.setattr(causal_lm, "encode_example", lambda *a: calls.append(1) or encode(*a))
    chat = [{"role": "user", "content": "what is 1 plus 2 ?"}, {"role": "assistant", "content": "3"}]
    rows = [{"messages": chat}, {"messages": [{"content": "no role"}]}, {"messages": []}, {"messages": chat}]
    train = write_jsonl(tmp_path / "chat.jsonl", rows)
    dm = _module(tiny_llama_dir, train_file=train, val_file=train)
    with pytest.warns(UserWarning) as record:
        dm.setup("fit")
    bad = [str(w.message) for w in record if "dropped" in str(w.message)]
    assert bad[0] == (f"{train}: dropped 2 of 4 rows with a missing or empty 'messages', or unusable (row 2: turn 0 "
                      "has no role) (rows 2, 3; row 1 = the first data row). Set data.on_bad_rows: error to stop instead")
    assert len(calls) == 4 and len(dm.splits["train"]) == len(dm.splits["val"]) == 2
    again = _module(tiny_llama_dir, train_file=train, val_file=train)
    again.setup("fit")
    assert len(calls) == 4  # loaded from datasets' cache, not tokenised again
    assert again.splits["train"][:] == dm.splits["train"][:]
