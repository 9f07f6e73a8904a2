"""Datamodules: local TSV/CSV → tokenized, dynamically padded batches with the right labels; the seeded
training subset; the built-in digits set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SENTENCES, TINY_TIMM, write_tsv
from transformers import AutoTokenizer

from lora_lightning.data import ImageClassificationDataModule, TextClassificationDataModule


def _text_dm(tiny_bert_dir, sst_files, **kw) -> TextClassificationDataModule:
    kw = {"train_file": sst_files["train"], "val_file": sst_files["dev"], "batch_size": 4, "num_classes": 2, **kw}
    dm = TextClassificationDataModule(backbone=tiny_bert_dir, **kw)
    dm.setup("fit")
    return dm


def test_tsv_batches_are_dynamically_padded_with_correct_labels(tiny_bert_dir, sst_files):
    dm = _text_dm(tiny_bert_dir, sst_files)
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    dev = SENTENCES[:6]
    batches = list(dm.val_dataloader())  # unshuffled: file order
    assert [len(b["labels"]) for b in batches] == [4, 2]
    for batch, rows in zip(batches, (dev[:4], dev[4:])):
        lengths = [len(tok(s)["input_ids"]) for _, s in rows]
        assert batch["input_ids"].shape == (len(rows), max(lengths))  # padded to this batch's longest only
        assert batch["attention_mask"].sum(1).tolist() == lengths
        assert (batch["input_ids"][batch["attention_mask"] == 0] == tok.pad_token_id).all()
        assert batch["labels"].tolist() == [y for y, _ in rows]
        assert batch["labels"].dtype == torch.long
        first = tok.decode(batch["input_ids"][0][: lengths[0]], skip_special_tokens=True)
        assert first == rows[0][1]
    assert batches[0]["input_ids"].shape[1] != batches[1]["input_ids"].shape[1]


def test_csv_with_string_labels_and_a_seeded_validation_split(tiny_bert_dir, tmp_path):
    rows = [("pos" if y else "neg", s) for y, s in SENTENCES]
    path = tmp_path / "reviews.csv"
    path.write_text("text,sentiment\n" + "".join(f"{s},{y}\n" for y, s in rows))
    dm = TextClassificationDataModule(
        backbone=tiny_bert_dir, train_file=str(path), text_columns="text", label_column="sentiment",
        val_fraction=0.25, num_classes=2,
    )
    dm.setup()
    assert (len(dm.splits["train"]), len(dm.splits["val"])) == (9, 3)
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    label_of = {tuple(tok(s)["input_ids"]): int(y == "pos") for y, s in rows}  # "neg" → 0, "pos" → 1 (sorted)
    for split in ("train", "val"):
        for ex in dm.splits[split]:
            assert label_of[tuple(ex["input_ids"])] == ex["labels"]


def test_train_size_subset_is_fixed_by_seed(tiny_bert_dir, sst_files):
    def subset(seed: int) -> list[tuple[int, ...]]:
        dm = _text_dm(tiny_bert_dir, sst_files, train_size=5, seed=seed)
        return sorted(tuple(ex["input_ids"]) for ex in dm.splits["train"])

    a = subset(0)
    assert len(a) == 5 and len(set(a)) == 5
    assert subset(0) == a
    assert subset(1) != a


def test_labels_out_of_range_name_the_fix(tiny_bert_dir, sst_files, tmp_path):
    bad = write_tsv(tmp_path / "bad.tsv", [(0, "good"), (3, "bad")])
    with pytest.raises(ValueError, match="model.num_classes"):
        _text_dm(tiny_bert_dir, sst_files, train_file=bad)
    with pytest.raises(ValueError, match="text_columns"):
        _text_dm(tiny_bert_dir, sst_files, text_columns="review")


def test_digits_datamodule_shapes_labels_and_seeded_split():
    dm = ImageClassificationDataModule(backbone=TINY_TIMM, image_size=16, batch_size=32, num_classes=10, seed=3)
    dm.setup()
    assert (len(dm.splits["train"]), len(dm.splits["val"])) == (1437, 360)  # 1797 images, 20 % held out
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (32, 3, 16, 16) and x.dtype == torch.float32
    assert y.dtype == torch.long and 0 <= y.min() and y.max() <= 9
    cfg = dm.data_config  # timm's data config for the model, at the requested size
    assert cfg["input_size"] == (3, 16, 16)
    corner = x[:, :, 0, 0]  # digits have blank borders: (0 − mean)/std per channel
    expected = -torch.tensor(cfg["mean"]) / torch.tensor(cfg["std"])
    torch.testing.assert_close(corner, expected.expand_as(corner), atol=1e-4, rtol=0)
    raw = x * torch.tensor(cfg["std"]).view(1, 3, 1, 1) + torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    torch.testing.assert_close(raw[:, 0], raw[:, 2], atol=1e-5, rtol=0)  # grayscale repeated to 3 channels
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5 and raw.amax(dim=(1, 2, 3)).min() > 0.5
    # the same seed → the same split; a different seed → a different one
    again = ImageClassificationDataModule(backbone=TINY_TIMM, image_size=16, seed=3)
    again.setup()
    assert torch.equal(again.splits["val"].tensors[1], dm.splits["val"].tensors[1])
    other = ImageClassificationDataModule(backbone=TINY_TIMM, image_size=16, seed=4)
    other.setup()
    assert not torch.equal(other.splits["val"].tensors[1], dm.splits["val"].tensors[1])
    counts = np.bincount(dm.splits["train"].tensors[1].numpy(), minlength=10)
    assert counts.sum() == 1437 and (counts > 100).all()
