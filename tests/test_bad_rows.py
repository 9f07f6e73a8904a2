"""Real data files with gaps: rows with an empty text or label are dropped with one counted warning (or are an
error), text labels map through a label vocabulary that is saved and reused, label mismatches name the fix."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from conftest import SENTENCES, TINY_TIMM, cpu_trainer, write_tsv
from datasets import ClassLabel, Dataset, Features, Image, Value
from transformers import AutoTokenizer

from lora_lightning.data import (
    BadDataError,
    BadRowsWarning,
    ImageClassificationDataModule,
    TextClassificationDataModule,
    filter_bad_rows,
)

NAMES = {1: "positive", 0: "negative"}


def _dm(tiny_bert_dir, train, **kw) -> TextClassificationDataModule:
    dm = TextClassificationDataModule(backbone=tiny_bert_dir, train_file=str(train), batch_size=4, **kw)
    dm.setup()
    return dm


def _setup_warnings(dm) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup()
    return [str(w.message) for w in caught if issubclass(w.category, BadRowsWarning)]


def _decoded(dm, tiny_bert_dir, split="train") -> list[tuple[int, str]]:
    """(label id, sentence) of every example of a split, the sentence found back from its token ids."""
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    sentence = {tuple(tok(s)["input_ids"]): s for _, s in SENTENCES}
    return [(ex["labels"], sentence[tuple(ex["input_ids"])]) for ex in dm.splits[split]]


def _write(path, rows: list[dict]) -> str:
    """rows (dicts, None = empty cell / null) as csv, tsv, json (an array), jsonl or parquet, by suffix."""
    suffix = path.suffix
    if suffix in (".csv", ".tsv"):
        sep = "," if suffix == ".csv" else "\t"
        cols = list(rows[0])
        lines = [sep.join(cols)] + [sep.join("" if r.get(c) is None else str(r[c]) for c in cols) for r in rows]
        path.write_text("\n".join(lines) + "\n")
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in rows))
    else:
        Dataset.from_list(rows, features=Features({"label": Value("string"), "sentence": Value("string")})).to_parquet(
            str(path))
    return str(path)


def _rows_with_gaps() -> list[dict]:
    rows = [{"label": NAMES[y], "sentence": s} for y, s in SENTENCES]
    rows[1]["sentence"] = None   # row 2: an empty cell / a missing key / null
    rows[4]["sentence"] = "   "  # row 5: only whitespace
    rows[7]["label"] = None      # row 8: no label
    return rows


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".json", ".jsonl", ".parquet"])
def test_rows_with_empty_text_or_label_are_dropped_with_one_counted_warning(tiny_bert_dir, tmp_path, suffix):
    path = _write(tmp_path / f"reviews{suffix}", _rows_with_gaps())
    dm = TextClassificationDataModule(backbone=tiny_bert_dir, train_file=path, val_fraction=0.25, num_classes=2,
                                      seed=0)
    (message,) = _setup_warnings(dm)  # one warning for the file, not one per row
    assert message.startswith(f"{path}: dropped 3 of 12 rows with a missing or empty 'sentence' or 'label'")
    assert "rows 2, 5, 8;" in message and "on_bad_rows: error" in message
    kept = [(y, s) for i, (y, s) in enumerate(SENTENCES) if i not in (1, 4, 7)]
    got = _decoded(dm, tiny_bert_dir, "train") + _decoded(dm, tiny_bert_dir, "val")
    assert sorted(got) == sorted(kept)  # every kept row, with its label: "negative" → 0, "positive" → 1 (sorted)
    assert dm.label_names == ["negative", "positive"]


def test_policy_error_names_the_file_the_count_and_the_rows(tiny_bert_dir, tmp_path):
    # the file: a TSV with label/sentence columns and one empty sentence (was a tokenizer TypeError)
    path = write_tsv(tmp_path / "reviews.tsv", [(1, "a good film"), (0, ""), (1, "lovely"), (0, "dull")])
    with pytest.raises(BadDataError) as err:
        _dm(tiny_bert_dir, path, num_classes=2, on_bad_rows="error", val_fraction=0.5)
    assert str(err.value).startswith(f"{path}: 1 of 4 rows with a missing or empty 'sentence' or 'label' (row 2;")
    assert "on_bad_rows: drop" in str(err.value)
    with pytest.raises(ValueError, match="on_bad_rows='skip': choose one of drop, error"):
        TextClassificationDataModule(backbone=tiny_bert_dir, train_file=path, on_bad_rows="skip")


def test_a_gap_in_an_integer_label_column_keeps_integer_ids(tiny_bert_dir, tmp_path):
    """pandas reads an integer column with an empty cell as floats: 1.0 is still the id 1."""
    path = _write(tmp_path / "train.tsv", [{"label": y, "sentence": s} for y, s in SENTENCES[:6]] +
                  [{"label": None, "sentence": "great fun"}])
    dm = TextClassificationDataModule(backbone=tiny_bert_dir, train_file=path, val_file=path, num_classes=2)
    assert len(_setup_warnings(dm)) == 2  # once per file (here the same file as train and validation)
    assert dm.label_names is None
    assert _decoded(dm, tiny_bert_dir, "val") == SENTENCES[:6]


def test_hub_style_dataset_folder_gets_the_same_policy(tiny_bert_dir, tmp_path):
    folder = tmp_path / "reviews"
    folder.mkdir()
    rows = _rows_with_gaps()
    _write(folder / "train.csv", rows)
    _write(folder / "validation.csv", rows[:6])
    dm = TextClassificationDataModule(backbone=tiny_bert_dir, dataset=str(folder), num_classes=2)
    messages = _setup_warnings(dm)
    assert [m.split(":")[0] for m in messages] == [f"{folder}[train]", f"{folder}[validation]"]
    assert "dropped 3 of 12 rows" in messages[0] and "(rows 2, 5, 8;" in messages[0]
    assert "dropped 2 of 6 rows" in messages[1] and "(rows 2, 5;" in messages[1]
    assert len(dm.splits["train"]) == 9 and len(dm.splits["val"]) == 4


def test_filter_bad_rows_is_one_shared_function():
    ds = Dataset.from_dict({"text": ["a", "", None, "b", "c"], "label": [0, 1, 1, None, 0], "extra": [None] * 5})
    with pytest.warns(BadRowsWarning, match=r"^toy\[train\]: dropped 3 of 5 rows .* \(rows 2, 3, 4;"):
        kept = filter_bad_rows(ds, ["text", "label"], "toy[train]")
    assert kept["text"] == ["a", "c"] and kept["label"] == [0, 0]  # "extra" is not a needed column
    many = Dataset.from_dict({"text": [""] * 9})
    with pytest.raises(BadDataError, match=r"rows 1, 2, 3, 4, 5, \.\.\. \(\+4 more\)"):
        filter_bad_rows(many, ["text"], "many", policy="error")


def test_label_vocabulary_sorted_given_or_numeric(tiny_bert_dir, tmp_path):
    rows = [{"label": NAMES[y], "sentence": s} for y, s in SENTENCES]
    path = _write(tmp_path / "train.jsonl", rows)
    given = _dm(tiny_bert_dir, path, labels=["positive", "negative"], num_classes=2, val_fraction=0.25)
    assert given.label_names == ["positive", "negative"]
    decoded = _decoded(given, tiny_bert_dir)
    assert len(decoded) == 9 and set(decoded) <= {(1 - y, s) for y, s in SENTENCES}  # "positive" → 0
    # "1" / "0" as strings (json) and " 10" with stray spaces: names in numeric order
    numeric = [{"label": [" 10", "2", "1"][i % 3], "sentence": s} for i, (_, s) in enumerate(SENTENCES)]
    dm = _dm(tiny_bert_dir, _write(tmp_path / "numeric.json", numeric), num_classes=3, val_fraction=0.25)
    assert dm.label_names == ["1", "2", "10"]
    by_text = {s: {" 10": 2, "2": 1, "1": 0}[r["label"]] for r, (_, s) in zip(numeric, SENTENCES)}
    assert all(by_text[s] == y for y, s in _decoded(dm, tiny_bert_dir))


@pytest.mark.parametrize(
    "train, val, num_classes, expected",
    [
        # a validation label the training data never had
        ({1: "positive", 0: "negative"}, {1: "positive", 0: "neutral"}, 2,
         r"dev.tsv: labels 'neutral' \(3 rows\) are not in the label vocabulary \[negative, positive\].*"
         r"data.labels: \[negative, positive, neutral\]"),
        # an id outside 0..C-1
        ({1: 1, 0: 0}, {1: 2, 0: 0}, 2, r"dev.tsv: label ids 2 \(3 rows\) are outside 0..1 \(model.num_classes=2\)"),
        # num_classes that is not the number of distinct labels (names, then integer ids)
        ({1: "positive", 0: "negative"}, None, 3,
         r"train.tsv: 2 distinct labels \[negative, positive\] but model.num_classes=3: set model.num_classes: 2"),
        ({1: 1, 0: 0}, None, 3, r"train.tsv: 2 distinct label ids \[0, 1\] but model.num_classes=3: .*"
                                r"data.labels: \[0, 1, 2\]"),
        # a text label in a validation file whose training labels are integer ids
        ({1: 1, 0: 0}, {1: "pos", 0: 0}, 2, r"dev.tsv: labels 'pos' \(3 rows\) are not class ids"),
    ],
)
def test_label_mismatches_name_the_value_the_file_and_the_fix(tiny_bert_dir, tmp_path, train, val, num_classes,
                                                              expected):
    """A row whose label is not a class is a bad row (dropped with a counted warning, or the error with policy
    error); a num_classes that disagrees with the labels is always an error."""
    train_path = write_tsv(tmp_path / "train.tsv", [(train[y], s) for y, s in SENTENCES])
    val_path = write_tsv(tmp_path / "dev.tsv", [(val[y], s) for y, s in SENTENCES[:6]]) if val else None
    kw = dict(backbone=tiny_bert_dir, train_file=train_path, val_file=val_path, val_fraction=0.25,
              num_classes=num_classes)
    with pytest.raises(BadDataError, match=expected):
        TextClassificationDataModule(on_bad_rows="error", **kw).setup()
    if val is None:  # configuration, not rows: an error whatever the policy
        with pytest.raises(BadDataError, match=expected):
            TextClassificationDataModule(**kw).setup()
        return
    dm = TextClassificationDataModule(**kw)
    (message,) = _setup_warnings(dm)
    problem = expected.split(": ", 1)[1].split(".*")[0]
    assert re.match(rf"{re.escape(val_path)}: dropped 3 of 6 rows with a label that is not a class: {problem}", message)
    bad = [i for i, (y, _) in enumerate(SENTENCES[:6]) if val[y] not in train.values()]
    assert f"(rows {', '.join(str(i + 1) for i in bad)}; row 1 = the first data row)" in message
    assert _decoded(dm, tiny_bert_dir, "val") == [row for i, row in enumerate(SENTENCES[:6]) if i not in bad]


def test_given_labels_fix_a_class_the_training_file_lacks(tiny_bert_dir, tmp_path):
    train = write_tsv(tmp_path / "train.tsv", [("positive" if y else "negative", s) for y, s in SENTENCES])
    dm = _dm(tiny_bert_dir, train, labels=["negative", "neutral", "positive"], num_classes=3, val_fraction=0.25)
    assert {ex["labels"] for ex in dm.splits["train"]} == {0, 2}
    with pytest.raises(BadDataError, match="data.labels names 3 classes .* but model.num_classes=2"):
        _dm(tiny_bert_dir, train, labels=["negative", "neutral", "positive"], num_classes=2, val_fraction=0.25)


def test_images_with_a_missing_image_or_label_are_dropped(tmp_path):
    from PIL import Image as PILImage

    pictures = [PILImage.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(6)]
    features = Features({"image": Image(), "label": ClassLabel(names=["cat", "dog"])})
    rows = {"image": pictures[:2] + [None] + pictures[3:], "label": [0, 1, 0, None, 1, 0]}
    folder = tmp_path / "pets"
    folder.mkdir()
    Dataset.from_dict(rows, features=features).to_parquet(str(folder / "train.parquet"))
    Dataset.from_dict({"image": pictures[:2], "label": [1, 0]}, features=features).to_parquet(
        str(folder / "validation.parquet"))
    dm = ImageClassificationDataModule(dataset=str(folder), backbone=TINY_TIMM, image_size=16, num_classes=2,
                                       augment=False)
    (message,) = _setup_warnings(dm)
    assert message.startswith(f"{folder}[train]: dropped 2 of 6 rows with a missing or empty 'image' or 'label' "
                              "(rows 3, 4;")
    assert dm.label_names == ["cat", "dog"]  # the ClassLabel's own names and order
    assert [ex["labels"] for ex in dm.splits["train"]] == [0, 1, 1, 0]
    assert dm.splits["val"][0]["pixel_values"].shape == (3, 16, 16)
    with pytest.raises(BadDataError, match=r"rows 3, 4;"):
        ImageClassificationDataModule(dataset=str(folder), backbone=TINY_TIMM, num_classes=2,
                                      on_bad_rows="error").setup()


def test_label_names_travel_with_checkpoint_and_adapter_and_come_back_at_predict(tiny_bert_dir, tmp_path):
    """Trained with labels given in a non-sorted order, then validated / predicted through a datamodule that
    would build the sorted vocabulary: the checkpoint's vocabulary wins, and predictions are names."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lora_lightning import LoRAModule, read_adapter_labels
    from lora_lightning.callbacks import AdapterCheckpoint

    rows = [(NAMES[y], s) for y, s in SENTENCES]
    path = write_tsv(tmp_path / "train.tsv", rows)
    kw = dict(backbone=tiny_bert_dir, train_file=path, val_file=path, num_classes=2, batch_size=4)
    module_kw = dict(backbone=tiny_bert_dir, num_classes=2, lr=0.01, warmup=0, init_seed=0)
    torch.manual_seed(0)
    callbacks = [ModelCheckpoint(dirpath=tmp_path / "ckpt"), AdapterCheckpoint(dirpath=tmp_path / "adapter")]
    trainer = cpu_trainer(max_epochs=20, check_val_every_n_epoch=20, enable_checkpointing=True, callbacks=callbacks)
    model = LoRAModule(**module_kw)
    trainer.fit(model, TextClassificationDataModule(labels=["positive", "negative"], **kw))
    assert model.label_names == ["positive", "negative"]
    assert trainer.callback_metrics["val_acc"] >= 0.9  # the 12 training sentences, learnt (11 or 12 by shuffle)
    assert model.model.config.id2label == {0: "positive", 1: "negative"}
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    assert torch.load(ckpt, weights_only=True)["label_names"] == ["positive", "negative"]
    assert read_adapter_labels(tmp_path / "adapter" / "last") == ["positive", "negative"]

    fresh = TextClassificationDataModule(**kw)  # would map "negative" → 0 (sorted)
    (metrics,) = cpu_trainer().validate(LoRAModule(**module_kw), fresh, ckpt_path=str(ckpt), verbose=False)
    assert fresh.label_names == ["positive", "negative"]
    assert metrics["val_acc"] >= 0.9  # a swapped vocabulary would score ≤ 0.1
    batches = cpu_trainer().predict(LoRAModule(**module_kw), TextClassificationDataModule(**kw), ckpt_path=str(ckpt))
    predicted = [name for batch in batches for name in batch]
    assert sum(p == y for p, (y, _) in zip(predicted, rows)) >= 0.9 * len(rows)


