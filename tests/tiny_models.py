"""Tiny transformers/timm models built from configs (no network), shared by the tests."""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel


def tiny_bert(num_labels: int = 3, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=64, num_labels=num_labels, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, attn_implementation="eager",
    )
    return BertForSequenceClassification(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",
    )
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


class TinyConvNet(nn.Module):
    """Two Conv2d layers (one strided, padded) and a linear head: x (N×3×12×12) → N×4."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(h.mean((2, 3)))


def tiny_convnet(seed: int = 0) -> TinyConvNet:
    torch.manual_seed(seed)
    return TinyConvNet().eval()


def token_batch(batch: int = 4, seq: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, seq // 2 :] = 0  # one padded row, so masks matter
    return {"input_ids": ids, "attention_mask": mask}


def randomize_adapters(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Give every adapter a non-zero B (and fresh A) so tests exercise a non-trivial ΔW."""
    from lora_lightning import adapter_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for p in (layer.lora_A, layer.lora_B):
                p.copy_(torch.randn(p.shape, generator=g) * std)
