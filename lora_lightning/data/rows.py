"""Bad rows: one shared policy for every datamodule (drop with a counted warning | error).

A row is *bad* when a column the task needs is missing or empty: null (an empty csv/tsv cell, a json null or
absent key, a parquet / hub-dataset null), NaN, a string of only whitespace, or an empty list; or, for
structured columns, when the datamodule's ``invalid(row)`` gives a reason (a chat turn without a role ...); or,
for classification, when its label is not a class (labels.py: a name outside the vocabulary, an id outside
0..C-1). Real data files have them, and a tokenizer or a collate function fed one fails far from the cause.

    policy "drop"  (default) remove them, with ONE ``BadRowsWarning`` per source and kind naming the source,
                   the count and the first row numbers
    policy "error" raise ``BadDataError`` with the same facts and the fix

A row longer than ``max_length`` tokens is not dropped but truncated, never silently: ``warn_truncated`` gives
ONE ``TruncatedRowsWarning`` per split with the count, the longest length and the first rows, whatever the policy.
A file that is not valid text in its encoding (non-UTF-8 bytes) is a ``BadDataError`` naming the file, the byte
and its line, whatever the policy (common.load_files): a wrong encoding spoils every accented row, not a few.

Row numbers count from 1 in the source's own order: 1 is the first data row of a csv/tsv file (the line after
the header), the first line of a jsonl file, the first element of a json array, index 0 of a parquet file or
hub split. ``number_rows`` adds each row's position as loaded (column ``ROW``), so that the messages still name
the file's rows after rows were dropped and the split was divided or shuffled; without that column a split's
own positions are used. Apply the policy to a split as loaded, before any shuffling or subsetting.

Everything reads the data in Arrow batches of ``BATCH`` rows (pyarrow compute; no whole column as Python
objects), so a 1,000,000-row file is checked in bounded memory. Image-like columns (``datasets.Image``/
``Audio``) are only checked for null, never decoded. Warnings are issued on global rank 0 only (every rank
filters alike).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, Optional, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

BAD_ROW_POLICIES = ("drop", "error")
SHOWN_ROWS = 5  # how many row numbers a message lists
ROW = "__row__"  # number_rows: each row's 0-based position in its source
BATCH = 10_000  # rows per Arrow batch when scanning a split
JSON = getattr(datasets, "Json", type(None))  # datasets ≥ 5: a column of mixed json types, stored as json text


class BadDataError(ValueError):
    """A data file or dataset that the run cannot use as it is; the message names the source and the fix."""


class BadRowsWarning(UserWarning):
    """Rows dropped for a missing, empty or unusable value (policy "drop")."""


class TruncatedRowsWarning(UserWarning):
    """Rows longer than ``max_length`` tokens, truncated (``warn_truncated``)."""


def check_policy(policy: str) -> str:
    """``policy`` if it is one of ``BAD_ROW_POLICIES``, else a ValueError naming them."""
    if policy not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_rows={policy!r}: choose one of {', '.join(BAD_ROW_POLICIES)}")
    return policy


def is_empty(value: Any) -> bool:
    """None, NaN, a blank string or an empty list/dict."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, tuple, dict)):
        return len(value) == 0
    return False


def number_rows(ds: Dataset) -> Dataset:
    """``ds`` with the column ``ROW``: each row's 0-based position as loaded (kept if already there)."""
    if ROW in ds.column_names:
        return ds
    return ds.add_column(ROW, np.arange(len(ds), dtype=np.int64))


def arrow_batches(ds: Dataset, columns: Sequence[str]) -> Iterator[pa.Table]:
    """``columns`` of ``ds`` as Arrow tables of at most ``BATCH`` rows, in order. A split that rows were dropped
    from, or that was shuffled, is a row mapping (``ds._indices``) over the table as loaded; datasets' own
    iteration gathers it one index at a time, this takes each batch in one vectorised call (15× faster on the
    1,000,000-row benchmark file)."""
    table = ds.data.table.select(list(columns))
    indices = ds._indices  # datasets' row mapping after select / shuffle; None: the table's own order
    for start in range(0, len(ds), BATCH):
        yield table.slice(start, BATCH) if indices is None else table.take(indices.column(0).slice(start, BATCH))


def decoded(values: pa.Array, feature: Any) -> list[Any]:
    """The Python values of a ``JSON`` column's Arrow values (json text, null for a json null)."""
    return [feature.decode_example(v) for v in values.to_pylist()]


def _empty(values: pa.ChunkedArray, feature: Any) -> pa.Array:
    """Per value: missing or empty (``is_empty``), computed by Arrow for the common types."""
    if isinstance(feature, JSON):
        return pa.array([is_empty(v) for v in decoded(values, feature)], type=pa.bool_())
    flags = values.is_null()
    kind = values.type
    if hasattr(feature, "decode"):  # Image / Audio / Video: null or not, never decoded
        return flags
    if pa.types.is_floating(kind):
        blank = pc.is_nan(values)
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        blank = pc.equal(pc.utf8_trim_whitespace(values), "")
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        blank = pc.equal(pc.list_value_length(values), 0)
    elif pa.types.is_struct(kind) or pa.types.is_map(kind):
        blank = pa.array([is_empty(v) for v in values.to_pylist()])
    else:
        return flags
    return pc.or_(flags, pc.fill_null(blank, False))


