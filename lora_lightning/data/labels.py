"""Label vocabulary: class names ↔ ids for classification data, shared by the datamodules.

The vocabulary is a list of class names; a name's position is its id (the output unit of the head).

    given   ``labels: [negative, positive]`` in the data config (any order you choose)
    ClassLabel   a hub/imagefolder label feature: its own names, in its order
    strings      the training split's distinct values, sorted (numerically when every value is an integer,
                 so "2" < "10"); surrounding whitespace is ignored
    integers     no vocabulary: the values are the ids themselves (0..C-1)

A string label is a name and maps through the vocabulary; an integer label (or an integral float, which is what
a csv column of integers with an empty cell becomes) is an id. The vocabulary is saved with the checkpoint and the
adapter files and used again at validate/test/predict time, so the same name always gets the same id and
predictions come back as names. A row whose label has no id (a name outside the vocabulary, e.g. a validation
label the training split never had, or an id outside 0..C-1) is a bad row (rows.py): dropped with one counted
warning naming the values, the source and the first rows, or with ``on_bad_rows: error`` a ``BadDataError``
naming the values, the source and the fix. A vocabulary (or set of training ids) whose size is not
``num_classes`` is always a ``BadDataError``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import ClassLabel, Dataset

from .rows import JSON, BadDataError, arrow_batches, decoded, drop_rows, is_empty

SHOWN_VALUES = 8


def _preview(values: Sequence[Any]) -> str:
    more = f", ... (+{len(values) - SHOWN_VALUES} more)" if len(values) > SHOWN_VALUES else ""
    return ", ".join(str(v) for v in values[:SHOWN_VALUES]) + more


def _as_id(value: Any) -> Optional[int]:
    """An integer (or an integral float) as an int; None for anything else (bool counts as not an id)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _sorted_names(names: set[str]) -> list[str]:
    try:
        return sorted(names, key=int)  # all integers: numeric order
    except ValueError:
        return sorted(names)


def value_counts(ds: Dataset, column: str) -> Counter:
    """How many rows hold each distinct value of ``column`` (read in Arrow batches; empty values excluded; the
    values of a column of mixed json types as they decode, a list or dict as its text)."""
    counts: Counter = Counter()
    feature = ds.features[column]
    for batch in arrow_batches(ds, [column]):
        if isinstance(feature, JSON):
            counts.update(_hashable(v) for v in decoded(batch.column(column), feature) if not is_empty(v))
            continue
        for item in pc.value_counts(batch.column(column)).to_pylist():
            if not is_empty(item["values"]):
                counts[item["values"]] += item["counts"]
    return counts


def _hashable(value: Any) -> Any:
    return str(value) if isinstance(value, (list, dict)) else value


def _name(value: Any, feature: Any) -> Any:
    """A label as it maps to an id: a ClassLabel id as its name (an id outside it, e.g. GLUE's unlabelled test
    rows' -1, stays an id), a string stripped, anything else as it is."""
    if isinstance(feature, ClassLabel) and 0 <= int(value) < feature.num_classes:
        return feature.int2str(int(value))
    return value.strip() if isinstance(value, str) else value


def named_counts(ds: Dataset, column: str) -> Counter:
    """``value_counts`` of the labels as names (ClassLabel ids as their names, strings stripped)."""
    feature, named = ds.features[column], Counter()
    for v, n in value_counts(ds, column).items():
        named[_name(v, feature)] += n
    return named


