"""Shared fixtures: a tiny BERT + tokenizer saved to a folder, tiny TSV datasets, a tiny timm name, a tiny
plain-torch classifier. Nothing downloads."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

TINY_TIMM = "timm:test_resnet"  # timm's own ~0.4M-parameter test model
WORDS = (
    "the a film movie is was and it this of good great fun lovely moving bad awful dull boring mess "
    "not very truly plot acting story"
).split()
SENTENCES = [
    (1, "a good film"),
    (0, "a bad movie"),
    (1, "truly great fun and a lovely moving story"),
    (0, "dull"),
    (1, "the acting is very good"),
    (0, "the plot was a boring mess and the acting was awful"),
    (1, "lovely"),
    (0, "not good"),
    (1, "this movie is great"),
    (0, "this film was dull and boring"),
    (1, "great acting"),
    (0, "an awful mess"),
]


def write_tsv(path, rows) -> str:
    path.write_text("label\tsentence\n" + "".join(f"{y}\t{s}\n" for y, s in rows))
    return str(path)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    """A 2-layer, 32-wide BERT for 2 classes and its WordPiece tokenizer, saved with save_pretrained."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    path = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(path)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def sst_files(tmp_path_factory) -> dict[str, str]:
    """train.tsv (12 rows) and dev.tsv (6 rows) in GLUE SST-2's layout: label<TAB>sentence."""
    path = tmp_path_factory.mktemp("sst")
    return {
        "train": write_tsv(path / "train.tsv", SENTENCES),
        "dev": write_tsv(path / "dev.tsv", SENTENCES[:6]),
    }


class TinyNet(nn.Module):
    """x (N×16) → Linear → ReLU → Linear → ReLU → classifier: a plain torch model with a task head."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def tiny_net(seed: int = 0, num_classes: int = 3) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(num_classes)


def tensor_loader(n: int = 32, batch_size: int = 8, seed: int = 0, num_classes: int = 3):
    """A fixed, unshuffled (x, y) DataLoader: deterministic batch order across runs."""
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def cpu_trainer(**kwargs):
    """Trainer settings every test uses: CPU, no logger/progress bar/summary, no checkpoints unless asked."""
    from lightning.pytorch import Trainer

    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0,
    )
    return Trainer(**{**defaults, **kwargs})


# -- causal LM fixtures (tiny_models.py builds the models and the tokenizer) -----------------------------------
@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """A tiny Llama + its chat-template tokenizer, saved with save_pretrained (architectures: LlamaForCausalLM)."""
    from tiny_models import save_tiny_lm, tiny_llama

    return save_tiny_lm(tmp_path_factory.mktemp("tiny_llama"), tiny_llama())


def write_jsonl(path, rows) -> str:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def arithmetic_rows(n: int, seed: int = 0) -> list[dict]:
    """Instruction rows "what is a plus b" → "c" (single digits, so answers are short and checkable)."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 4), rng.randint(0, 5)
        rows.append({"instruction": f"what is {a} plus {b} ?", "input": "", "output": str(a + b)})
    return rows


@pytest.fixture(scope="session")
def sft_files(tmp_path_factory) -> dict[str, str]:
    """Small causal-LM data files: instruction train/val/prompts (jsonl), chat (jsonl), plain text (jsonl)."""
    path = tmp_path_factory.mktemp("sft")
    chat = [
        {"messages": [{"role": "system", "content": "say yes"}, {"role": "user", "content": "hello"},
                      {"role": "assistant", "content": "hi"}, {"role": "user", "content": "how are you ?"},
                      {"role": "assistant", "content": "fine thanks"}]},
        {"messages": [{"role": "user", "content": "tell me about cats"}, {"role": "assistant", "content": "cats good"}]},
    ]
    return {
        "train": write_jsonl(path / "train.jsonl", arithmetic_rows(24, seed=0)),
        "val": write_jsonl(path / "val.jsonl", arithmetic_rows(6, seed=1)),
        "prompts": write_jsonl(path / "prompts.jsonl", [{"instruction": r["instruction"]} for r in arithmetic_rows(5, 2)]),
        "chat": write_jsonl(path / "chat.jsonl", chat),
        "text": write_jsonl(path / "text.jsonl", [{"text": "a good film"}, {"text": "tell me a story about dogs"}]),
    }
