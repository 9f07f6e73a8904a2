"""TextClassificationDataModule: a HF hub dataset or local csv/tsv/json/parquet files, tokenized with the
backbone's tokenizer, batched with dynamic padding (each batch padded to its longest sequence).

Each split as loaded goes through the shared bad-row policy (rows.py: rows with an empty text or label, or a label
that is not a class, are dropped with one counted warning, or are an error), and the label vocabulary (labels.py)
maps its labels to ids. Tokenising is one batched ``map`` into datasets' Arrow cache (bounded memory, a progress
bar, ``num_proc`` processes; a second run with the same file, tokenizer and settings loads the cache: tokenize.py);
rows longer than ``max_length`` tokens are truncated and counted in one warning."""

from __future__ import annotations

from typing import Any, Optional, Union

from ..backbones import load_tokenizer
from .common import SplitDataModule, load_any, load_files, pick_splits, seeded_subset
from .labels import check_labels
from .rows import ROW, BadDataError, check_policy, filter_bad_rows, number_rows, warn_truncated
from .tokenize import LENGTH, fingerprint, untruncated_lengths


class TextClassificationDataModule(SplitDataModule):
    """Sentence (or sentence-pair) classification.

    Args:
        backbone: the model spec; its tokenizer is used (the CLI links ``model.backbone`` here).
        tokenizer: a tokenizer name/path overriding the backbone's.
        dataset / dataset_config: a hub dataset, ``load_dataset(dataset, dataset_config)`` (e.g. glue, sst2),
            or a local folder.
        train_file / val_file / test_file: local files instead (.csv, .tsv, .json, .jsonl, .parquet).
        text_columns: one column, or two for sentence pairs.
        label_column: integer ids, or string labels mapped to ids through the label vocabulary (``labels``, else
            the training split's sorted distinct values); a split without this column (e.g. a test file to predict
            on) has no labels.
        labels: the class names in id order (``[negative, positive]``): fixes the vocabulary, e.g. when the
            training file lacks a class. Saved with the checkpoint and adapter files; predictions come back as names.
        on_bad_rows: "drop" rows with an empty text or label or a label that is not a class, with one warning per
            file naming the count and the first rows, or "error" (lora_lightning.data.rows).
        encoding: of csv / tsv / json files, local or in a folder (other bytes are an error naming the byte and its
            line).
        train_split / val_split / test_split: split names; val_split None = "validation" if present, else a
            seeded ``val_fraction`` of train; test_split None = the validation split.
        max_length: truncation length in tokens (truncated rows are counted in one warning per split).
        num_proc: processes for tokenising (datasets' ``map``); None = this process.
        train_size: a fixed random subset of the training split (the same for the same ``seed``).
        num_classes: checked against the labels (the CLI links ``model.num_classes`` here).
    """

    def __init__(
        self,
        backbone: Optional[str] = None,
        tokenizer: Optional[str] = None,
        dataset: Optional[str] = None,
        dataset_config: Optional[str] = None,
        train_file: Optional[str] = None,
        val_file: Optional[str] = None,
        test_file: Optional[str] = None,
        text_columns: Union[str, list[str]] = "sentence",
        label_column: str = "label",
        labels: Optional[list[Union[str, int]]] = None,
        on_bad_rows: str = "drop",
        encoding: str = "utf-8",
        train_split: str = "train",
        val_split: Optional[str] = None,
        test_split: Optional[str] = None,
        val_fraction: float = 0.1,
        max_length: int = 128,
        num_proc: Optional[int] = None,
        train_size: Optional[int] = None,
        seed: int = 42,
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        num_classes: Optional[int] = None,
    ) -> None:
        super().__init__()
        if (dataset is None) == (train_file is None):
            raise ValueError("give either data.dataset (a hub name or folder) or data.train_file (local files)")
        if tokenizer is None and backbone is None:
            raise ValueError("no tokenizer: set data.backbone (the CLI links model.backbone) or data.tokenizer")
        check_policy(on_bad_rows)
        self.save_hyperparameters()
        self.text_columns = [text_columns] if isinstance(text_columns, str) else list(text_columns)
        if not 1 <= len(self.text_columns) <= 2:
            raise ValueError(f"text_columns must name one column or a pair, got {self.text_columns}")
        self.tokenizer: Any = None
        self.splits: dict[str, Any] = {}
        self.collate: Any = None

    def _load(self) -> tuple[dict[str, Any], dict[str, str], tuple[str, Optional[str], Optional[str]]]:
        """The splits as loaded, with bad rows handled; what each is called in messages (its file, or
        ``dataset[split]``); the names of the train/val/test splits."""
        h = self.hparams
        if h.train_file is not None:
            files = {"train": h.train_file, "validation": h.val_file, "test": h.test_file}
            files = {k: v for k, v in files.items() if v is not None}
            splits, sources = dict(load_files(files, h.encoding)), dict(files)
            chosen = ("train", "validation" if h.val_file else None, "test" if h.test_file else None)
        else:
            splits = dict(load_any(h.dataset, h.dataset_config, h.encoding))
            sources = {name: f"{h.dataset}[{name}]" for name in splits}
            chosen = (h.train_split, h.val_split, h.test_split)
        for name, ds in splits.items():
            if name not in {chosen[0], chosen[1] or "validation", chosen[2]}:
                continue  # not used (e.g. GLUE's unlabelled test split): not checked
            missing = [c for c in self.text_columns if c not in ds.column_names]
            if missing:
                raise BadDataError(
                    f"{sources[name]}: text column {missing[0]!r} not found; columns: {', '.join(ds.column_names)} "
                    "(set data.text_columns)"
                )
            needed = self.text_columns + ([h.label_column] if h.label_column in ds.column_names else [])
            splits[name] = filter_bad_rows(number_rows(ds), needed, sources[name], h.on_bad_rows)
        return splits, sources, chosen

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        from transformers import DataCollatorWithPadding

        h = self.hparams
        self.tokenizer = load_tokenizer(h.tokenizer or h.backbone)
        loaded, sources, (train, val, test) = self._load()
        self.label_names = self._vocabulary(loaded[train], h.label_column, sources[train])  # the whole training split
        to_id = {}  # per loaded split: raw label value → class id
        for name, ds in loaded.items():
            if name in (train, val or "validation", test) and h.label_column in ds.column_names:
                loaded[name], to_id[name] = check_labels(ds, h.label_column, self.label_names, h.num_classes,
                                                         sources[name], h.on_bad_rows)
        picked = pick_splits(loaded, train, val, test, h.val_fraction, h.seed)
        picked["train"] = seeded_subset(picked["train"], h.train_size, h.seed)
        val = val or ("validation" if "validation" in loaded else None)
        origin = {"train": train, "val": val or train, "test": test or val or train}  # the loaded split of each
        val_source = sources[val] if val else f"{sources[train]} (the held-out val_fraction)"
        where = {"train": sources[train], "val": val_source, "test": sources[test] if test else val_source}
        done: dict[int, Any] = {}  # the test split is often the validation split itself
        for name, ds in picked.items():
            if id(ds) not in done:
                done[id(ds)] = self._tokenize(ds, name, where[name], to_id.get(origin[name]))
            self.splits[name] = done[id(ds)]
        self.collate = DataCollatorWithPadding(self.tokenizer)

    def _tokenize(self, ds: Any, name: str, source: str, to_id: Optional[dict]) -> Any:
        """``ds`` tokenised (input_ids, attention_mask ..., labels) in one cached, batched ``map``; truncated rows
        counted in one warning (rows.py ``warn_truncated``)."""
        h = self.hparams
        tokenizer, columns, limit = self.tokenizer, self.text_columns, h.max_length
        label = h.label_column if to_id is not None else None

        def encode(batch: dict[str, list]) -> dict[str, list]:
            texts = [[t if isinstance(t, str) else str(t) for t in batch[c]] for c in columns]
            out = dict(tokenizer(*texts, truncation=True, max_length=limit))
            out[LENGTH] = untruncated_lengths(tokenizer, texts, out["input_ids"], limit)
            if label is not None:
                out["labels"] = [to_id[v] for v in batch[label]]
            return out

        encoded = ds.map(
            encode, batched=True, remove_columns=[c for c in ds.column_names if c != ROW], num_proc=h.num_proc,
            desc=f"tokenize {name}", new_fingerprint=fingerprint(ds, tokenizer, "text-classification/1", columns,
                                                                 limit, label, to_id),
        )
        warn_truncated(encoded, LENGTH, source, limit)
        return encoded.remove_columns([ROW, LENGTH])