def label_vocabulary(ds: Dataset, column: str, labels: Optional[Sequence[Any]] = None) -> Optional[list[str]]:
    """The class names (module docstring): ``labels`` if given, else the ClassLabel's names, else the sorted
    distinct strings of ``ds[column]``; None when the labels are integer ids."""
    if labels is not None:
        names = [str(x).strip() for x in labels]
        duplicated = sorted(n for n, k in Counter(names).items() if k > 1)
        if len(names) < 2 or duplicated:
            raise ValueError(f"data.labels must name at least 2 distinct classes, got {list(labels)}")
        return names
    feature = ds.features[column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    if getattr(feature, "dtype", None) in ("string", "large_string"):
        return _sorted_names({v.strip() for v in value_counts(ds, column) if isinstance(v, str)})
    return None


def label_ids(counts: dict[Any, int], names: Optional[Sequence[str]],
              num_classes: Optional[int]) -> tuple[dict[Any, int], Optional[tuple[str, str]]]:
    """The class id of each label value in ``counts`` (value → rows) that has one: names through ``names``,
    integers as they are, each in 0..C-1 with C = ``len(names)``, else ``num_classes`` (whether the two agree is
    ``check_num_classes``' question); and, when some values have none, (the problem, its fix): the offending
    values with their row counts, the vocabulary or the bound."""
    index = {n: i for i, n in enumerate(names)} if names is not None else {}
    classes = len(names) if names is not None else num_classes
    ids: dict[Any, int] = {}
    unknown: Counter = Counter()
    out_of_range: Counter = Counter()
    for v, n in counts.items():
        i = index.get(v) if isinstance(v, str) else _as_id(v)
        if i is None and isinstance(v, str) and names is None:
            try:
                i = int(v)  # "3" in an integer-labelled split is the id 3
            except ValueError:
                pass
        if i is None:
            unknown[v] += n
        elif i < 0 or (classes is not None and i >= classes):
            out_of_range[i] += n
        else:
            ids[v] = i
    problems, fixes = [], []
    if unknown:
        found = _preview([f"{v!r} ({n} row{'s' if n > 1 else ''})" for v, n in unknown.most_common()])
        if names is None:
            problems.append(f"labels {found} are not class ids, but the training labels are integer ids")
            fixes.append("Make the label column integers 0..C-1, or name the classes with data.labels: [...]")
        else:
            every = _preview(list(names) + [str(v) for v in unknown])
            problems.append(f"labels {found} are not in the label vocabulary [{_preview(list(names))}]")
            fixes.append(f"Fix or remove those rows, or name every class with data.labels: [{every}] (and set "
                         "model.num_classes to match)")
    if out_of_range:
        found = _preview([f"{i} ({n} row{'s' if n > 1 else ''})" for i, n in sorted(out_of_range.items())])
        bound = f"the {classes} names of the label vocabulary" if names is not None else f"model.num_classes={classes}"
        problems.append(f"label ids {found} are outside 0..{classes - 1 if classes else '?'} ({bound})")
        fixes.append("Class ids must be 0..num_classes-1; set model.num_classes to the number of classes, or fix "
                     "those rows (unlabelled rows such as GLUE's test -1 need a labelled file)")
    if problems:
        return ids, ("; ".join(problems), ". ".join(fixes))
    return ids, None


def check_labels(ds: Dataset, column: str, names: Optional[Sequence[str]], num_classes: Optional[int],
                 source: str, policy: str) -> tuple[Dataset, dict[Any, int]]:
    """``ds`` without the rows whose label has no class id (``label_ids``), under the bad-row policy (rows.py:
    "drop" warns once with the count, the values and the first rows; "error" raises ``label_ids``' problem and
    fix), and the class id of each of its raw label values (ClassLabel ids, strings as in the file ...)."""
    feature = ds.features[column]
    raw = value_counts(ds, column)
    ids, problem = label_ids(named_counts(ds, column), names, num_classes)
    to_id = {v: ids[_name(v, feature)] for v in raw if _name(v, feature) in ids}
    if problem is None:
        return ds, to_id
    if policy == "error":
        raise BadDataError(f"{source}: {problem[0]}. {problem[1]}, or set data.on_bad_rows: drop to skip those rows "
                           "with a warning")
    bad = [v for v in raw if v not in to_id]
    bad_set = pa.array(bad, type=feature.pa_type) if not isinstance(feature, JSON) else set(bad)
    positions, start = [], 0
    for batch in arrow_batches(ds, [column]):
        values = batch.column(column)
        if isinstance(feature, JSON):
            flags = np.array([_hashable(v) in bad_set for v in decoded(values, feature)], dtype=bool)
        else:
            flags = pc.fill_null(pc.is_in(values, value_set=bad_set), False).to_numpy(zero_copy_only=False)
        positions.append(np.flatnonzero(flags) + start)
        start += batch.num_rows
    what = f"a label that is not a class: {problem[0]}"
    return drop_rows(ds, np.concatenate(positions), what, source, policy, problem[1]), to_id


def check_num_classes(names: Optional[Sequence[str]], train_ids: Sequence[int], num_classes: Optional[int],
                      source: str, given: bool = False) -> None:
    """``num_classes`` must be the number of classes: ``len(names)``, or (integer ids) the number of distinct
    training ids. ``given``: the names come from ``data.labels`` (changes the fix the message names).

    Raises:
        BadDataError: naming both numbers, the classes found, ``source`` and the fix.
    """
    if num_classes is None:
        return
    if names is not None:
        if len(names) == num_classes:
            return
        if given:
            raise BadDataError(
                f"data.labels names {len(names)} classes [{_preview(list(names))}] but model.num_classes="
                f"{num_classes}: make them agree"
            )
        raise BadDataError(
            f"{source}: {len(names)} distinct labels [{_preview(list(names))}] but model.num_classes={num_classes}: "
            f"set model.num_classes: {len(names)}, or fix the rows with unexpected labels, or (when the training data "
            "lacks a class) name every class with data.labels: [...]"
        )
    present = sorted(set(train_ids))
    if len(present) != num_classes:
        raise BadDataError(
            f"{source}: {len(present)} distinct label ids [{_preview(present)}] but model.num_classes={num_classes}: "
            f"set model.num_classes: {len(present)}, or (when the training data lacks a class) name every class "
            f"with data.labels: [{', '.join(str(i) for i in range(num_classes))}]"
        )


__all__ = ["check_labels", "check_num_classes", "label_ids", "label_vocabulary", "named_counts", "value_counts"]
