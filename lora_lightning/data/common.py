"""Shared by the datamodules: load a DatasetDict from a hub name, a folder or local files; pick the
train/val/test splits (a seeded split of train when there is no validation split); a seeded subset.
Bad rows (rows.py) and label vocabularies (labels.py) have their own modules."""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any, Optional

from datasets import Dataset, DatasetDict, load_dataset
from datasets.exceptions import DatasetGenerationError
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from .labels import check_num_classes, label_ids, label_vocabulary, named_counts
from .rows import BadDataError

FILE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_files(files: dict[str, str], encoding: str = "utf-8") -> DatasetDict:
    """Local csv / tsv (tab-separated, via the csv builder) / json / jsonl / parquet files, one per split, text
    files decoded as ``encoding``. Each file is read on its own, so a file that cannot be parsed (a row with too
    many fields, a json type clash) is a ``BadDataError`` naming that file and the parser's reason (with its line
    number). Text files are first checked to decode as ``encoding`` (one sequential read: 0.4 s for 150 MiB), so that
    other bytes are one error naming the first of them and its line, never a late UnicodeDecodeError."""
    suffixes = {Path(f).suffix.lower() for f in files.values()}
    unknown = suffixes - set(FILE_BUILDERS)
    if unknown:
        raise ValueError(f"unsupported data file type {sorted(unknown)}; use one of {', '.join(FILE_BUILDERS)}")
    builders = {FILE_BUILDERS[s] for s in suffixes}
    if len(builders) > 1 or (".tsv" in suffixes and len(suffixes) > 1):
        raise ValueError(f"all data files must have one format, got {sorted(suffixes)}")
    for f in files.values():
        if not Path(f).is_file():
            raise FileNotFoundError(f"data file {f} not found (relative paths start at the working directory)")
    builder = builders.pop()
    kwargs: dict[str, Any] = {"delimiter": "\t"} if suffixes == {".tsv"} else {}
    if not _is_utf8(encoding) and builder != "parquet":
        kwargs["encoding"] = encoding  # only when set, so that the cache of a utf-8 file stays the same
    splits = {}
    for split, f in files.items():
        if builder != "parquet" and first_undecodable(f, encoding):  # pyarrow's json reader does not check
            raise BadDataError(not_decodable(f, encoding))
        try:
            splits[split] = load_dataset(builder, data_files={split: str(f)}, split=split, **kwargs)
        except DatasetGenerationError as err:
            cause = err.__cause__ or err
            raise BadDataError(
                f"{f} cannot be read as {Path(f).suffix.lower()[1:]}: {type(cause).__name__}: {cause}. "
                "Fix or delete that line (every row needs the header's columns, one value type per column)"
            ) from err
    return DatasetDict(splits)


def _is_utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name == "utf-8"


def first_undecodable(path: str, encoding: str = "utf-8") -> Optional[tuple[int, int, bytes]]:
    """(byte offset, line number from 1, the bytes) of the first bytes of ``path`` that are not ``encoding``;
    None if it all decodes. Reads the file in 1 MiB chunks."""
    decoder = codecs.getincrementaldecoder(encoding)()
    offset, line = 0, 1
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(1 << 20)
            pending = decoder.getstate()[0]
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                data = pending + chunk
                return offset - len(pending) + err.start, line + data[: err.start].count(b"\n"), data[err.start:err.end]
            if not chunk:
                return None
            offset += len(chunk)
            line += chunk.count(b"\n")


def not_decodable(path: str, encoding: str = "utf-8") -> str:
    """The message for a text file that is not ``encoding``: where, and the two fixes."""
    found = first_undecodable(path, encoding)
    where = f": byte{'s' if len(found[2]) > 1 else ''} {found[2].hex(' ')} at offset {found[0]} (line {found[1]})" \
        if found else ""
    return (
        f"{path} is not {encoding} text{where}. Re-encode it as UTF-8 (if it was saved as Latin-1 / Windows-1252: "
        f"iconv -f latin1 -t utf-8 {path} > utf8-{Path(path).name}) or set data.encoding to its encoding (e.g. latin-1)"
    )


def load_any(dataset: str, config: Optional[str] = None, encoding: str = "utf-8") -> DatasetDict:
    """A hub dataset (``load_dataset(name, config)``) or a local folder (imagefolder, csv folder ...; its csv /
    json files are first checked to decode as ``encoding``, as in ``load_files``)."""
    kwargs = {} if _is_utf8(encoding) else {"encoding": encoding}
    if Path(dataset).is_dir():
        for path in sorted(Path(dataset).rglob("*")):
            suffix = path.suffix.lower()
            if suffix in FILE_BUILDERS and suffix != ".parquet" and first_undecodable(str(path), encoding):
                raise BadDataError(not_decodable(str(path), encoding))
    loaded = load_dataset(dataset, config, **kwargs)
    if isinstance(loaded, Dataset):
        loaded = DatasetDict({"train": loaded})
    return loaded