def bad_rows(ds: Dataset, columns: Sequence[str]) -> np.ndarray:
    """0-based positions of the rows of ``ds`` with a missing or empty value in any of ``columns``."""
    absent = [c for c in columns if c not in ds.column_names]
    if absent:
        raise KeyError(f"columns {absent} not in the data (columns: {', '.join(ds.column_names)})")
    found, start = [], 0
    for batch in arrow_batches(ds, columns):
        flags = np.zeros(batch.num_rows, dtype=bool)
        for c in columns:
            flags |= _empty(batch.column(c), ds.features[c]).to_numpy(zero_copy_only=False)
        found.append(np.flatnonzero(flags) + start)
        start += batch.num_rows
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def source_rows(ds: Dataset, positions: np.ndarray) -> np.ndarray:
    """The sorted source row numbers (0-based, column ``ROW`` if present, else the positions) of ``positions``."""
    if ROW not in ds.column_names or len(positions) == 0:
        return np.sort(positions)
    rows = ds.select_columns([ROW]).select(positions).with_format("arrow")[ROW]
    return np.sort(rows.to_numpy())


def describe_rows(rows: Sequence[int]) -> str:
    """'rows 3, 8' for 0-based indices [2, 7]; the first ``SHOWN_ROWS`` numbers, then '... (+N more)'."""
    shown = ", ".join(str(int(i) + 1) for i in rows[:SHOWN_ROWS])
    more = f", ... (+{len(rows) - SHOWN_ROWS} more)" if len(rows) > SHOWN_ROWS else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more}"


def drop_rows(ds: Dataset, positions: np.ndarray, what: str, source: str, policy: str, fix: str) -> Dataset:
    """``ds`` without the rows at ``positions``, with one ``BadRowsWarning`` (policy "drop"), or a
    ``BadDataError`` (policy "error"); both say "{source}: [dropped] N of M rows with {what} (rows ...)", and the
    error adds ``fix``. Dropping every row is an error whatever the policy."""
    check_policy(policy)
    if len(positions) == 0:
        return ds
    rows = source_rows(ds, positions)
    where = f"{len(rows)} of {len(ds)} rows with {what} ({describe_rows(rows)}; row 1 = the first data row)"
    if policy == "error":
        raise BadDataError(f"{source}: {where}. {fix}, or set data.on_bad_rows: drop to skip them with a warning")
    if len(positions) == len(ds):
        raise BadDataError(f"{source}: every row has {what}, nothing is left: {fix}")
    rank_zero_warn(f"{source}: dropped {where}. Set data.on_bad_rows: error to stop instead", category=BadRowsWarning)
    keep = np.ones(len(ds), dtype=bool)
    keep[positions] = False
    return ds.select(np.flatnonzero(keep))


def filter_bad_rows(
    ds: Dataset,
    columns: Sequence[str],
    source: str,
    policy: str = "drop",
    invalid: Optional[Callable[[dict[str, Any]], Optional[str]]] = None,
) -> Dataset:
    """``ds`` without the rows that have a missing or empty value in ``columns`` (module docstring).

    Args:
        ds: one split, as loaded (row numbers in the messages are its own order, or its ``ROW`` column).
        columns: the columns the task needs (text, label, image ...).
        source: what to call ``ds`` in messages: the file path, or ``"name[split]"`` for a hub dataset.
        policy: "drop" (warn once, with the count and the first row numbers) or "error" (``BadDataError``).
        invalid: for structured columns, ``invalid(row) -> reason | None`` (rows not empty but unusable),
            called on every non-empty row, one Arrow batch at a time.

    Raises:
        BadDataError: policy "error" and bad rows present.
        KeyError: a column is not in ``ds``.
    """
    check_policy(policy)
    rows = bad_rows(ds, columns)
    names = " or ".join(repr(c) for c in columns)
    what = f"a missing or empty {names}"
    if invalid is not None:
        empty, reasons, start = set(rows.tolist()), {}, 0
        for batch in ds.select_columns(list(columns)).iter(batch_size=BATCH):  # decoded (e.g. datasets' Json)
            for i, values in enumerate(zip(*batch.values()), start):
                if i not in empty and (reason := invalid(dict(zip(batch, values)))):
                    reasons[i] = reason
            start += len(batch[columns[0]])
        if reasons:
            rows = np.array(sorted(empty | set(reasons)), dtype=np.int64)
            first = min(reasons)
            what += f", or unusable (row {first + 1}: {reasons[first]})"
    return drop_rows(ds, rows, what, source, policy, "Fill them in or delete them")


def warn_truncated(ds: Dataset, column: str, source: str, max_length: int) -> int:
    """One ``TruncatedRowsWarning`` for the rows of ``ds`` whose ``column`` (their length in tokens before
    truncation, 0 when they fit) is not 0: how many, the longest, the first rows; returns how many."""
    count, longest, found, start = 0, 0, [], 0
    for batch in arrow_batches(ds, [column]):
        lengths = batch.column(column).to_numpy()
        cut = np.flatnonzero(lengths > 0)
        if len(cut):
            count += len(cut)
            longest = max(longest, int(lengths[cut].max()))
            found.append(cut + start)
        start += batch.num_rows
    if count:
        rows = source_rows(ds, np.concatenate(found))
        rank_zero_warn(
            f"{source}: truncated {count} of {len(ds)} rows longer than max_length={max_length} tokens (longest: "
            f"{longest} tokens; {describe_rows(rows)}; row 1 = the first data row). Raise data.max_length to keep "
            "them whole", category=TruncatedRowsWarning,
        )
    return count


__all__ = [
    "BAD_ROW_POLICIES",
    "BadDataError",
    "BadRowsWarning",
    "ROW",
    "TruncatedRowsWarning",
    "decoded",
    "bad_rows",
    "check_policy",
    "drop_rows",
    "filter_bad_rows",
    "is_empty",
    "number_rows",
    "warn_truncated",
]