def test_cli_reports_a_bad_data_file_in_one_line(tiny_bert_dir, tmp_path, capsys):
    from lora_lightning.cli import main

    path = write_tsv(tmp_path / "reviews.tsv", [(1, "a good film"), (0, ""), (1, "lovely"), (0, "dull")])
    args = ["fit", f"--model.backbone={tiny_bert_dir}", "--model.num_classes=2", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--data=lora_lightning.data.TextClassificationDataModule", f"--data.train_file={path}",
            "--data.val_fraction=0.5", "--data.on_bad_rows=error"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert str(exit_info.value.code).startswith(f"lora-lightning: {path}: 1 of 4 rows with a missing or empty")


def test_a_file_that_cannot_be_parsed_names_the_file_and_the_line(tiny_bert_dir, tmp_path):
    path = tmp_path / "reviews.tsv"
    path.write_text("label\tsentence\n1\ta good film\n0\tbad\tstray field\n")
    with pytest.raises(BadDataError, match=rf"^{path} cannot be read as tsv: ParserError: .*Expected 2 fields in line 3"):
        _dm(tiny_bert_dir, path, num_classes=2)


# -- at scale: non-UTF-8 files, truncation, Arrow-batched checks, the tokenising cache -----------------------------


@pytest.mark.parametrize("suffix", [".tsv", ".jsonl"])
def test_a_file_that_is_not_utf8_is_one_error_naming_the_byte_and_the_line_or_reads_with_its_encoding(
        tiny_bert_dir, tiny_llama_dir, tmp_path, suffix):
    from lora_lightning.data import CausalLMDataModule
    from lora_lightning.data.common import load_any, load_files

    lines = ["a good film", "the acting is very good", "un film trop long, caf\xe9 froid", "lovely"]
    path = tmp_path / f"latin1{suffix}"
    if suffix == ".tsv":
        body = "label\tsentence\n" + "".join(f"{i % 2}\t{s}\n" for i, s in enumerate(lines))
        dm = TextClassificationDataModule(backbone=tiny_bert_dir, train_file=str(path), val_fraction=0.5, num_classes=2)
        line = 4  # the header, then rows 1-3: the third data row
    else:
        body = "".join(json.dumps({"text": s}, ensure_ascii=False) + "\n" for s in lines)
        dm = CausalLMDataModule(backbone=tiny_llama_dir, train_file=str(path), val_fraction=0.5)
        line = 3
    path.write_bytes(body.encode("latin-1"))  # é is the one byte 0xe9: not UTF-8
    offset = body.encode("latin-1").index(b"\xe9")
    with pytest.raises(BadDataError) as err:
        dm.setup("fit")
    assert str(err.value) == (
        f"{path} is not utf-8 text: byte e9 at offset {offset} (line {line}). Re-encode it as UTF-8 (if it was "
        f"saved as Latin-1 / Windows-1252: iconv -f latin1 -t utf-8 {path} > utf8-{path.name}) or set data.encoding to its "
        "encoding (e.g. latin-1)")
    column = "sentence" if suffix == ".tsv" else "text"
    assert load_files({"train": str(path)}, encoding="latin-1")["train"][column] == lines
    folder = tmp_path / "folder"  # a dataset folder (data.dataset): the same check, the same option
    folder.mkdir()
    (folder / f"train{suffix}").write_bytes(path.read_bytes())
    with pytest.raises(BadDataError, match=rf"^{folder}/train{suffix} is not utf-8 text: byte e9 at offset {offset} "):
        load_any(str(folder))
    assert load_any(str(folder), encoding="latin-1")["train"][column] == lines


def test_rows_longer_than_max_length_are_truncated_and_counted_in_one_warning(tiny_bert_dir, tmp_path):
    path = write_tsv(tmp_path / "reviews.tsv", SENTENCES)  # rows 3 and 6 have 8 and 11 words: 10 and 13 tokens
    dm = TextClassificationDataModule(backbone=tiny_bert_dir, train_file=path, val_file=path, num_classes=2,
                                      max_length=9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dm.setup()
    from lora_lightning.data.rows import TruncatedRowsWarning

    messages = [str(w.message) for w in caught if issubclass(w.category, TruncatedRowsWarning)]
    expected = (f"{path}: truncated 2 of 12 rows longer than max_length=9 tokens (longest: 13 tokens; rows 3, 6; row 1 "
                "= the first data row). Raise data.max_length to keep them whole")
    assert messages == [expected, expected]  # once per split (train and validation are the same file here)
    lengths = [len(ex["input_ids"]) for ex in dm.splits["val"]]
    assert lengths[2] == lengths[5] == 9 and max(lengths) == 9  # truncated, still ending with [SEP]
    assert dm.splits["val"][5]["input_ids"][-1] == dm.tokenizer.sep_token_id
    assert set(dm.splits["val"].column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}


def test_bad_row_checks_read_arrow_batches_with_the_same_rules_as_is_empty(monkeypatch):
    from lora_lightning.data import rows as rows_module

    monkeypatch.setattr(rows_module, "BATCH", 3)  # several batches: positions carry across them
    values = {
        "text": ["a", " \t", None, "b", "", "c", "d"],
        "number": [1.0, 2.0, float("nan"), None, 3.0, 4.0, 5.0],
        "tokens": [[1], [2], [3], [], None, [4], [5]],
        "turn": [{"role": "user"}, {"role": "user"}, None, {"role": "x"}, {"role": "y"}, {"role": "z"}, None],
    }
    ds = Dataset.from_dict(values)
    for column, column_values in values.items():
        expected = [i for i, v in enumerate(column_values) if rows_module.is_empty(v)]
        assert rows_module.bad_rows(ds, [column]).tolist() == expected, column
    assert rows_module.bad_rows(ds, list(values)).tolist() == [1, 2, 3, 4, 6]


def test_tokenising_is_cached_a_second_setup_reuses_it_and_shows_progress(tiny_bert_dir, tmp_path, monkeypatch, capfd):
    """The batched map writes datasets' Arrow cache; a fresh datamodule (as in a second run) with the same file,
    tokenizer and settings loads it without tokenising; another max_length tokenises again. The progress bar is
    not hidden by the CLI's console quieting."""
    import datasets

    from lora_lightning.console import quiet_console
    from lora_lightning.data import text as text_module

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    calls = []
    count = text_module.untruncated_lengths
    monkeypatch.setattr(text_module, "untruncated_lengths", lambda *a: calls.append(1) or count(*a))
    quiet_console()
    path = write_tsv(tmp_path / "reviews.tsv", SENTENCES)
    kw = dict(backbone=tiny_bert_dir, train_file=path, val_fraction=0.25, num_classes=2)
    first = _dm(tiny_bert_dir, path, val_fraction=0.25, num_classes=2)
    assert len(calls) == 2  # one batch per split
    assert "tokenize train: 100%" in capfd.readouterr().err
    second = TextClassificationDataModule(**kw)
    second.setup()
    assert len(calls) == 2  # nothing tokenised: both splits came from the cache
    for split in ("train", "val"):
        assert second.splits[split].cache_files == first.splits[split].cache_files
        assert second.splits[split][:] == first.splits[split][:]
    assert str(tmp_path / "cache") in first.splits["train"].cache_files[0]["filename"]
    TextClassificationDataModule(max_length=5, **kw).setup()
    assert len(calls) == 4


def test_images_whose_label_is_not_a_class_are_dropped_or_stop_the_run(tmp_path):
    from PIL import Image as PILImage

    features = Features({"image": Image(), "label": ClassLabel(names=["cat", "dog", "cow"])})
    folder = tmp_path / "farm"
    folder.mkdir()
    pictures = [PILImage.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(5)]
    Dataset.from_dict({"image": pictures, "label": [0, 1, 2, 0, 1]}, features=features).to_parquet(
        str(folder / "train.parquet"))
    kw = dict(dataset=str(folder), backbone=TINY_TIMM, image_size=16, labels=["cat", "dog"], num_classes=2,
              augment=False, val_fraction=0.4)
    dm = ImageClassificationDataModule(**kw)
    (message,) = _setup_warnings(dm)
    assert message.startswith(f"{folder}[train]: dropped 1 of 5 rows with a label that is not a class: labels 'cow' "
                              "(1 row) are not in the label vocabulary [cat, dog] (row 3;")
    assert sorted(ex["labels"] for split in ("train", "val") for ex in dm.splits[split]) == [0, 0, 1, 1]
    with pytest.raises(BadDataError, match=r"labels 'cow' \(1 row\) are not in .* or set data.on_bad_rows: drop"):
        ImageClassificationDataModule(on_bad_rows="error", **kw).setup()


def test_a_json_column_of_mixed_types_is_checked_on_its_decoded_values(tmp_path):
    """datasets stores a jsonl column holding both numbers and strings as json text (its ``Json`` feature)."""
    from lora_lightning.data.common import load_files
    from lora_lightning.data.labels import check_labels
    from lora_lightning.data.rows import number_rows

    rows = [{"sentence": s, "label": y} for s, y in zip("abcde", [1, "pos", None, "  ", 0])]
    path = _write(tmp_path / "mixed.jsonl", rows)
    ds = number_rows(load_files({"train": path})["train"])
    with pytest.warns(BadRowsWarning, match=r"dropped 2 of 5 rows with a missing or empty 'sentence' or 'label' "
                                            r"\(rows 3, 4;"):
        ds = filter_bad_rows(ds, ["sentence", "label"], path)
    with pytest.warns(BadRowsWarning, match=r"dropped 1 of 3 rows with a label that is not a class: labels 'pos' "
                                            r"\(1 row\) are not class ids.* \(row 2;"):
        ds, to_id = check_labels(ds, "label", None, 2, path, "drop")
    assert ds["sentence"] == ["a", "e"] and to_id == {1: 1, 0: 0}