def pick_splits(
    splits: DatasetDict,
    train_split: str,
    val_split: Optional[str],
    test_split: Optional[str],
    val_fraction: float,
    seed: int,
) -> dict[str, Dataset]:
    """{"train", "val", "test"}: ``val_split`` None takes "validation" if present, else a seeded
    ``val_fraction`` of train; ``test_split`` None tests on the validation split."""
    available = list(splits)
    for name in (train_split, val_split, test_split):
        if name is not None and name not in splits:
            raise ValueError(f"split {name!r} not in the dataset; available splits: {', '.join(available)}")
    train = splits[train_split]
    if val_split is None and "validation" in splits:
        val_split = "validation"
    if val_split is None:
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"no validation split; set val_split or a val_fraction in (0, 1), got {val_fraction}")
        held = train.train_test_split(test_size=val_fraction, seed=seed)
        train, val = held["train"], held["test"]
    else:
        val = splits[val_split]
    return {"train": train, "val": val, "test": splits[test_split] if test_split else val}


def seeded_subset(ds: Dataset, size: Optional[int], seed: int) -> Dataset:
    """A fixed random ``size`` examples of ``ds`` (the same ones for the same seed); all when None."""
    if size is None or size >= len(ds):
        return ds
    if size <= 0:
        raise ValueError(f"train_size must be positive (got {size}); use null for the whole training set")
    return ds.shuffle(seed=seed).select(range(size))


class SplitDataModule(LightningDataModule):
    """Dataloaders over ``self.splits`` ("train", "val", "test") with ``self.collate``; the subclass's
    ``setup`` fills both. Expects ``batch_size``, ``eval_batch_size``, ``num_workers``, ``labels`` and
    ``num_classes`` hparams.

    The label vocabulary (labels.py) in use is ``label_names`` (None: integer ids); it is this datamodule's
    checkpoint state, and ``set_label_names`` (a checkpoint's vocabulary, or the model's) overrides the one
    built from the data.

    The training loader is torchdata's ``StatefulDataLoader``: Lightning stores its ``state_dict`` (the shuffle
    generator's state and how many samples were yielded) in every checkpoint, so ``fit --ckpt_path last``
    from a mid-epoch checkpoint continues with the next unseen batch: no batch seen twice or skipped.

    The datamodule stores that state too (its own ``state_dict``, restored before the dataloader is built) and
    loads it into the new training loader itself: Lightning drops the loader states it saved when
    ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (LoRAModule's schedule does), because
    the loader is then built before the checkpoint's loop state is restored (Lightning issue #20550)."""

    label_names: Optional[list[str]] = None
    _kept_names: Optional[list[str]] = None
    _train_loader_state: Optional[dict] = None

    def _vocabulary(self, train: Dataset, label_column: str, source: str) -> Optional[list[str]]:
        """The vocabulary to use: the kept one, else ``labels`` / the training split's (labels.py); checked
        against every training label and ``num_classes``."""
        h = self.hparams
        if label_column not in train.column_names:
            raise BadDataError(
                f"{source}: label column {label_column!r} not found; columns: {', '.join(train.column_names)} "
                "(set data.label_column)"
            )
        names = label_vocabulary(train, label_column, h.labels)
        if self._kept_names is not None:
            if h.labels is not None and names != self._kept_names:
                raise BadDataError(
                    f"data.labels {names} differs from the checkpoint's label vocabulary {self._kept_names}: the "
                    "model's class ids follow the checkpoint; remove data.labels or make it equal"
                )
            names = self._kept_names
        if self._kept_names is None:  # rows whose label has no id are the bad-row policy's (check_labels)
            train_ids = label_ids(named_counts(train, label_column), names, h.num_classes)[0].values()
            check_num_classes(names, list(train_ids), h.num_classes, source, given=h.labels is not None)
        return names

    def set_label_names(self, names: Optional[list[str]]) -> None:
        """Use the vocabulary ``names`` (e.g. a checkpoint's) instead of the one built from the data; re-runs
        ``setup`` if it already ran with another one. A row whose label is outside ``names`` is a bad row (labels.py)."""
        self._kept_names = list(names) if names is not None else None
        if self.splits and self._kept_names != self.label_names:
            self.splits = {}
            self.setup()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"label_names": list(self.label_names)} if self.label_names is not None else {}
        trainer = self.trainer
        loader = trainer.train_dataloader if trainer is not None and trainer.state.fn == "fit" else None
        if isinstance(loader, StatefulDataLoader):
            state["train_loader"] = loader.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "label_names" in state_dict:
            self.set_label_names(state_dict["label_names"])
        self._train_loader_state = state_dict.get("train_loader")

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        h = self.hparams
        return (StatefulDataLoader if train else DataLoader)(
            self.splits[split],
            batch_size=h.batch_size if train else (h.eval_batch_size or h.batch_size),
            shuffle=train,
            collate_fn=self.collate,
            num_workers=h.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        loader = self._loader("train", train=True)
        state, self._train_loader_state = self._train_loader_state, None
        if state is not None:  # resuming: continue where the checkpoint was taken
            loader.load_state_dict(state)
            if state.get("_iterator_finished") or state.get("_num_yielded", 0) >= len(loader):
                # saved after the epoch's last batch: the first iterator after loading is that finished epoch
                # (empty); run it out so the next one Lightning opens is the next epoch, shuffled as it would be
                for _ in loader:
                    pass
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
