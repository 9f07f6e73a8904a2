"""TextClassificationDataModule: a HF hub dataset or local csv/tsv/json/parquet files, tokenized with the
backbone's tokenizer, batched with dynamic padding (each batch padded to its longest sequence)."""

from __future__ import annotations

from typing import Any, Optional, Union


from ..backbones import load_tokenizer
from .common import SplitDataModule, check_labels, load_any, load_files, pick_splits, seeded_subset, string_label_ids


class TextClassificationDataModule(SplitDataModule):
    """Sentence (or sentence-pair) classification.

    Args:
        backbone: the model spec; its tokenizer is used (the CLI links ``model.backbone`` here).
        tokenizer: a tokenizer name/path overriding the backbone's.
        dataset / dataset_config: a hub dataset, ``load_dataset(dataset, dataset_config)`` (e.g. glue, sst2),
            or a local folder.
        train_file / val_file / test_file: local files instead (.csv, .tsv, .json, .jsonl, .parquet).
        text_columns: one column, or two for sentence pairs.
        label_column: integer or string labels (strings map to ids in sorted order).
        train_split / val_split / test_split: split names; val_split None = "validation" if present, else a
            seeded ``val_fraction`` of train; test_split None = the validation split.
        max_length: truncation length in tokens.
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
        train_split: str = "train",
        val_split: Optional[str] = None,
        test_split: Optional[str] = None,
        val_fraction: float = 0.1,
        max_length: int = 128,
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
        self.save_hyperparameters()
        self.text_columns = [text_columns] if isinstance(text_columns, str) else list(text_columns)
        if not 1 <= len(self.text_columns) <= 2:
            raise ValueError(f"text_columns must name one column or a pair, got {self.text_columns}")
        self.tokenizer: Any = None
        self.splits: dict[str, Any] = {}
        self.collate: Any = None

    def _raw_splits(self) -> dict[str, Any]:
        h = self.hparams
        if h.train_file is not None:
            files = {"train": h.train_file, "validation": h.val_file, "test": h.test_file}
            splits = load_files({k: v for k, v in files.items() if v is not None})
            train, val, test = "train", ("validation" if h.val_file else None), ("test" if h.test_file else None)
        else:
            splits = load_any(h.dataset, h.dataset_config)
            train, val, test = h.train_split, h.val_split, h.test_split
        picked = pick_splits(splits, train, val, test, h.val_fraction, h.seed)
        picked["train"] = seeded_subset(picked["train"], h.train_size, h.seed)
        return picked

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        from transformers import DataCollatorWithPadding

        h = self.hparams
        self.tokenizer = load_tokenizer(h.tokenizer or h.backbone)
        raw = self._raw_splits()
        for column in self.text_columns:
            if column not in raw["train"].column_names:
                raise ValueError(
                    f"text column {column!r} not found; columns: {', '.join(raw['train'].column_names)} "
                    f"(set data.text_columns)"
                )
        to_id = string_label_ids(raw["train"], h.label_column)

        def encode(batch: dict[str, list]) -> dict[str, list]:
            texts = [batch[c] for c in self.text_columns]
            out = self.tokenizer(*texts, truncation=True, max_length=h.max_length)
            labels = batch[h.label_column]
            out["labels"] = [to_id[y] for y in labels] if to_id else [int(y) for y in labels]
            return out

        done: dict[int, Any] = {}  # the test split is often the validation split itself
        for name, ds in raw.items():
            if id(ds) not in done:
                done[id(ds)] = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"tokenize {name}")
                check_labels(done[id(ds)]["labels"], h.num_classes, name)
            self.splits[name] = done[id(ds)]
        self.collate = DataCollatorWithPadding(self.tokenizer)
