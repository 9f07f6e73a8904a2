"""LoRAModule: a backbone + an adapter method + a task + Adam(W) with warm-up and a cosine schedule.

Optimiser: Adam over the trainable tensors only (adapter factors and ``modules_to_save``, i.e. the head).
Weight decay λ goes to the matrices of the groups named in ``decay_on`` (default: adapter factors and
head), never to biases or norm weights (1-D tensors), in one of two modes (``weight_decay_mode``):

    "decoupled" (default, AdamW):  p ← p − lr·(Adam step of ∇L) − lr·λ·p   (Loshchilov & Hutter)
    "coupled"   (Adam + L2):       the loss becomes L + λ/2·Σ‖p‖², i.e. λ·p is added to the gradient
                                   before Adam's moments (torch.optim.Adam's weight_decay)

Only the coupled mode trains the objective of the loss-landscape theory (Kim, Kim & Ryu 2025, arXiv
2502.09376, which uses the variational form ‖M‖_* = min over B·A = M of ½(‖A‖²+‖B‖²), Srebro, Rennie &
Jaakkola 2005): with ΔW = s·B·A, min over the factorisations of λ/2·(‖A‖²+‖B‖²) = (λ/s)·‖ΔW‖_*, so L2 on
the factors is a nuclear-norm penalty on ΔW with weight λ/s (λ·‖B·A‖_* at s = 1). AdamW's decoupled decay
shrinks the factors outside the gradient and is not a penalty in the loss; the equivalence does not apply
to it (it still biases toward small factors, measured in docs/results.md §1). Decoupled as the default is
[ours] (the common practice for LoRA fine-tuning).

Learning rate at optimizer step t (LambdaLR, stepped every optimizer step), with w warm-up steps of T:

    lr(t) = lr · (t+1)/(w+1)                                       for t < w
    lr(t) = lr · (m + (1−m) · ½(1 + cos(π·(t−w)/(T−w))))           otherwise  (m = min_lr_ratio)

``lr=None`` takes ``DEFAULT_LR`` for the method's scaling rule: the scale s multiplies every update of
ΔW, so a larger s wants a smaller step (LoRA-α's s = C/√r ≈ 90 at r=8 works with full fine-tuning LRs).
ALLoRA follows its paper's convention (arXiv 2410.09692 §4.2: "we split learning rate into a constant base
learning rate l_b and η, and the effective learning rate is η·l_b"; Tables 1, 6, 7 run LoRA at η·1e-4 and
ALLoRA at l_b = 1e-4): its default is the base rate l_b = DEFAULT_LR["lora"] / η (5e-4 at η = 2), so that
its starting step c·l_b = η·l_b equals our LoRA default, as the paper pairs them. The anchor is our choice
[ours]: our LoRA default, not the paper's 1e-4 (tuned for 0.5B-8B LLMs over 2-3 epochs). With AdamW a
constant c cancels in m/√v, so at B = 0 ALLoRA then steps like plain LoRA at l_b; the paper does not name its
optimiser.

Loss normalisation. A task returns the SUM of its per-target losses over a batch and the number of targets
(``Task.loss``; targets = examples for classification, target tokens for a causal LM). The optimiser must see
the gradient of the mean over every target of the optimizer step, across the A micro-batches of gradient
accumulation and the W devices:

    g = ∇ (Σ_{devices, micro-batches} loss_sum) / N,     N = Σ_{devices, micro-batches} n_targets.

Lightning's automatic optimisation divides each micro-batch's returned loss by A, and DDP / FSDP2 average
gradients over W, so with ``training_step`` returning loss_sum the accumulated gradient is
∇(Σ loss_sum)/(A·W). Just before the optimizer step (inside the optimizer closure, so before
``on_before_optimizer_step`` hooks, gradient clipping and the step) ``optimizer_step`` all-reduces the step's
target count N and multiplies every gradient by A·W/N. N is only known once all micro-batches are seen,
hence a rescale of the gradients rather than of each loss (torchtune's recipes do the same). The result is
exact: 2 micro-batches, or 2 devices, give the weights of one batch holding both (tested to float64
rounding). ``train_loss`` logs each micro-batch's own mean. With one batch per step on one device this is
the plain batch mean, so classification trains as before.

Checkpoints hold only ``adapter_state_dict`` of the backbone (adapter tensors + ``modules_to_save``); the
frozen base is rebuilt from the spec in ``configure_model`` (seeded by ``init_seed``, so even a randomly
initialised base is the same one every time).

Class names: ``label_names`` (id → name) comes from the datamodule's label vocabulary at setup
(``lora_lightning.data.labels``) and is saved in checkpoints; a model that already has one (restored from a
checkpoint) hands it to the datamodule instead, so validate/test/predict use the ids it was trained with.
``predict_step`` returns names when they are known. AdapterCheckpoint writes them into adapter_config.json, and a
transformers backbone gets them as ``config.id2label``.

Multi-device: DDP works as is (``trainer.strategy: ddp``). Under Lightning's ``ModelParallelStrategy``
(tensor_parallel_size=1) ``configure_model`` shards the backbone with FSDP2 (``shard_adapters``: adapters,
frozen bases and trained modules in separate units); ``init_seed`` makes every rank start from the same
weights, which FSDP2 needs (it does not broadcast). See ``lora_lightning.distributed``.

Memory: ``dtype`` ("bf16", "fp16") loads the frozen backbone in that dtype while the adapters (and the
modules trained in full) stay float32, so their AdamW moments are float32 too; ``gradient_checkpointing``
recomputes each transformer block's activations in backward (transformers' non-reentrant checkpointing: no
input needs ``requires_grad``, so frozen embeddings are fine); ``activation_offload`` (CUDA only) moves what
the forward saves for backward to pinned CPU memory (``lora_lightning.offload``: costs PCIe time, see there).
At the start of ``fit`` the expected peak memory per device is printed (``lora_lightning.memory``: frozen
weights, adapters + gradients + AdamW state, activations of one micro-batch of the datamodule's
``batch_size`` × ``max_length``) with a warning when it exceeds the device's free memory.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from typing import Any, Optional, Union

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.module import _IncompatibleKeys

from .backbones import build_backbone, default_task
from .callbacks import (
    ALLoRARescaling,
    DropoutRemoval,
    GradientFlowCheck,
    NonFiniteGuard,
    SDSReorthonormalization,
    SupervisionCheck,
)
from .callbacks.nonfinite import MODES as NONFINITE_MODES
from .config import AdapterConfig, parse_dtype
from .distributed import shard_adapters
from .generation import GenerationOptions, as_generation_options
from .inject import adapter_layers, inject_adapters
from .memory import available_memory, estimate_memory
from .offload import offload_activations
from .quantize import check_mode, describe, ignore_4bit_in_ddp, kept_4bit, nf4_available, quantize_model
from .state import adapter_state_dict
from .tasks import ClassificationTask, get_task

# Default learning rate per scaling rule (methods inherit it through their rule: DoRA → "lora" ...).
DEFAULT_LR: dict[str, float] = {"lora": 1e-3, "rslora": 5e-4, "lora_alpha": 5e-5, "none": 1e-3}

# Callbacks a method needs. configure_callbacks adds each one (default options) unless the Trainer
# already has a callback of that type: the user's own settings (e.g. callbacks/sds.yaml) win.
METHOD_CALLBACKS: dict[str, list[type[Callback]]] = {
    "sds": [SDSReorthonormalization],
    "allora": [ALLoRARescaling, DropoutRemoval],
}

DECAY_GROUPS = ("adapter", "head")
SCHEDULERS = ("cosine", "constant")
WEIGHT_DECAY_MODES = ("decoupled", "coupled")


def default_lr(adapter: AdapterConfig) -> float:
    """The learning rate ``lr=None`` means (module docstring): ALLoRA's base rate DEFAULT_LR["lora"] / η, else
    ``DEFAULT_LR`` of the scaling rule."""
    if adapter.allora_eta is not None:
        return DEFAULT_LR["lora"] / adapter.allora_eta
    return DEFAULT_LR.get(adapter.scaling_rule, DEFAULT_LR["lora"])


def _as_adapter_config(adapter: Union[AdapterConfig, dict, None]) -> AdapterConfig:
    if adapter is None:
        return AdapterConfig()
    if isinstance(adapter, dict):
        return AdapterConfig.from_dict(adapter)
    return dataclasses.replace(adapter)  # a private copy: the default instance may be shared


def _run_in_float32(module: nn.Module) -> None:
    """Keep ``module`` (trained in full over a low-precision base) in float32: its inputs are cast up and its
    output back to the input's dtype, so the layers around it are unaffected."""
    module.float()

    def cast_in(mod: nn.Module, args: tuple) -> tuple:
        floats = [a.dtype for a in args if isinstance(a, Tensor) and a.is_floating_point()]
        mod._lora_lightning_in_dtype = floats[0] if floats else None
        return tuple(a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)

    def cast_out(mod: nn.Module, args: tuple, out: Any) -> Any:
        dtype = mod._lora_lightning_in_dtype
        return out.to(dtype) if dtype is not None and isinstance(out, Tensor) and out.is_floating_point() else out

    module.register_forward_pre_hook(cast_in)
    module.register_forward_hook(cast_out)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """transformers' gradient checkpointing, non-reentrant (``use_reentrant=False``: gradients reach the
    adapters inside a block even though the block's input, the frozen embeddings' output, needs no grad)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"model.gradient_checkpointing: {type(model).__name__} does not support transformers' gradient "
            "checkpointing; set it to false (in your own module, wrap blocks in torch.utils.checkpoint.checkpoint "
            "with use_reentrant=False)"
        )
    kwargs = {"use_reentrant": False}
    if callable(getattr(model, "activation_checkpointing_enable", None)):  # transformers ≥ 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(getattr(model, "config", None), "use_cache"):
        model.config.use_cache = False


class LoRAModule(LightningModule):
    """Fine-tune ``backbone`` with ``adapter`` on a ``task``.

    Args:
        backbone: a spec (see ``lora_lightning.backbones``: transformers name/path, ``pkg://...``,
            ``timm:<name>``, class path) or an ``nn.Module``.
        num_classes: number of classes of the new head (classification).
        task: "sequence_classification", "image_classification", "regression", "causal_lm" or "auto" (from
            the backbone: a transformers causal LM → causal_lm, another transformers model →
            sequence_classification, anything else → image_classification).
        pretrained: load pretrained weights (False: random init, seeded by ``init_seed``).
        adapter: the AdapterConfig (YAML: ``model.adapter.method: rslora``, ``model.adapter.r: 16``).
        lr: adapter learning rate; None = ``DEFAULT_LR`` of the method's scaling rule.
        head_lr: learning rate of ``modules_to_save`` (the head); None = ``lr``.
        weight_decay: decay λ on the matrices of the groups in ``decay_on``.
        decay_on: which groups get decay: any of "adapter", "head" (None = both; [] = none).
        weight_decay_mode: "decoupled" (AdamW) or "coupled" (Adam with λ·p added to the gradient, i.e. the
            penalty λ/2·‖p‖² in the loss; module docstring).
        warmup: linear warm-up, a fraction of all optimizer steps if < 1, else a number of steps.
        scheduler: "cosine" (decay to ``min_lr_ratio``·lr) or "constant" after warm-up.
        min_lr_ratio: the cosine floor as a fraction of the peak LR.
        betas: Adam betas.
        init_seed: seed for building the backbone and the adapter init (None = the global seed at
            construction); stored in the checkpoint so a reload rebuilds the same frozen weights.
        dtype: load the frozen backbone in "bf16" / "fp16" / "fp32" (None: torch's default, i.e. float32 or
            what ``trainer.precision: bf16-true`` sets); with "bf16"/"fp16" the adapters and modules trained
            in full stay float32 (``adapter.dtype`` overrides).
        gradient_checkpointing: recompute activations in backward (transformers models).
        activation_offload: on CUDA, keep the tensors saved for backward in pinned CPU memory (refused on CPU).
        task_options: keyword arguments of the task (e.g. the causal LM's ``loss_chunk_size``: tokens per
            chunk of the target-only lm_head + cross-entropy, 0 = the model's full logits; ``loss_backend``).
        generation: decoding options of ``predict`` and the generation callback (causal LM).
        compile: ``torch.compile`` the adapted backbone in place (``nn.Module.compile``: state dict keys
            unchanged) after injection and sharding. The adapter layers, the fused Functions and the patched
            gated MLPs trace without graph breaks.
        nonfinite: what a NaN/inf loss or gradient does: "stop" the run with an error naming the step (default),
            "skip" the optimizer step, or "ignore" it (``NonFiniteGuard``, added unless the Trainer has one).
        checks: catch runs that silently learn nothing: ``GradientFlowCheck`` (a trainable tensor without a
            non-zero gradient in the first steps is an error) and ``SupervisionCheck`` (batches whose labels are
            all -100 are counted and warned, an epoch of them is an error). Added unless the Trainer has them.
        quantize: QLoRA: "nf4" stores every frozen linear of the backbone in 4 bits (torchao NF4, block 64,
            double-quantised scales; the adapters' bases included; ``lora_lightning.quantize``), "bnb-nf4" the
            same with bitsandbytes (CUDA), "none" (default) keeps them in ``dtype``. A pretrained causal LM is
            streamed in tensor by tensor and quantised as it arrives (never held in 16 bits); other backbones are
            built, then quantised after the adapters are injected. The adapters stay float32.
        quantize_lm_head: quantise the lm_head too (it stays in ``dtype`` by default, as do embeddings/norms).
    """

    def __init__(
        self,
        backbone: Union[str, nn.Module],
        num_classes: int = 2,
        task: str = "auto",
        pretrained: bool = True,
        adapter: AdapterConfig = AdapterConfig(),  # noqa: B008 - copied in __init__; a dataclass default for the CLI
        lr: Optional[float] = None,
        head_lr: Optional[float] = None,
        weight_decay: float = 0.01,
        decay_on: Optional[list[str]] = None,
        weight_decay_mode: str = "decoupled",
        warmup: float = 0.1,
        scheduler: str = "cosine",
        min_lr_ratio: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        init_seed: Optional[int] = None,
        dtype: Optional[str] = None,
        gradient_checkpointing: bool = False,
        activation_offload: bool = False,
        task_options: Optional[dict[str, Any]] = None,
        generation: GenerationOptions = GenerationOptions(),  # noqa: B008 - copied in __init__
        compile: bool = False,
        nonfinite: str = "stop",
        checks: bool = True,
        quantize: str = "none",
        quantize_lm_head: bool = False,
    ) -> None:
        super().__init__()
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite={nonfinite!r}: choose one of {', '.join(NONFINITE_MODES)}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer ≥ 2 (got {num_classes!r})")
        decay_on = list(DECAY_GROUPS) if decay_on is None else list(decay_on)
        if set(decay_on) - set(DECAY_GROUPS):
            raise ValueError(f"decay_on={decay_on!r}: entries must be among {DECAY_GROUPS}")
        if weight_decay_mode not in WEIGHT_DECAY_MODES:
            raise ValueError(f"weight_decay_mode={weight_decay_mode!r}: choose one of {', '.join(WEIGHT_DECAY_MODES)}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler={scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        if warmup < 0:
            raise ValueError(f"warmup must be ≥ 0 (a fraction < 1 or a number of steps), got {warmup}")
        check_mode(quantize)  # a typo, or bnb-nf4 without CUDA / bitsandbytes: one error naming the fix
        if quantize == "nf4":
            nf4_available()
        self.adapter_config = _as_adapter_config(adapter)
        self.base_dtype = parse_dtype(dtype)
        self.generation = as_generation_options(generation)
        self.task_name = default_task(backbone) if task == "auto" else task
        self.task = get_task(self.task_name, task_options)
        self.lr = lr if lr is not None else default_lr(self.adapter_config)
        self.head_lr = head_lr if head_lr is not None else self.lr
        self.decay_on = decay_on
        self.init_seed = init_seed if init_seed is not None else torch.initial_seed() % 2**31
        object.__setattr__(self, "_backbone_spec", backbone)  # a module instance becomes self.model later
        self.model: Optional[nn.Module] = None
        self.label_names: Optional[list[str]] = None  # class names by id (module docstring)
        self._final_line: Optional[str] = None  # printed at teardown, after the progress bar
        self.strict_loading = False  # checkpoints hold adapter + head tensors only

        ignore = ["adapter", "generation"] + (["backbone"] if isinstance(backbone, nn.Module) else [])
        self.save_hyperparameters(ignore=ignore)
        self.hparams["adapter"] = dataclasses.asdict(self.adapter_config)  # plain types: weights_only loads
        self.hparams["generation"] = dataclasses.asdict(self.generation)
        self.hparams["init_seed"] = self.init_seed
        self._step_targets: Optional[Tensor] = None  # target count of the optimizer step so far (this device)

        self.val_metrics = self.task.metrics(num_classes, prefix="val_")
        self.test_metrics = self.task.metrics(num_classes, prefix="test_")

    # -- model ------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build the backbone and inject the adapters (once: Lightning may call this more than once)."""
        if self.model is not None:
            return
        h = self.hparams
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            model = build_backbone(
                self._backbone_spec, h.num_classes, h.pretrained, self.task.model_class,
                self.task.model_kwargs(h.num_classes), self.base_dtype, h.quantize, h.quantize_lm_head,
            )
            config = self.adapter_config
            if config.modules_to_save is None:
                config = dataclasses.replace(config, modules_to_save=self.task.default_modules_to_save(model))
            low_precision = self.base_dtype in (torch.bfloat16, torch.float16)
            if self.base_dtype is not None:
                with kept_4bit(model, lambda t: t):  # a streamed 4-bit load is in base_dtype already
                    model.to(self.base_dtype)  # transformers models are loaded in it; timm / own modules are cast
            if low_precision and config.dtype is None:
                config = dataclasses.replace(config, dtype="float32")
            report = inject_adapters(model, config, verbose=False)
            if h.quantize != "none":  # after injection: the adapters' frozen bases are quantised too
                quantize_model(model, h.quantize, h.quantize_lm_head)
        if low_precision:
            for name in report.modules_to_save:
                _run_in_float32(model.get_submodule(name))
        if h.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.train()  # transformers returns models in eval mode; Lightning keeps each module's mode
        if self.global_rank == 0:
            print(report)
            if h.quantize != "none":
                print(describe(model, h.quantize))
        if self.device_mesh is not None:  # ModelParallelStrategy: shard with FSDP2 (lora_lightning.distributed)
            shard_adapters(model, self.device_mesh)
        if self.hparams.get("compile", False):
            model.compile()
        self.model = model
        if h.quantize != "none":
            ignore_4bit_in_ddp(self)  # every rank builds the same 4-bit weights; DDP's broadcast would garble them
        self._name_classes()

    # -- class names ------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Agree on class names with the datamodule (module docstring): the model's own win, else the data's."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if datamodule is None or not hasattr(datamodule, "label_names"):
            return
        if self.label_names is not None and hasattr(datamodule, "set_label_names"):
            datamodule.set_label_names(self.label_names)
        elif datamodule.label_names is not None:
            self.label_names = list(datamodule.label_names)
            self._name_classes()

    def _name_classes(self) -> None:
        names = self.label_names
        if names is not None and len(names) != self.hparams.num_classes:
            raise ValueError(
                f"{len(names)} class names {names} but num_classes={self.hparams.num_classes}: make them agree"
            )
        config = getattr(self.model, "config", None)
        if names is not None and hasattr(config, "id2label"):  # transformers: carried by save_pretrained exports
            config.id2label = dict(enumerate(names))
            config.label2id = {n: i for i, n in enumerate(names)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.label_names is not None:
            checkpoint["label_names"] = list(self.label_names)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("label_names") is not None:
            self.label_names = list(checkpoint["label_names"])
            self._name_classes()

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """Module casts and moves leave 4-bit weights 4-bit (``quantize.kept_4bit``): Lightning's "bf16-true"
        ``convert_module`` or a ``.to(dtype)`` would otherwise dequantise them."""
        with kept_4bit(self, fn):
            return super()._apply(fn, recurse)

    def forward(self, batch: Any) -> Any:
        """The task's predictions for ``batch`` (class ids, values, generated tokens)."""
        return self.task.predict(self.model, batch, self.generation)

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """Only the adapter tensors and ``modules_to_save`` (= ``adapter_state_dict(self.model)``)."""
        full = super().state_dict(*args, prefix=prefix, keep_vars=keep_vars)
        if self.model is not None and adapter_layers(self.model):
            keep = {f"{prefix}model.{k}" for k in adapter_state_dict(self.model)}
            full = OrderedDict((k, v) for k, v in full.items() if k in keep)
        if destination is None:
            return full
        destination.update(full)
        return destination

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> _IncompatibleKeys:
        """Load a ``state_dict`` of adapter + head tensors; the frozen base may be absent, anything we would
        save may not."""
        wanted = set(self.state_dict())
        keys = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = sorted(k for k in keys.missing_keys if k in wanted)
        if missing:
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            raise RuntimeError(
                f"checkpoint lacks trainable tensors {', '.join(missing[:5])}{more}: it was saved with another "
                "backbone or adapter config; build the LoRAModule with the same model/adapter settings"
            )
        if strict and keys.unexpected_keys:
            raise RuntimeError(f"unexpected keys in state_dict: {', '.join(keys.unexpected_keys[:5])}")
        return _IncompatibleKeys(missing, keys.unexpected_keys)

    # -- steps ------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.hparams.activation_offload:
            with offload_activations(self.model):
                loss_sum, n = self.task.loss(self.model, batch)
        else:
            loss_sum, n = self.task.loss(self.model, batch)
        n = n.detach()
        self._step_targets = n if self._step_targets is None else self._step_targets + n
        self.log("train_loss", loss_sum.detach() / n.clamp_min(1), prog_bar=True, batch_size=1)
        return loss_sum  # the sum: optimizer_step divides the gradients by the step's target count

    def _eval_step(self, batch: Any, stage: str) -> None:
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        out = self.task.forward(self.model, batch)
        metrics.update(**out.metric_inputs)
        weight = max(1, int(out.n_targets))  # the epoch value is the mean over targets, not over batches
        self.log(f"{stage}_loss", out.mean_loss, prog_bar=True, batch_size=weight)
        self.log_dict(metrics, prog_bar=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        """The task's predictions: classes (their names when ``label_names`` is known, else their ids), vectors
        (regression), or {"index", "tokens"} of generated completions (causal LM; ``CompletionWriter`` writes
        them)."""
        predictions = self.task.predict(self.model, batch, self.generation)
        if self.label_names is not None and isinstance(self.task, ClassificationTask):
            return [self.label_names[i] for i in predictions.tolist()]
        return predictions

    def on_train_start(self) -> None:
        self._step_targets = None

    def on_fit_start(self) -> None:
        if self.hparams.activation_offload and self.device.type != "cuda":
            raise ValueError(
                f"model.activation_offload moves the tensors saved for backward to pinned CPU memory, which only "
                f"helps on CUDA; this run is on {self.device.type}: set model.activation_offload: false"
            )
        if self.global_rank == 0:
            self.report_memory()

    def report_memory(self) -> None:
        """Print the expected peak memory of a training step (``lora_lightning.memory``) and warn when it
        exceeds what the device has free. The micro-batch is the datamodule's ``batch_size`` × ``max_length``."""
        dm = getattr(self.trainer, "datamodule", None)
        hp = getattr(dm, "hparams", {}) or {}
        batch, length = hp.get("batch_size"), hp.get("max_length")
        precision = str(getattr(self.trainer, "precision", ""))
        compute = torch.bfloat16 if "bf16" in precision else torch.float16 if precision.startswith("16") else None
        if batch and length:
            estimate = estimate_memory(
                self.model, int(batch), int(length), gradient_checkpointing=bool(self.hparams.gradient_checkpointing),
                loss_chunk_size=getattr(self.task, "loss_chunk_size", None), compute_dtype=compute,
            )
            shape = f"micro-batch {batch} × {length} tokens"
        else:
            estimate = estimate_memory(self.model, 1, 1)
            estimate.activations = None
            estimate.transient = 0
            estimate.notes.append("the datamodule has no batch_size / max_length: activations not estimated")
            shape = "no batch shape known"
        if self.hparams.activation_offload:
            estimate.notes.append("activation_offload: the activations above sit in pinned host memory instead")
            offloaded = estimate.activations or 0
            estimate.activations = None if estimate.activations is None else 0
            estimate.notes.append(f"host memory for them: {offloaded / 2**20:,.1f} MiB")
        if self.trainer.world_size > 1:
            estimate.notes.append(f"per device of {self.trainer.world_size}; FSDP shards weights and state further")
        available, where = available_memory(self.device)
        print(f"memory estimate per device ({shape}, {self.device}):\n{estimate.table(available, where)}")
        if available is not None and estimate.peak > available:
            rank_zero_warn(
                f"the expected peak memory ({estimate.peak / 2**30:.2f} GiB) exceeds the {where} "
                f"({available / 2**30:.2f} GiB): lower data.batch_size or data.max_length, or set "
                "model.gradient_checkpointing: true, model.dtype: bf16, model.activation_offload: true (CUDA)"
            )

    def on_fit_end(self) -> None:
        summary = self.task.summary(self.trainer.callback_metrics)
        self._final_line = f"final validation (step {self.global_step}): {summary}" if summary else None

    def teardown(self, stage: str) -> None:
        """Print the final validation metrics after the progress bar has closed (its callback's teardown runs
        before the module's), so they are the last line of the run."""
        if stage == "fit" and self._final_line and self.global_rank == 0:
            print(self._final_line)
        self._final_line = None

    # -- optimisation -----------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """Optimiser groups: adapter / head × decay / no decay (1-D tensors: biases, norms), empty ones dropped."""
        adapter_ids = {
            id(p)
            for layer in adapter_layers(self.model).values()
            for n, p in layer.named_parameters()
            if not n.startswith("base.")
        }
        groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for p in self.parameters():
            if p.requires_grad:
                kind = "adapter" if id(p) in adapter_ids else "head"
                groups.setdefault((kind, p.ndim >= 2 and kind in self.decay_on), []).append(p)
        wd = self.hparams.weight_decay
        return [
            {
                "name": kind if decay else f"{kind}_no_decay",
                "params": params,
                "lr": self.lr if kind == "adapter" else self.head_lr,
                "weight_decay": wd if decay else 0.0,
            }
            for (kind, decay), params in sorted(groups.items())
        ]

    def lr_factor(self, total_steps: float):
        """The LambdaLR multiplier as a function of the optimizer step (see module docstring)."""
        warmup, scheduler, floor = self.hparams.warmup, self.hparams.scheduler, self.hparams.min_lr_ratio
        if 0 < warmup < 1 and math.isinf(total_steps):
            raise ValueError(
                "a warmup fraction needs a finite run: set trainer.max_steps or max_epochs, or warmup in steps"
            )
        warm = int(warmup) if warmup >= 1 else int(round(warmup * total_steps))
        if scheduler == "cosine" and math.isinf(total_steps):
            rank_zero_warn("no finite trainer.max_steps/max_epochs: the cosine schedule is constant after warm-up")
            scheduler = "constant"

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            if scheduler == "constant":
                return 1.0
            progress = min(1.0, (step - warm) / max(1.0, total_steps - warm))
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        return factor

    def optimizer(self) -> torch.optim.Optimizer:
        """AdamW (``weight_decay_mode="decoupled"``) or Adam with coupled L2 decay over ``param_groups()``."""
        cls = torch.optim.AdamW if self.hparams.weight_decay_mode == "decoupled" else torch.optim.Adam
        return cls(self.param_groups(), lr=self.lr, betas=tuple(self.hparams.betas))

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The step, with the accumulated gradients turned into the mean over the step's targets (module
        docstring) inside the closure: after the last micro-batch's backward, before any hook sees them."""

        def closure() -> Any:
            result = optimizer_closure()
            self.normalize_gradients()
            return result

        optimizer.step(closure=closure)

    @torch.no_grad()
    def normalize_gradients(self) -> None:
        """Multiply every gradient by A·W/N: A accumulation micro-batches, W devices, N = the targets of the
        step over all of them (all-reduced)."""
        if self._step_targets is None:
            return
        total = self.trainer.strategy.reduce(self._step_targets.clone().float(), reduce_op="sum")
        factor = self.trainer.accumulate_grad_batches * self.trainer.world_size / max(1.0, float(total))
        self._step_targets = None
        if factor != 1.0:
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(factor)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer()
        total = float(self.trainer.estimated_stepping_batches)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- method callbacks -------------------------------------------------------------------------
    def configure_callbacks(self) -> list[Callback]:
        """The callbacks ``METHOD_CALLBACKS`` lists for this method, those the task needs (the causal LM's
        ``CompletionWriter``) and ``NonFiniteGuard(mode=nonfinite)`` + the silent-failure checks, minus types the
        Trainer already has (the user's own settings win)."""
        present = list(self.trainer.callbacks) if self._trainer is not None else []
        needed = METHOD_CALLBACKS.get(self.adapter_config.method, []) + self.task.callbacks()
        callbacks = [cls() for cls in needed if not any(isinstance(cb, cls) for cb in present)]
        mode = self.hparams.get("nonfinite", "stop")
        wanted = [NonFiniteGuard(mode=mode)] if mode != "ignore" else []
        if self.hparams.get("checks", True):
            wanted += [GradientFlowCheck(), SupervisionCheck()]
        return callbacks + [cb for cb in wanted if not any(isinstance(p, type(cb)) for p in present)]


__all__ = ["DEFAULT_LR", "METHOD_CALLBACKS", "LoRAModule", "default_lr"]
