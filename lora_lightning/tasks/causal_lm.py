"""Causal language modelling (instruction / chat SFT, continued pre-training): next-token cross-entropy on the
target tokens only.

Batch (``lora_lightning.data.CausalLMDataModule``): ``input_ids`` (B×T), ``labels`` (B×T, -100 where no loss:
prompt, non-assistant turns, padding), and either ``attention_mask`` (padded batch) or ``position_ids``
restarting at 0 at every example boundary (packed batch: several examples per row, no attention mask;
transformers builds the block-diagonal causal mask from the positions, see ``lora_lightning.data.packing``).

Loss. Position t predicts token t+1: with ℓ_t = −log softmax(z_t)[y_{t+1}] and the target set
S = {t : labels[t+1] ≠ −100}, a batch contributes loss_sum = Σ_{t∈S} ℓ_t and n_targets = |S|; LoRAModule
divides the step's summed gradients by the step's total |S| over all micro-batches and devices.

How the logits are formed (``loss_chunk_size``):
    > 0 (default 256)  target-only and chunked (``lora_lightning.losses``): the model runs up to its lm_head,
                       whose input is captured (a forward pre-hook hands the lm_head zero positions, so the
                       model computes no logits itself); only the |S| target rows of the final hidden states
                       meet the lm_head weight, ``loss_chunk_size`` tokens at a time, so no |S|×V (let alone
                       B×T×V) logits ever exist; on CUDA with liger-kernel installed, Liger's fused linear
                       cross-entropy does it (``loss_backend``). The first batch of every model checks that
                       the model's own logits are exactly lm_head(hidden) (one position); a model that
                       post-processes its logits (Gemma's soft-capping, Cohere's logit scale, …) or whose
                       lm_head is not a plain ``nn.Linear`` falls back, with a warning, to:
    0 / None           the model's own forward: full B×T×V logits, the target rows gathered and upcast to (at least)
                       float32.

Metrics (torchmetrics, summed over the whole split and across devices, then divided):
    val_loss       mean ℓ over target tokens (logged by LoRAModule, weighted by n_targets)
    val_ppl        perplexity exp(Σℓ / N)
    val_token_acc  fraction of target tokens whose argmax is the target
``predict`` generates a completion for left-padded prompts (``lora_lightning.generation``).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from ..generation import GenerationOptions, generate_tokens
from ..losses import BACKENDS, DEFAULT_CHUNK_SIZE, causal_lm_loss
from .base import Task, TaskOutput, format_metrics

IGNORE_INDEX = -100
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


class _TokenRatio(Metric):
    """Σ numerator / Σ denominator over every update and device (float64 sums)."""

    full_state_update = False
    higher_is_better: Optional[bool] = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("num", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("den", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, num: Tensor, den: Tensor) -> None:
        self.num += num.detach().to(self.num.dtype)
        self.den += den.detach().to(self.den.dtype)

    def compute(self) -> Tensor:
        return (self.num / self.den.clamp_min(1)).float()


class Perplexity(_TokenRatio):
    """exp(mean negative log-likelihood per target token)."""

    higher_is_better = False

    def update(self, nll_sum: Tensor, n_tokens: Tensor) -> None:
        self._add(nll_sum, n_tokens)

    def compute(self) -> Tensor:
        return torch.exp(self.num / self.den.clamp_min(1)).float()


class TokenAccuracy(_TokenRatio):
    """Fraction of target tokens predicted exactly by the argmax."""

    higher_is_better = True

    def update(self, n_correct: Tensor, n_tokens: Tensor) -> None:
        self._add(n_correct, n_tokens)


def packed_attention_supported(model: nn.Module) -> bool:
    """Whether ``model`` resets attention at packed-example boundaries given ``position_ids`` and no mask:
    transformers' ``create_causal_mask`` does (it splits rows where the positions restart,
    ``masking_utils.find_packed_sequence_indices``), flash-attention backends do (varlen from positions)."""
    try:
        from transformers import masking_utils
    except ImportError:  # pragma: no cover - transformers < 4.53
        return False
    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        return False
    config = getattr(model, "config", None)
    if "flash" in str(getattr(config, "_attn_implementation", "")):
        return True
    source = inspect.getmodule(type(getattr(model, "base_model", model)))
    return source is not None and getattr(source, "create_causal_mask", None) is not None


class CausalLM(Task):
    name = "causal_lm"
    model_class = "AutoModelForCausalLM"

    def __init__(self, loss_chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE, loss_backend: str = "auto") -> None:
        if loss_chunk_size is not None and (isinstance(loss_chunk_size, bool) or loss_chunk_size < 0):
            raise ValueError(
                f"loss_chunk_size must be a number of tokens ≥ 0 (0 = full logits), got {loss_chunk_size!r}"
            )
        if loss_backend not in BACKENDS:
            raise ValueError(f"loss_backend={loss_backend!r}; choose one of {', '.join(BACKENDS)}")
        self.loss_chunk_size = loss_chunk_size or 0
        self.loss_backend = loss_backend
        self._packing_checked: set[int] = set()
        self._head_checked: dict[int, bool] = {}  # id(model) -> its logits are exactly lm_head(hidden)

    def default_modules_to_save(self, model: nn.Module) -> list[str]:
        return []  # lm_head is pretrained (and often tied to the input embeddings): adapters only

    def _inputs(self, model: nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Any]:
        inputs: dict[str, Any] = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        if "position_ids" in inputs and "attention_mask" not in inputs and id(model) not in self._packing_checked:
            if not packed_attention_supported(model):
                raise ValueError(
                    f"{type(model).__name__} does not reset attention at packed-example boundaries from position_ids "
                    "(needs transformers ≥ 4.53 and a model built on masking_utils.create_causal_mask, or "
                    "flash attention); set data.packing: false"
                )
            self._packing_checked.add(id(model))
        if hasattr(getattr(model, "config", None), "use_cache"):
            inputs["use_cache"] = False  # no KV cache while training / scoring (a cache also disables packing)
        return inputs

    def forward(self, model: nn.Module, batch: Any) -> TaskOutput:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError(
                f"causal_lm expects dict batches with input_ids and labels, got {type(batch).__name__}; "
                "use lora_lightning.data.CausalLMDataModule"
            )
        if "labels" not in batch:
            raise ValueError("this batch has no labels; training/validation/test batches need them")
        inputs = self._inputs(model, batch)
        head = self._chunkable_head(model)
        if head is not None:
            hidden = self._final_hidden_states(model, head, inputs)
            if hidden is not None:
                loss_sum, n, correct = causal_lm_loss(
                    hidden, batch["labels"], head.weight, head.bias, self.loss_chunk_size, self.loss_backend
                )
                return TaskOutput(loss_sum, n, {"nll_sum": loss_sum.detach(), "n_correct": correct, "n_tokens": n})
        out = model(**inputs)
        logits = out if isinstance(out, Tensor) else out.logits
        labels = batch["labels"][:, 1:]
        targets = labels != IGNORE_INDEX
        z = logits[:, :-1][targets]  # (n_targets, vocab): only the positions that are scored
        z = z.to(torch.promote_types(z.dtype, torch.float32))  # bf16/fp16 → fp32; fp64 stays
        y = labels[targets]
        loss_sum = F.cross_entropy(z, y, reduction="sum")
        n = targets.sum()
        correct = (z.detach().argmax(-1) == y).sum()
        return TaskOutput(loss_sum, n, {"nll_sum": loss_sum.detach(), "n_correct": correct, "n_tokens": n})

    def _chunkable_head(self, model: nn.Module) -> Optional[nn.Linear]:
        """The model's lm_head when the target-only chunked loss applies to it, else None."""
        if not self.loss_chunk_size or self._head_checked.get(id(model)) is False:
            return None
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if type(head) is not nn.Linear:  # an adapted lm_head, a custom head, no head: the model's own forward
            if id(model) not in self._head_checked:
                warnings.warn(
                    f"causal_lm: the lm_head of {type(model).__name__} is a {type(head).__name__}, not a plain "
                    "nn.Linear: computing the loss from the model's full logits (loss_chunk_size does not apply)",
                    stacklevel=3,
                )
                self._head_checked[id(model)] = False
            return None
        return head

    def _final_hidden_states(self, model: nn.Module, head: nn.Linear, inputs: dict[str, Any]) -> Optional[Tensor]:
        """The lm_head's input (B×T×H) from one forward in which the lm_head sees no position (the first time for
        a model: one position, to check the model's logits are exactly lm_head(hidden)); None when they are not."""
        check = id(model) not in self._head_checked
        captured: list[Tensor] = []

        def take_input(module: nn.Module, args: tuple) -> tuple:
            captured.append(args[0])
            return (args[0][:, -1:] if check else args[0][:, :0],) + tuple(args[1:])

        handle = head.register_forward_pre_hook(take_input)
        try:
            out = model(**inputs)
        finally:
            handle.remove()
        if len(captured) != 1 or captured[0].dim() != 3:
            self._head_checked[id(model)] = False
            warnings.warn(
                f"causal_lm: {type(model).__name__} does not call its lm_head once on B×T×H hidden states: "
                "computing the loss from the model's full logits (loss_chunk_size does not apply)",
                stacklevel=3,
            )
            return None
        if check:
            logits = out if isinstance(out, Tensor) else out.logits
            with torch.no_grad():
                ours = F.linear(captured[0][:, -1:], head.weight, head.bias)
                same = logits.shape == ours.shape and torch.allclose(logits.float(), ours.float(), rtol=1e-6, atol=1e-6)
            self._head_checked[id(model)] = bool(same)
            if not same:
                warnings.warn(
                    f"causal_lm: {type(model).__name__} post-processes its logits (they differ from lm_head(hidden), "
                    "e.g. soft-capping or a logit scale): computing the loss from the model's full logits "
                    "(loss_chunk_size does not apply)",
                    stacklevel=3,
                )
                return None
        return captured[0]

    def metrics(self, num_classes: int, prefix: str) -> MetricCollection:
        return MetricCollection({"ppl": Perplexity(), "token_acc": TokenAccuracy()}, prefix=prefix)

    def predict(self, model: nn.Module, batch: Any, generation: GenerationOptions) -> dict[str, Any]:
        """{"index": the rows' indices in the prompts file, "tokens": the generated tokens (B×≤max_new_tokens,
        padded after EOS)} for a left-padded prompt batch."""
        tokens = generate_tokens(model, batch["input_ids"], batch.get("attention_mask"), generation)
        return {"index": batch.get("index"), "tokens": tokens}

    def summary(self, metrics: Mapping[str, Any]) -> Optional[str]:
        names = ("val_loss", "val_ppl", "val_token_acc", "val_exact_match", "val_contains")
        return format_metrics(metrics, names) if "val_ppl" in metrics else None

    def callbacks(self) -> list[type]:
        from ..callbacks.predictions import CompletionWriter

        return [CompletionWriter]
