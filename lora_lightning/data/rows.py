"""Bad rows: one policy for every datamodule (drop with a counted warning | error).

(Minimal version written for the causal-LM datamodule with the same names and signatures as the shared
policy of the text/image datamodules; when both exist, keep one file.)

A row is *bad* when a column the task needs is missing or empty (null, NaN, a blank string, an empty list),
or, for structured columns, when ``invalid(row)`` gives a reason (a chat turn without a role ...).

    policy "drop"  (default) remove them, with ONE ``BadRowsWarning`` per source naming the source, the count
                   and the first row numbers (row 1 = the first data row / jsonl line)
    policy "error" raise ``BadDataError`` with the same facts and the fix

Apply the policy to a split as loaded, before any shuffling or subsetting, so the numbers point into the file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Optional

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
    """``ds`` without the rows that have a missing or empty value in ``columns`` or for which ``invalid(row)``
    returns a reason (module docstring). ``source``: the file path, or ``"name[split]"`` for a hub dataset."""
    check_policy(policy)
    absent = [c for c in columns if c not in ds.column_names]
    if absent:
        raise KeyError(f"columns {absent} not in the data (columns: {', '.join(ds.column_names)})")
    rows: list[int] = []
    reasons: list[str] = []
    for i, row in enumerate(ds.select_columns(list(columns))):
        empty = [c for c in columns if is_empty(row[c])]
        reason = f"missing or empty {', '.join(map(repr, empty))}" if empty else (invalid(row) if invalid else None)
        if reason:
            rows.append(i)
            reasons.append(reason)
    if not rows:
        return ds
    first = f"row {rows[0] + 1}: {reasons[0]}"
    where = f"{len(rows)} of {len(ds)} rows ({describe_rows(rows)}; {first}; row 1 = the first data row)"
    if policy == "error":
        raise BadDataError(
            f"{source}: {where}. Fill them in or delete them, or set data.on_bad_rows: drop to skip them with a warning"
        )
    rank_zero_warn(f"{source}: dropped {where}. Set data.on_bad_rows: error to stop instead", category=BadRowsWarning)
    drop = set(rows)
    return ds.select([i for i in range(len(ds)) if i not in drop])


__all__ = ["BAD_ROW_POLICIES", "BadDataError", "BadRowsWarning", "check_policy", "filter_bad_rows", "is_empty"]
