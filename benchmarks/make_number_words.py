"""The offline instruction task: write a number in words, or a number written in words in digits.

    python benchmarks/make_number_words.py            # → data/number_words/{train,val}.jsonl (committed)

Alpaca-style rows (``instruction`` / ``input`` / ``output``), short answers checked by exact match:

    {"instruction": "Write the number in words.",  "input": "347", "output": "three hundred forty-seven"}
    {"instruction": "Write the number in digits.", "input": "three hundred forty-seven", "output": "347"}

The numbers 0-999 are shuffled once (seed 0) and split into disjoint sets: 800 train numbers, 100 validation
numbers; every number appears in both directions (1,600 train rows, 200 validation rows). Validation
numbers never occur in training, so a model has to learn the convention (American English: no "and",
hyphenated tens, "one hundred", lower case, no full stop) and apply it to numbers it has not seen.

Why this task: SmolLM2-135M-Instruct knows English number words but answers these instructions in
sentences ("582 in words is \"582\".", "Eight hundred sixty-seven is a base-10 number ..."): 0 % exact
match before fine-tuning (checked on 32 prompts with its chat template, ``benchmarks/results`` in
docs/results.md), while the convention is learnable by LoRA in a few dozen steps on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
TO_WORDS = "Write the number in words."
TO_DIGITS = "Write the number in digits."


def in_words(n: int) -> str:
    """0 ≤ n ≤ 999 in American English words: 347 → "three hundred forty-seven", 40 → "forty"."""
    if not 0 <= n <= 999:
        raise ValueError(f"in_words covers 0-999 (got {n})")
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    return ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " " + in_words(n % 100))


def rows(numbers: list[int]) -> list[dict[str, str]]:
    out = []
    for n in numbers:
        out.append({"instruction": TO_WORDS, "input": str(n), "output": in_words(n)})
        out.append({"instruction": TO_DIGITS, "input": in_words(n), "output": str(n)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "data" / "number_words")
    p.add_argument("--train", type=int, default=800, help="train numbers (each gives two rows)")
    p.add_argument("--val", type=int, default=100, help="validation numbers (each gives two rows)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    numbers = list(range(1000))
    random.Random(args.seed).shuffle(numbers)
    if args.train + args.val > len(numbers):
        raise SystemExit(f"--train + --val must be ≤ {len(numbers)}")
    splits = {"train": numbers[: args.train], "val": numbers[args.train: args.train + args.val]}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, nums in splits.items():
        data = rows(nums)
        random.Random(args.seed + 1).shuffle(data)
        path = args.out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        print(f"{path}: {len(data)} rows ({len(nums)} numbers × 2 directions)")


if __name__ == "__main__":
    main()
