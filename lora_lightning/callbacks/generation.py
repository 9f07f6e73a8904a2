"""GenerationSamples: a few sample generations at each validation, and optionally exact match.

At the end of every validation epoch (not the sanity check) the callback takes the first examples of the
validation split as prompts (answers removed; ``CausalLMDataModule.generation_examples``), generates with the
model as it is (adapters UNMERGED: merge → unmerge is not exact in bf16, so merging belongs to export), and

- prints ``num_samples`` of them (prompt, completion, reference) and keeps every sample in
  ``<log_dir>/generations.jsonl`` (one JSON line per sample: step, prompt, completion, reference);
- with ``exact_match: true``, generates for ``eval_examples`` validation rows (None: all of them) and logs

      val_exact_match = mean_i [ norm(completion_i) == norm(reference_i) ]
      val_contains    = mean_i [ norm(reference_i) ⊂ norm(completion_i) ]      norm = lower-case, whitespace
                                                                                 collapsed, stripped

  for tasks with short answers (arithmetic, QA). These are ordinary logged metrics: ``AdapterCheckpoint``
  can monitor ``val_exact_match``.

Decoding follows ``pl_module.generation`` (``LoRAModule``'s ``model.generation``: greedy by default) unless
``generation`` is given. Sampling runs under a fixed seed, so every rank generates the same tokens: under
FSDP2 all ranks must run the same number of decoding steps (they all generate the same examples; rank 0
prints and writes). Works on any LightningModule holding a transformers causal LM with a datamodule that has
``generation_examples`` and ``decode`` (``CausalLMDataModule``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from ..generation import (
    GenerationOptions,
    as_generation_options,
    generate_tokens,
    generation_model,
    pad_left,
    strip_after_eos,
)


def normalize_answer(text: str) -> str:
    """Lower-case, whitespace collapsed and stripped (the comparison of exact match / contains)."""
    return " ".join(str(text).split()).lower()


class GenerationSamples(Callback):
    """Sample generations (and exact match) at each validation; see the module docstring.

    Args:
        num_samples: completions printed and written per validation.
        exact_match: also log ``val_exact_match`` and ``val_contains``.
        eval_examples: how many validation rows exact match uses (None: all).
        batch_size: prompts per ``generate`` call.
        generation: decoding options (dict or GenerationOptions); None = the module's ``generation``.
        seed: the sampling seed (used only with temperature > 0).
        output: the JSONL of samples; None = ``<trainer.log_dir or default_root_dir>/generations.jsonl``.
    """

    def __init__(
        self,
        num_samples: int = 3,
        exact_match: bool = False,
        eval_examples: Optional[int] = None,
        batch_size: int = 16,
        generation: Optional[Union[dict, GenerationOptions]] = None,
        seed: int = 0,
        output: Optional[Union[str, Path]] = None,
    ) -> None:
        if num_samples < 0 or batch_size < 1 or (eval_examples is not None and eval_examples < 1):
            raise ValueError(
                f"num_samples must be ≥ 0, batch_size ≥ 1 and eval_examples ≥ 1 or None (got {num_samples}, "
                f"{batch_size}, {eval_examples})"
            )
        self.num_samples = num_samples
        self.exact_match = exact_match
        self.eval_examples = eval_examples
        self.batch_size = batch_size
        self.generation = as_generation_options(generation) if generation is not None else None
        self.seed = seed
        self.output = Path(output) if output is not None else None
        self.samples: list[dict[str, Any]] = []

    def _generate(self, pl_module: pl.LightningModule, examples: list[dict], pad_id: int, eos: list) -> list[list[int]]:
        options = self.generation or as_generation_options(getattr(pl_module, "generation", None))
        model = generation_model(pl_module)
        out: list[list[int]] = []
        with torch.random.fork_rng(devices=[pl_module.device] if pl_module.device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            for start in range(0, len(examples), self.batch_size):
                batch = pad_left(examples[start : start + self.batch_size], pad_id)
                tokens = generate_tokens(
                    model, batch["input_ids"].to(pl_module.device), batch["attention_mask"].to(pl_module.device),
                    options,
                )
                out += [strip_after_eos(t, eos) for t in tokens.tolist()]
        return out

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        dm = trainer.datamodule
        if dm is None or not callable(getattr(dm, "generation_examples", None)):
            raise ValueError(
                "GenerationSamples needs a datamodule with generation_examples() and decode() "
                "(lora_lightning.data.CausalLMDataModule)"
            )
        wanted = max(self.num_samples, (self.eval_examples or 10**12) if self.exact_match else 0)
        examples = dm.generation_examples("val", None if wanted >= 10**12 else wanted)
        if not examples:
            return
        tokenizer = dm.tokenizer
        eos = generation_model(pl_module).generation_config.eos_token_id
        eos = [*(eos if isinstance(eos, (list, tuple)) else [eos]), tokenizer.eos_token_id]
        completions = [dm.decode(t) for t in self._generate(pl_module, examples, tokenizer.pad_token_id, eos)]
        step = trainer.global_step
        for ex, completion in list(zip(examples, completions))[: self.num_samples]:
            prompt = tokenizer.decode(ex["input_ids"], skip_special_tokens=False)
            self.samples.append({"step": step, "prompt": prompt, "completion": completion, "reference": ex["reference"]})
            rank_zero_info(f"[step {step}] {prompt!r} → {completion!r} (reference {ex['reference']!r})")
        if self.exact_match:
            pairs = [(normalize_answer(c), normalize_answer(ex["reference"])) for ex, c in zip(examples, completions)
                     if ex["reference"] is not None]
            if pairs:
                pl_module.log("val_exact_match", sum(c == r for c, r in pairs) / len(pairs), prog_bar=True)
                pl_module.log("val_contains", sum(r in c for c, r in pairs) / len(pairs))
        if trainer.is_global_zero and self.num_samples:
            self._write(trainer)

    def _write(self, trainer: pl.Trainer) -> None:
        path = self.output or Path(trainer.log_dir or trainer.default_root_dir) / "generations.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in self.samples)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"samples": self.samples}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.samples = list(state_dict.get("samples", []))
