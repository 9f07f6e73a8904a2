"""Text generation settings and one helper around ``model.generate`` (pure torch + transformers).

Used by the causal-LM task's ``predict`` (``lora-lightning predict`` → a JSONL of completions) and by the
``GenerationSamples`` callback (sample generations and exact match at validation).

Decoding: ``temperature == 0`` is greedy (argmax at every step, deterministic); ``temperature > 0`` samples
from softmax(logits / temperature) restricted to the smallest set of tokens whose probability reaches
``top_p`` (nucleus sampling; ``top_p = 1`` keeps every token). Generation stops at the model's EOS
(``generation_config.eos_token_id``) or after ``max_new_tokens``.

Adapters stay unmerged while generating: a merge → unmerge round trip is exact in float32/64 but not in
bf16, so merging belongs to export (``merge_adapters``), not to a validation hook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn


@dataclass
class GenerationOptions:
    """How completions are decoded (YAML: ``model.generation.max_new_tokens: 64``).

    Args:
        max_new_tokens: the most tokens generated after the prompt.
        temperature: 0 = greedy; > 0 = sampling at this temperature.
        top_p: nucleus sampling mass (only with ``temperature > 0``), in (0, 1].
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"generation.max_new_tokens must be an integer ≥ 1 (got {self.max_new_tokens!r})")
        if self.temperature < 0:
            raise ValueError(f"generation.temperature must be ≥ 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"generation.top_p must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``model.generate`` for these options."""
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        # top_k=0 switches off a top-k filter the model's own generation_config may carry (Qwen: 20)
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": 0}


def as_generation_options(value: Any) -> GenerationOptions:
    """A ``GenerationOptions`` from itself, a dict (a checkpoint's hyper-parameters) or None (defaults)."""
    if value is None:
        return GenerationOptions()
    if isinstance(value, dict):
        return GenerationOptions(**value)
    if isinstance(value, GenerationOptions):
        return GenerationOptions(**vars(value))
    raise TypeError(f"generation must be a GenerationOptions or a dict, got {type(value).__name__}")


def generation_model(module: nn.Module) -> nn.Module:
    """The transformers model inside ``module`` that can ``generate`` (``module`` itself if it can)."""
    for m in module.modules():
        if callable(getattr(m, "generate", None)) and hasattr(m, "generation_config"):
            return m
    raise ValueError(
        f"{type(module).__name__} holds no transformers model with generate(): generation needs an "
        "AutoModelForCausalLM backbone"
    )


@torch.no_grad()
def generate_tokens(
    model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor], options: GenerationOptions
) -> Tensor:
    """The new tokens (batch × ≤ max_new_tokens) generated after left-padded prompts ``input_ids``; rows that
    stopped early are filled with the pad token (the EOS when the model has no pad token)."""
    lm = generation_model(model)
    config = lm.generation_config
    pad = config.pad_token_id if config.pad_token_id is not None else getattr(lm.config, "pad_token_id", None)
    if pad is None:
        eos = config.eos_token_id
        pad = eos[0] if isinstance(eos, (list, tuple)) else eos
    was_training = lm.training
    lm.eval()
    try:
        out = lm.generate(
            input_ids=input_ids,
            attention_mask=attention_mask if attention_mask is not None else torch.ones_like(input_ids),
            pad_token_id=pad,
            use_cache=True,
            **options.generate_kwargs(),
        )
    finally:
        lm.train(was_training)
    return out[:, input_ids.shape[1] :]


def pad_left(rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, Tensor]:
    """Prompt batch for ``generate``: input_ids and attention_mask padded on the left, and each row's index."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, width - n :] = torch.as_tensor(r["input_ids"])
        mask[i, width - n :] = 1
    return {"input_ids": ids, "attention_mask": mask, "index": torch.as_tensor([r["index"] for r in rows])}


def strip_after_eos(tokens: list[int], eos: Any) -> list[int]:
    """The tokens before the first EOS (``eos``: an id, a list of ids, or None)."""
    stops = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i]
    return tokens


__all__ = [
    "GenerationOptions",
    "as_generation_options",
    "generate_tokens",
    "generation_model",
    "pad_left",
    "strip_after_eos",
]
