"""Use lora_lightning inside your own LightningModule: your model, your loss, our adapters and callbacks.

    python examples/own_module.py --steps 60                     # 1 CPU process
    python examples/own_module.py --devices 2 --strategy ddp     # DDP
    python examples/own_module.py --devices 2 --strategy fsdp2   # FSDP2 (ModelParallelStrategy)

``SentimentClassifier`` stands for an existing LightningModule: a transformers classifier trained with a
label-smoothed cross-entropy, logging its own metrics. lora_lightning adds three things:

1. ``inject_adapters(self.model, AdapterConfig(method="allora", r=4))`` in ``__init__`` wraps every Linear
   layer but the head, freezes the rest and keeps the head (``modules_to_save``) trainable;
   ``configure_optimizers`` only has to pass the parameters that require grad.
2. Callbacks that find the adapters on any LightningModule: ``ALLoRARescaling`` (configures and logs ALLoRA's
   per-row gradient scaling, which the adapter layers apply in their own backward), ``AdapterMonitor`` (ΔW
   spectra), ``AdapterCheckpoint`` (adapter-only safetensors files).
3. For FSDP2, ``configure_model`` calls ``shard_adapters`` when Lightning gives it a device mesh.

The data is synthetic and offline: sequences of 15 "words" labelled 1 when they hold more positive words
(ids 5..9) than negative ones (10..14); the backbone is a small BERT with random weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

from lora_lightning import AdapterConfig, inject_adapters
from lora_lightning.callbacks import AdapterCheckpoint, AdapterMonitor, ALLoRARescaling
from lora_lightning.distributed import shard_adapters

VOCAB, SEQ = 100, 15  # odd length: no ties


def build_model(seed: int = 0) -> BertForSequenceClassification:
    """The user's backbone (here a 2-layer, 32-wide BERT with random weights; from_pretrained works too)."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=SEQ, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def make_data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 15, (n, SEQ), generator=g)  # 5 "positive" words (5..9), 5 "negative" (10..14)
    labels = ((ids < 10).sum(1) > SEQ // 2).long()
    mask = torch.ones(SEQ, dtype=torch.long)
    return [{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(n)]


class SentimentClassifier(LightningModule):
    """A user's LightningModule: its own model, loss (label smoothing) and optimiser, plus adapters."""

    def __init__(self, adapter: AdapterConfig, lr: float = 1e-2, label_smoothing: float = 0.1, seed: int = 0):
        super().__init__()
        self.model = build_model(seed)
        self.report = inject_adapters(self.model, adapter, verbose=False)  # <- the lora_lightning line
        self.lr, self.label_smoothing = lr, label_smoothing
        self.train_losses: list[float] = []

    def configure_model(self) -> None:
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 units for adapters / frozen bases
            shard_adapters(self.model, self.device_mesh)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch), batch["labels"], label_smoothing=self.label_smoothing)
        self.log("train_loss", loss, prog_bar=True)
        self.train_losses.append(loss.item())
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch)
        self.log("val_loss", F.cross_entropy(logits, batch["labels"]), sync_dist=True)
        self.log("val_acc", (logits.argmax(-1) == batch["labels"]).float().mean(), sync_dist=True, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr, weight_decay=0.0)


def main(argv: Optional[list[str]] = None) -> tuple[SentimentClassifier, Trainer, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16, help="per device")
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-2)  # AdamW; best of 1e-2, 2e-2, 3e-2 here (60 steps)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto", help="auto | ddp | fsdp2")
    parser.add_argument("--out", type=Path, default=Path("runs/own_module"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    seed_everything(args.seed)  # same adapter init on every rank (FSDP2 does not broadcast)
    adapter = AdapterConfig(method="allora", r=args.r)  # every Linear but the head; scale-free, no dropout
    module = SentimentClassifier(adapter, lr=args.lr, seed=args.seed)
    strategy = args.strategy
    if strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    callbacks = [
        ALLoRARescaling(),  # LoRAModule would add it for method="allora"; here we add it ourselves
        AdapterMonitor(every_n_steps=max(1, args.steps // 4)),
        AdapterCheckpoint(dirpath=args.out / "adapters", monitor="val_acc"),
    ]
    trainer = Trainer(
        accelerator="cpu", devices=args.devices, strategy=strategy, max_steps=args.steps, callbacks=callbacks,
        val_check_interval=max(1, args.steps // 2), check_val_every_n_epoch=None, default_root_dir=args.out,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    train = DataLoader(make_data(512, seed=1), batch_size=args.batch_size, shuffle=True)
    val = DataLoader(make_data(128, seed=2), batch_size=64)
    trainer.fit(module, train, val)
    if trainer.is_global_zero:
        print(module.report)
        print(f"train loss {module.train_losses[0]:.3f} -> {module.train_losses[-1]:.3f}, "
              f"val_acc {float(trainer.callback_metrics['val_acc']):.3f}, adapters in {args.out / 'adapters'}")
    return module, trainer, args.out / "adapters"


if __name__ == "__main__":
    main()
