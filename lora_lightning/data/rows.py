"""Bad rows: one shared policy for every datamodule (drop with a counted warning | error).

A row is *bad* when a column the task needs is missing or empty: null (an empty csv/tsv cell, a json null or
absent key, a parquet / hub-dataset null), NaN, a string of only whitespace, or an empty list; or, for
structured columns, when the datamodule's ``invalid(row)`` gives a reason (a chat turn without a role ...). Real data files
have them, and a tokenizer or a collate function fed one fails far from the cause.

    policy "drop"  (default) remove them, with ONE ``BadRowsWarning`` per source naming the source, the count
                   and the first row numbers
    policy "error" raise ``BadDataError`` with the same facts and the fix

Row numbers count from 1 in the source's own order: 1 is the first data row of a csv/tsv file (the line after
the header), the first line of a jsonl file, the first element of a json array, index 0 of a parquet file or
hub split. Apply the policy to a split as loaded, before any shuffling or subsetting, so the numbers point
into the file. Image-like columns (``datasets.Image``/``Audio``) are only checked for null, never decoded.

Functions on ``datasets.Dataset``; the warning is issued on global rank 0 only (every rank filters alike).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional, Sequence

from datasets import Dataset
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

BAD_ROW_POLICIES = ("drop", "error")
SHOWN_ROWS = 5  # how many row numbers a message lists


class BadDataError(ValueError):
    """A data file or dataset that the run cannot use as it is; the message names the source and the fix."""


class BadRowsWarning(UserWarning):
    """Rows dropped for a missing or empty value (``filter_bad_rows`` with policy "drop")."""


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


def bad_rows(ds: Dataset, columns: Sequence[str]) -> list[int]:
    """0-based indices of the rows of ``ds`` with a missing or empty value in any of ``columns``."""
    absent = [c for c in columns if c not in ds.column_names]
    if absent:
        raise KeyError(f"columns {absent} not in the data (columns: {', '.join(ds.column_names)})")
    table = ds.with_format("arrow")
    bad = [False] * len(ds)
    for column in columns:
        values = table[column]
        if hasattr(ds.features[column], "decode"):  # Image / Audio / Video: null or not, never decoded
            flags = values.is_null().to_pylist()
        else:
            flags = [is_empty(v) for v in values.to_pylist()]
        bad = [a or b for a, b in zip(bad, flags)]
    return [i for i, b in enumerate(bad) if b]


def describe_rows(rows: Sequence[int]) -> str:
    """'rows 3, 8' for 0-based indices [2, 7]; the first ``SHOWN_ROWS`` numbers, then '... (+N more)'."""
    shown = ", ".join(str(i + 1) for i in rows[:SHOWN_ROWS])
    more = f", ... (+{len(rows) - SHOWN_ROWS} more)" if len(rows) > SHOWN_ROWS else ""
    return f"row{'s' if len(rows) > 1 else ''} {shown}{more}"


def filter_bad_rows(
    ds: Dataset,
    columns: Sequence[str],
    source: str,
    policy: str = "drop",
    invalid: Optional[Callable[[dict[str, Any]], Optional[str]]] = None,
) -> Dataset:
    """``ds`` without the rows that have a missing or empty value in ``columns`` (module docstring).

    Args:
        ds: one split, as loaded (row numbers in the messages are its own order).
        columns: the columns the task needs (text, label, image ...).
        source: what to call ``ds`` in messages: the file path, or ``"name[split]"`` for a hub dataset.
        policy: "drop" (warn once, with the count and the first row numbers) or "error" (``BadDataError``).
        invalid: for structured columns, ``invalid(row) -> reason | None`` (rows not empty but unusable).

    Raises:
        BadDataError: policy "error" and bad rows present.
        KeyError: a column is not in ``ds``.
    """
    check_policy(policy)
    rows = bad_rows(ds, columns)
    names = " or ".join(repr(c) for c in columns)
    what = f"a missing or empty {names}"
    if invalid is not None:
        empty = set(rows)
        reasons = {}
        for i, row in enumerate(ds.select_columns(list(columns))):
            if i not in empty and (reason := invalid(row)):
                reasons[i] = reason
        if reasons:
            rows = sorted(empty | set(reasons))
            first = min(reasons)
            what += f", or unusable (row {first + 1}: {reasons[first]})"
    if not rows:
        return ds
    where = f"{len(rows)} of {len(ds)} rows with {what} ({describe_rows(rows)}; row 1 = the first data row)"
    if policy == "error":
        raise BadDataError(
            f"{source}: {where}. Fill them in or delete them, or set data.on_bad_rows: drop to skip them with a warning"
        )
    rank_zero_warn(f"{source}: dropped {where}. Set data.on_bad_rows: error to stop instead", category=BadRowsWarning)
    drop = set(rows)
    return ds.select([i for i in range(len(ds)) if i not in drop])


__all__ = [
    "BAD_ROW_POLICIES",
    "BadDataError",
    "BadRowsWarning",
    "bad_rows",
    "check_policy",
    "filter_bad_rows",
    "is_empty",
]
