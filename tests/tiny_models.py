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


def tiny_llama_v100(seed: int = 0):
    """A 2-layer, 32-wide Llama over a 100-token vocabulary (the interop tests' token batches)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


def quantizable_llama(seed: int = 0, vocab: int = 96, hidden: int = 128, inter: int = 256, layers: int = 2, tie: bool = False):
    """A tiny bf16 Llama for the QLoRA tests: every projection NF4-storable (q/o/gate/up/down whole groups of 64·256
    weights, k/v 128 blocks), gate/up/down splittable over 2 FSDP2 ranks, the lm_head (kept dense) 96×128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


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


# -- causal LMs: a tiny offline tokenizer (with a chat template) and tiny Llama / GPT-2 models ---------------
LM_SPECIALS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
LM_WORDS = (
    "what is add and the sum of plus minus answer hello hi how are you fine thanks a good film movie bad "
    "story tell me about cats dogs say yes no please question reply , . ? !"
).split()
LM_VOCAB = LM_SPECIALS + [str(d) for d in range(10)] + LM_WORDS
# A ChatML-like template: every turn is "<|role|> content </s>"; the generation prompt is "<|assistant|>".
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_lm_tokenizer(chat_template: bool = True):
    """A word-level fast tokenizer over LM_VOCAB (digits split one by one), BOS added to plain text, no pad
    token (so the pad-token fallback is exercised), and the chat template above. Built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(LM_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=LM_SPECIALS[3:], chat_template=CHAT_TEMPLATE if chat_template else None,
    )


def tiny_llama(seed: int = 0, tie: bool = False, attn: str = "eager", dtype=torch.float32):
    """A 2-layer, 32-wide Llama (4 heads, 2 KV heads) over LM_VOCAB."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(LM_VOCAB), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
        pad_token_id=None, attn_implementation=attn,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2_lm(seed: int = 0, attn: str = "eager"):
    """A 2-layer GPT-2 (Conv1D layers; lm_head tied to the input embeddings) over LM_VOCAB."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(LM_VOCAB), n_embd=32, n_layer=2, n_head=2, n_positions=128, bos_token_id=1, eos_token_id=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation=attn,
    )
    return GPT2LMHeadModel(config).eval()


def save_tiny_lm(path, model) -> str:
    """``model`` and the tiny tokenizer saved as one transformers folder (what a hub checkpoint looks like)."""
    model.save_pretrained(path)
    tiny_lm_tokenizer().save_pretrained(path)
    return str(path)
