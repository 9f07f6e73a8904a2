"""Tokenising a split in datasets' Arrow cache: what a truncated row's length was, and a fingerprint that
names the cache file by what decides its content, so that a second run with the same file, tokenizer and
settings reuses it.

Why our own fingerprint: datasets names a ``map`` result by hashing the function with everything it refers to,
the tokenizer included, and a fast tokenizer's pickled state changes once it has truncated (its Rust truncation
setting is part of it; transformers issue #14931, datasets issues #5985 and #6179). The second split's hash then
depends on whether the first split was tokenised or loaded from the cache, so a second run can miss the cache;
the datamodule's other attributes would be hashed too if the function referred to it. ``fingerprint`` hashes the input
split's own fingerprint, the tokenizer's definition (its ``tokenizer.json`` without the truncation / padding
state; the whole object for a slow tokenizer), the chat template and the caller's settings.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from datasets import Dataset
from datasets.fingerprint import Hasher

LENGTH = "__length__"  # a tokenised row's length before truncation when it was truncated, else 0


def untruncated_lengths(tokenizer: Any, texts: Sequence[Sequence[str]], input_ids: Sequence[Sequence[int]],
                        max_length: int) -> list[int]:
    """Per row of a batch: its length in tokens before truncation to ``max_length`` if it was truncated, else 0.
    ``texts`` are the tokenizer's inputs (one list per text column), ``input_ids`` its truncated output; only the
    rows that reached ``max_length`` are tokenised again, without truncation."""
    at_limit = [i for i, ids in enumerate(input_ids) if len(ids) >= max_length]
    lengths = [0] * len(input_ids)
    if at_limit:
        whole = tokenizer(*[[column[i] for i in at_limit] for column in texts], verbose=False)["input_ids"]
        for i, ids in zip(at_limit, whole):
            if len(ids) > max_length:
                lengths[i] = len(ids)
    return lengths


def tokenizer_state(tokenizer: Any) -> Any:
    """What decides how ``tokenizer`` encodes (module docstring), for hashing."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer
    spec = json.loads(backend.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return [type(tokenizer).__name__, json.dumps(spec, sort_keys=True), getattr(tokenizer, "chat_template", None),
            tokenizer.truncation_side, tokenizer.eos_token_id, tokenizer.pad_token_id]


def fingerprint(ds: Dataset, tokenizer: Any, *settings: Any) -> str:
    """The cache name of ``ds`` tokenised by ``tokenizer`` with ``settings`` (everything else the function
    depends on: max_length, columns, label ids, a version tag of the function's code)."""
    return Hasher.hash([ds._fingerprint, tokenizer_state(tokenizer), list(settings)])


__all__ = ["LENGTH", "fingerprint", "tokenizer_state", "untruncated_lengths"]
