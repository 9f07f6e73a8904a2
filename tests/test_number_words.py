"""The offline SFT task's data (benchmarks/make_number_words.py, committed under data/number_words)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _generator():
    spec = importlib.util.spec_from_file_location("make_number_words", ROOT / "benchmarks" / "make_number_words.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(split):
    return [json.loads(line) for line in (ROOT / "data" / "number_words" / f"{split}.jsonl").read_text().splitlines()]


def test_in_words_follows_the_convention():
    words = _generator().in_words
    assert [words(n) for n in (0, 7, 13, 20, 40, 47, 100, 101, 110, 347, 999)] == [
        "zero", "seven", "thirteen", "twenty", "forty", "forty-seven", "one hundred", "one hundred one",
        "one hundred ten", "three hundred forty-seven", "nine hundred ninety-nine",
    ]
    assert len({words(n) for n in range(1000)}) == 1000


def test_committed_files_are_what_the_generator_writes(tmp_path):
    gen = _generator()
    import sys

    argv, sys.argv = sys.argv, ["make_number_words.py", "--out", str(tmp_path)]
    try:
        gen.main()
    finally:
        sys.argv = argv
    for split in ("train", "val"):
        assert (tmp_path / f"{split}.jsonl").read_text() == (ROOT / "data" / "number_words" / f"{split}.jsonl").read_text()


def test_validation_numbers_never_occur_in_training_and_both_directions_are_there():
    train, val = _rows("train"), _rows("val")
    assert (len(train), len(val)) == (1600, 200)
    number = lambda r: r["input"] if r["input"].isdigit() else r["output"]  # noqa: E731
    assert not {number(r) for r in train} & {number(r) for r in val}
    for rows in (train, val):
        kinds = [r["instruction"] for r in rows]
        assert kinds.count("Write the number in words.") == kinds.count("Write the number in digits.") == len(rows) // 2
