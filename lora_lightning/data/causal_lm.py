"""CausalLMDataModule: chat, instruction or plain-text data (local json / jsonl / parquet / csv files or a hub
dataset) tokenised for causal-LM fine-tuning, optionally packed; prompts for generation.

Formats, label masking and templates: ``lora_lightning.data.formats``. Packing: ``lora_lightning.data.packing``.

Pipeline of ``setup``: load the splits → drop bad rows (missing / empty fields, malformed chat turns;
``on_bad_rows: error`` stops instead; ``lora_lightning.data.rows``) → pick train / val / test (a seeded
``val_fraction`` of train when there is no validation split) → tokenise (one batched ``map`` into datasets'
Arrow cache: bounded memory, a progress bar, ``num_proc`` processes, reused by a second run with the same file,
tokenizer and settings; ``max_length`` truncation counted in one warning naming the first rows) → drop examples
with no target token left (counted) → pack (``packing: true``; in memory). What happened is printed once per
split and kept in ``self.stats``.

Batches (padded on the right to the longest example of the batch):
    unpacked   input_ids, attention_mask, labels
    packed     input_ids, labels, position_ids (no attention_mask: see packing.py)
    predict    input_ids + attention_mask padded on the LEFT (generation appends on the right), index

A tokenizer without a pad token pads with its EOS (else UNK) token: no new token, no embedding resize
(``lora_lightning.backbones.load_tokenizer``); padded positions are masked by the attention mask and −100.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from datasets import Dataset
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from ..backbones import load_tokenizer
from ..generation import pad_left
from .common import SplitDataModule, load_any, load_files, pick_splits, seeded_subset
from .formats import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    Columns,
    detect_format,
    encode_example,
    encode_prompt,
    invalid_messages,
    required_columns,
)
from .packing import collate_packed, fill_ratio, pack_examples
from .rows import ROW, check_policy, describe_rows, filter_bad_rows, number_rows, source_rows, warn_truncated
from .tokenize import LENGTH, fingerprint


def pad_right(rows: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, Tensor]:
    """Training / evaluation batch: input_ids (pad), attention_mask (0 on pads), labels (−100 on pads)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.as_tensor(r["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.as_tensor(r["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class _Collate:
    """A picklable collate function (DataLoader workers) over the pad id."""

    def __init__(self, fn: Any, pad_token_id: int) -> None:
        self.fn, self.pad_token_id = fn, pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        return self.fn(rows, self.pad_token_id)


class CausalLMDataModule(SplitDataModule):
    """Causal-LM fine-tuning data: chat, instruction (Alpaca) or plain text.

    Args:
        backbone: the model spec; its tokenizer is used (the CLI links ``model.backbone`` here).
        tokenizer: a tokenizer name/path overriding the backbone's.
        dataset / dataset_config: a hub dataset (``load_dataset(dataset, dataset_config)``) or a local folder.
        train_file / val_file / test_file: local files instead (.json, .jsonl, .parquet, .csv).
        predict_file: prompts for ``lora-lightning predict`` (same formats, answers optional); None = the
            test split (its answers become the references written next to the completions).
        format: "auto" (from the columns: messages → chat, instruction → instruction, text → text), "chat",
            "instruction" or "text".
        messages_column / text_column / instruction_column / input_column / output_column: column names.
        prompt_template: the instruction prompt, a ``str.format`` template over the row's columns (default:
            Alpaca's, with ``{instruction}`` and ``{input}``); "chat" = the tokenizer's chat template.
        prompt_template_no_input: the prompt for rows whose ``input`` is empty; None = Alpaca's no-input prompt
            with the default ``prompt_template``, else ``prompt_template`` itself (``{input}`` → "").
        train_on_prompt: loss on every token (chat: all turns; instruction: the prompt too). Default: the
            assistant turns / the output only.
        add_eos: end instruction outputs and texts with EOS (chat turns end with the template's own marker).
        max_length: tokens per example (longer ones are truncated, counted); with ``packing`` the row length.
        max_prompt_length: the longest prompt kept for generation (its last tokens); None = ``max_length``.
        packing: pack several examples into each row of ``max_length`` tokens (``data.packing``).
        on_bad_rows: "drop" (counted warning naming the file and first rows) or "error".
        encoding: of csv / json files, local or in a folder (other bytes are an error naming the byte and its line).
        num_proc: processes for tokenising (datasets' ``map``); None = this process.
        train_split / val_split / test_split: split names; val_split None = "validation" if present, else a
            seeded ``val_fraction`` of train; test_split None = the validation split.
        train_size / val_size: a fixed random subset (the same for the same ``seed``).
        batch_size / eval_batch_size: examples (or packed rows) per device per batch.
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
        predict_file: Optional[str] = None,
        format: str = "auto",
        messages_column: str = "messages",
        text_column: str = "text",
        instruction_column: str = "instruction",
        input_column: str = "input",
        output_column: str = "output",
        prompt_template: str = ALPACA_PROMPT,
        prompt_template_no_input: Optional[str] = None,
        train_on_prompt: bool = False,
        add_eos: bool = True,
        max_length: int = 1024,
        max_prompt_length: Optional[int] = None,
        packing: bool = False,
        on_bad_rows: str = "drop",
        encoding: str = "utf-8",
        num_proc: Optional[int] = None,
        train_split: str = "train",
        val_split: Optional[str] = None,
        test_split: Optional[str] = None,
        val_fraction: float = 0.05,
        train_size: Optional[int] = None,
        val_size: Optional[int] = None,
        seed: int = 42,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if dataset is not None and train_file is not None:
            raise ValueError("give either data.dataset (a hub name or folder) or data.train_file (local files), not both")
        if dataset is None and train_file is None and predict_file is None:
            raise ValueError("no data: set data.train_file (local files), data.dataset (hub/folder) or data.predict_file")
        if tokenizer is None and backbone is None:
            raise ValueError("no tokenizer: set data.backbone (the CLI links model.backbone) or data.tokenizer")
        if max_length < 2:
            raise ValueError(f"max_length must be ≥ 2 tokens, got {max_length}")
        check_policy(on_bad_rows)
        self.save_hyperparameters()
        if prompt_template_no_input is None:
            no_input = ALPACA_PROMPT_NO_INPUT if prompt_template == ALPACA_PROMPT else prompt_template
            self.hparams["prompt_template_no_input"] = no_input
        self.columns = Columns(messages_column, text_column, instruction_column, input_column, output_column)
        self.tokenizer: Any = None
        self.format: Optional[str] = None
        self.splits: dict[str, Any] = {}
        self.raw: dict[str, Dataset] = {}
        self.stats: dict[str, dict[str, Any]] = {}
        self.sources: dict[str, str] = {}  # what each split is called in messages (its file ...)
        self.collate: Any = None
        self.predict_rows: Optional[Dataset] = None
        self.predict_set: Optional[Dataset] = None
        self._generation_cache: dict[str, list[dict[str, Any]]] = {}

    # -- loading ------------------------------------------------------------------------------------
    def _ensure_tokenizer(self) -> None:
        if self.tokenizer is None:
            h = self.hparams
            self.tokenizer = load_tokenizer(h.tokenizer or h.backbone)

    def _clean(self, ds: Dataset, source: str, with_answer: bool) -> Dataset:
        fmt = detect_format(ds.column_names, self.columns, self.hparams.format)
        if self.format is None:
            self.format = fmt
        elif fmt != self.format:
            raise ValueError(f"{source} is {fmt} data but the training data is {self.format}; use one format")
        invalid = (lambda row: invalid_messages(row[self.columns.messages])) if fmt == "chat" else None
        columns = required_columns(fmt, self.columns, with_answer)
        return filter_bad_rows(number_rows(ds), columns, source, self.hparams.on_bad_rows, invalid)

    def _load_raw(self) -> dict[str, Dataset]:
        h = self.hparams
        if h.train_file is not None:
            files = {"train": h.train_file, "validation": h.val_file, "test": h.test_file}
            files = {k: v for k, v in files.items() if v is not None}
            loaded = load_files(files, h.encoding)
            sources = {k: files[k] for k in loaded}
            train, val, test = "train", ("validation" if h.val_file else None), ("test" if h.test_file else None)
        else:
            loaded = load_any(h.dataset, h.dataset_config, h.encoding)
            sources = {k: f"{h.dataset}[{k}]" for k in loaded}
            train, val, test = h.train_split, h.val_split, h.test_split
            for name in (train, val, test):
                if name is not None and name not in loaded:
                    raise ValueError(f"split {name!r} not in the dataset; available splits: {', '.join(loaded)}")
        wanted = {train, val or "validation", test} & set(loaded)
        cleaned = type(loaded)({k: self._clean(loaded[k], sources[k], with_answer=True) for k in wanted})
        picked = pick_splits(cleaned, train, val, test, h.val_fraction, h.seed)
        val = val or ("validation" if "validation" in loaded else None)
        held = f"{sources[train]} (the held-out val_fraction)"
        self.sources = {"train": sources[train], "val": sources[val] if val else held,
                        "test": sources[test] if test else (sources[val] if val else held)}
        picked["train"] = seeded_subset(picked["train"], h.train_size, h.seed)
        if h.val_size is not None:
            same = picked["test"] is picked["val"]
            picked["val"] = seeded_subset(picked["val"], h.val_size, h.seed)
            picked["test"] = picked["val"] if same else picked["test"]
        return picked

    # -- tokenising ---------------------------------------------------------------------------------
    def _encode(self, ds: Dataset, split: str) -> Dataset:
        h = self.hparams
        tok, fmt, cols = self.tokenizer, self.format, self.columns
        source = self.sources.get(split, f"data[{split}]")
        settings = (h.prompt_template, h.prompt_template_no_input, h.train_on_prompt, h.add_eos, h.max_length)

        def encode(batch: dict[str, list]) -> dict[str, list]:
            out: dict[str, list] = {"input_ids": [], "labels": [], LENGTH: [], "n_targets": []}
            for values in zip(*batch.values()):
                enc = encode_example(tok, dict(zip(batch, values)), fmt, cols, *settings)
                out["input_ids"].append(enc.input_ids)
                out["labels"].append(enc.labels)
                out[LENGTH].append(enc.length if enc.truncated else 0)
                out["n_targets"].append(enc.n_targets)
            return out

        encoded = ds.map(
            encode, batched=True, remove_columns=[c for c in ds.column_names if c != ROW], num_proc=h.num_proc,
            desc=f"tokenize {split}", new_fingerprint=fingerprint(ds, tok, "causal-lm/1", fmt, cols, settings),
        )
        truncated = warn_truncated(encoded, LENGTH, source, h.max_length)
        kept = encoded.filter(lambda n: [k > 0 for k in n], input_columns="n_targets", batched=True,
                              desc=f"drop empty {split}")
        stats = {"examples": len(ds), "truncated": truncated, "no_target": len(encoded) - len(kept)}
        if stats["no_target"]:
            counts = encoded.with_format("arrow")["n_targets"].to_numpy()  # one int per example
            rows = describe_rows(source_rows(encoded, np.flatnonzero(counts == 0)))
            rank_zero_warn(
                f"{source}: dropped {stats['no_target']} of {len(ds)} examples with no target token "
                f"{'after truncation to max_length=' + str(h.max_length) + ' ' if truncated else ''}({rows}; row 1 = "
                "the first data row; chat rows need an assistant turn; a long prompt can leave no room for the answer)"
            )
        kept = kept.remove_columns([ROW, LENGTH, "n_targets"])
        if len(kept) == 0:
            raise ValueError(f"data[{split}]: no example has a target token left; see the warnings above")
        if h.packing:
            rows = pack_examples(zip(kept["input_ids"], kept["labels"]), h.max_length)
            stats.update(packed_rows=len(rows), fill=round(fill_ratio(rows, h.max_length), 4))
            kept = Dataset.from_list(rows)
        stats["rows"] = len(kept)
        self.stats[split] = stats
        rank_zero_info(f"data[{split}] ({self.format}): {stats}")
        return kept

    def setup(self, stage: Optional[str] = None) -> None:
        self._ensure_tokenizer()
        pad = self.tokenizer.pad_token_id
        if stage == "predict":
            self._setup_predict()
            return
        if self.splits:
            return
        h = self.hparams
        if h.train_file is None and h.dataset is None:
            raise ValueError(f"stage {stage!r} needs training data: set data.train_file or data.dataset")
        self.raw = self._load_raw()
        done: dict[int, Dataset] = {}  # the test split is often the validation split itself
        for name, ds in self.raw.items():
            if id(ds) not in done:
                done[id(ds)] = self._encode(ds, name)
            self.splits[name] = done[id(ds)]
        self.collate = _Collate(collate_packed if h.packing else pad_right, pad)

    # -- generation ---------------------------------------------------------------------------------
    def _prompt_rows(self, ds: Dataset) -> Dataset:
        h = self.hparams
        tok, fmt, cols = self.tokenizer, self.format, self.columns
        limit = h.max_prompt_length or h.max_length

        def encode(row: dict[str, Any], index: int) -> dict[str, Any]:
            ids, reference, truncated = encode_prompt(
                tok, row, fmt, cols, h.prompt_template, h.prompt_template_no_input, limit
            )
            return {"input_ids": ids, "reference": reference, "truncated": truncated, "index": index}

        encoded = ds.map(encode, with_indices=True, remove_columns=ds.column_names, desc="tokenize prompts")
        cut = sum(encoded["truncated"])
        if cut:
            rank_zero_warn(f"data[prompts]: {cut} of {len(ds)} prompts were cut to their last {limit} tokens")
        return encoded

    def _setup_predict(self) -> None:
        if self.predict_set is not None:
            return
        self._ensure_tokenizer()
        h = self.hparams
        if h.predict_file is not None:
            ds = load_files({"predict": h.predict_file}, h.encoding)["predict"]
            rows = self._clean(ds, h.predict_file, with_answer=False)
        else:
            if h.train_file is None and h.dataset is None:
                raise ValueError("predict needs prompts: set data.predict_file")
            self.raw = self.raw or self._load_raw()
            rows = self.raw["test"]
        self.predict_rows = rows.remove_columns(ROW)  # the user's columns, written next to the completions
        self.predict_set = self._prompt_rows(self.predict_rows)

    def generation_examples(self, split: str = "val", limit: Optional[int] = None) -> list[dict[str, Any]]:
        """The first ``limit`` (None: all) rows of a split as prompts: {"input_ids", "reference", "index"}
        (used by the ``GenerationSamples`` callback)."""
        if split not in self._generation_cache:
            self._ensure_tokenizer()
            if not self.raw:
                self.setup("fit")
            ds = self.raw[split]
            self._generation_cache[split] = list(self._prompt_rows(ds.select(range(len(ds)))))
        rows = self._generation_cache[split]
        return rows if limit is None else rows[:limit]

    def decode(self, tokens: list[int]) -> str:
        """Generated token ids → text, special tokens (EOS, padding) removed."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def predict_dataloader(self) -> DataLoader:
        self._setup_predict()
        h = self.hparams
        return DataLoader(
            self.predict_set.select_columns(["input_ids", "index"]),
            batch_size=h.eval_batch_size or h.batch_size,
            shuffle=False,
            collate_fn=_Collate(pad_left, self.tokenizer.pad_token_id),
            num_workers=h.num_workers,
        )


__all__ = ["CausalLMDataModule", "pad_left", "pad_right"]
