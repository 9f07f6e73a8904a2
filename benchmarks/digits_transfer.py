"""Digits transfer: a timm ConvNet trained on digits 0–4, adapted with LoRA-family adapters to digits 5–9.

    python benchmarks/digits_transfer.py pretrain          # writes runs/digits_base/test_resnet_digits04.safetensors
    lora-lightning compare --config configs/compare_digits.yaml --methods lora,rslora,lora_alpha,dora,sds,allora \
        --seeds 0,1,2 --out runs/compare_digits

Data: sklearn's 8×8 digits (1797 images, offline). ``DigitsSubsetDataModule(classes=[5, 6, 7, 8, 9])`` keeps those
classes, relabels them 0..4 in the given order, and splits them with a fixed seed into train / val; each batch is
upsampled to ``image_size`` (bilinear), repeated to 3 channels and normalised with mean = std = 0.5 (timm's
test_resnet data config).

Backbone: timm's ``test_resnet`` (0.37 M parameters, no download). ``pretrain`` trains all of it from scratch on
digits 0–4 (the same 50/50 seeded split of those classes; its val accuracy is printed). ``DigitsResNet`` loads that
checkpoint and puts a new ``num_classes``-way head on it: the backbone that compare adapts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

CHECKPOINT = "runs/digits_base/test_resnet_digits04.safetensors"
TIMM_NAME = "test_resnet"


def digits_subset(classes: list[int], val_fraction: float, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """(train, val) of the digits in ``classes`` (labels → their index in ``classes``), N×1×8×8 in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    keep = torch.isin(y, torch.tensor(classes))
    x, y = x[keep], y[keep]
    y = torch.tensor([classes.index(int(v)) for v in y])
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_fraction * len(y)))
    val, train = order[:n_val], order[n_val:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


class _Collate:
    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        x = torch.stack([i[0] for i in items])
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False).clamp(0, 1)
        return (x.expand(-1, 3, -1, -1) - 0.5) / 0.5, torch.stack([i[1] for i in items])


class DigitsSubsetDataModule(LightningDataModule):
    """Digits of some classes, relabelled 0..len(classes)-1 (module docstring)."""

    def __init__(
        self,
        classes: Optional[list[int]] = None,
        image_size: int = 32,
        val_fraction: float = 0.5,
        train_size: Optional[int] = None,
        seed: int = 0,
        batch_size: int = 32,
        num_classes: Optional[int] = None,
    ) -> None:
        super().__init__()
        classes = list(classes) if classes is not None else [5, 6, 7, 8, 9]
        if num_classes is not None and num_classes != len(classes):
            raise ValueError(f"model.num_classes ({num_classes}) must equal the number of classes {classes}")
        self.save_hyperparameters()
        self.classes = classes
        self.train_set: Optional[TensorDataset] = None
        self.val_set: Optional[TensorDataset] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is None:
            h = self.hparams
            self.train_set, self.val_set = digits_subset(self.classes, h.val_fraction, h.seed)
            if h.train_size is not None:
                self.train_set = TensorDataset(*(t[: h.train_size] for t in self.train_set.tensors))

    def _loader(self, ds: TensorDataset, shuffle: bool) -> DataLoader:
        collate = _Collate(self.hparams.image_size)
        return DataLoader(ds, batch_size=self.hparams.batch_size, shuffle=shuffle, collate_fn=collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


class DigitsResNet(nn.Module):
    """timm ``test_resnet`` with the weights ``pretrain`` learned on digits 0–4 and a new ``num_classes`` head."""

    def __init__(self, num_classes: int = 5, checkpoint: str = CHECKPOINT) -> None:
        super().__init__()
        import timm
        from safetensors.torch import load_file

        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"{checkpoint} not found; run `python benchmarks/digits_transfer.py pretrain`")
        self.net = timm.create_model(TIMM_NAME, num_classes=5)
        self.net.load_state_dict(load_file(checkpoint))
        self.net.reset_classifier(num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def get_classifier(self) -> nn.Module:
        return self.net.get_classifier()


def pretrain(out: str, epochs: int, lr: float, seed: int) -> None:
    """Train test_resnet from scratch on digits 0–4 (AdamW, batch 32, cosine) and save it as safetensors."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    dm = DigitsSubsetDataModule(classes=[0, 1, 2, 3, 4], seed=seed)
    dm.setup()
    model = timm.create_model(TIMM_NAME, num_classes=5)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * len(dm.train_dataloader())
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        for x, y in dm.train_dataloader():
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            correct = sum((model(x).argmax(-1) == y).sum().item() for x, y in dm.val_dataloader())
        print(f"epoch {epoch + 1}: train loss {loss.item():.4f}, val acc (digits 0-4) {correct / len(dm.val_set):.4f}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
    print(f"saved {out}")


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pre = sub.add_parser("pretrain", help="train the digits 0-4 base model")
    pre.add_argument("--out", default=CHECKPOINT)
    pre.add_argument("--epochs", type=int, default=15)
    pre.add_argument("--lr", type=float, default=3e-3)
    pre.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pretrain(args.out, args.epochs, args.lr, args.seed)


if __name__ == "__main__":
    sys.exit(main())
