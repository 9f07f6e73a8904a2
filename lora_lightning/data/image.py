"""ImageClassificationDataModule: the built-in offline "digits" set, any HF image dataset, or an image folder,
at the backbone's input size with timm's data config (size, mean, std, interpolation).

"digits" is sklearn's ``load_digits``: 1797 grayscale 8×8 images of 0–9 (values 0..16). It is kept as one
small tensor (N×1×8×8, scaled to [0, 1]); each batch is resized to the input size, repeated to 3 channels
and normalised in the collate function, x ← (resize(x) − mean)/std, which is timm's eval transform with
crop_pct = 1 (a centre crop would cut strokes off an 8×8 digit) done on whole batches instead of
per-image PIL calls. Other datasets use timm's ``create_transform`` per image (train: timm's training
augmentation if ``augment``; eval: resize + centre crop).

Each split as loaded goes through the shared bad-row policy (rows.py: a missing image or label, or a label that is
not a class, is dropped with one counted warning, or is an error); labels map to ids through the label vocabulary
(labels.py: a ClassLabel's own names, or sorted strings), which is saved with the checkpoint and adapter files.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from datasets import Array2D, ClassLabel, Dataset, Features, Image
from torch import Tensor
from torch.utils.data import TensorDataset

from ..backbones import image_data_config
from .common import SplitDataModule, load_any, pick_splits, seeded_subset
from .labels import check_labels
from .rows import BadDataError, check_policy, filter_bad_rows, number_rows

DIGITS = "digits"


def digits_dataset() -> Dataset:
    """sklearn's digits as a ``datasets.Dataset``: "image" (8×8 floats in [0, 1]) and "label" (ClassLabel 0–9)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    features = Features({"image": Array2D((8, 8), "float32"), "label": ClassLabel(names=[str(i) for i in range(10)])})
    return Dataset.from_dict({"image": digits.images / 16.0, "label": digits.target}, features=features)


class _ResizeNormalize:
    """Collate (x, y) pairs of N×C×h×w tensors in [0, 1] into a resized, 3-channel, normalised batch."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.size = tuple(config["input_size"][1:])
        self.mode = "bicubic" if config.get("interpolation") == "bicubic" else "bilinear"
        self.mean = torch.tensor(config["mean"]).view(1, -1, 1, 1)
        self.std = torch.tensor(config["std"]).view(1, -1, 1, 1)

    def __call__(self, items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        x = torch.stack([i[0] for i in items])
        y = torch.stack([i[1] for i in items])
        if x.shape[-2:] != self.size:
            x = F.interpolate(x, size=self.size, mode=self.mode, align_corners=False).clamp_(0.0, 1.0)
        x = x.expand(-1, self.mean.shape[1], -1, -1) if x.shape[1] == 1 else x
        return (x - self.mean) / self.std, y


class ImageClassificationDataModule(SplitDataModule):
    """Image classification.

    Args:
        dataset: "digits" (built in, offline), a hub dataset name (e.g. "uoft-cs/cifar10"), or an image
            folder path (``load_dataset`` infers imagefolder).
        dataset_config: the hub dataset's config name.
        backbone: the model spec; a ``timm:`` spec supplies the data config (the CLI links model.backbone).
        image_size: input size override (default: the model's, or timm's default 224).
        image_column / label_column: default: the first Image column / the first ClassLabel column
            (else "label").
        train_split / val_split / test_split: val_split None = "validation" if present, else a seeded
            ``val_fraction`` of train; test_split None = the validation split.
        train_size: a fixed random subset of the training split (the same for the same ``seed``).
        augment: timm's training augmentation for non-digits datasets.
        labels: the class names in id order; default: the ClassLabel's names, or the sorted string labels.
        on_bad_rows: "drop" rows with a missing image or label, or a label that is not a class (one counted
            warning per split and kind), or "error".
        num_classes: checked against the labels (the CLI links model.num_classes here).
    """

    def __init__(
        self,
        dataset: str = DIGITS,
        dataset_config: Optional[str] = None,
        backbone: Optional[str] = None,
        image_size: Optional[int] = None,
        image_column: Optional[str] = None,
        label_column: Optional[str] = None,
        train_split: str = "train",
        val_split: Optional[str] = None,
        test_split: Optional[str] = None,
        val_fraction: float = 0.2,
        train_size: Optional[int] = None,
        augment: bool = True,
        seed: int = 42,
        batch_size: int = 64,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        labels: Optional[list[Union[str, int]]] = None,
        on_bad_rows: str = "drop",
        num_classes: Optional[int] = None,
    ) -> None:
        super().__init__()
        check_policy(on_bad_rows)
        self.save_hyperparameters()
        self.splits: dict[str, Any] = {}
        self.collate: Any = None

    @property
    def data_config(self) -> dict[str, Any]:
        return image_data_config(self.hparams.backbone, self.hparams.image_size)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.splits:
            return
        h = self.hparams
        if h.dataset == DIGITS:
            splits = {"train": digits_dataset()}
        else:
            splits = dict(load_any(h.dataset, h.dataset_config))
        features = splits[h.train_split].features if h.train_split in splits else next(iter(splits.values())).features
        image_col = h.image_column or next((c for c, f in features.items() if isinstance(f, Image)), "image")
        label_col = h.label_column or next((c for c, f in features.items() if isinstance(f, ClassLabel)), "label")
        if h.train_split not in splits:
            raise ValueError(f"split {h.train_split!r} not in the dataset; available splits: {', '.join(splits)}")
        sources = {name: f"{h.dataset}[{name}]" for name in splits}
        used = [name for name in splits if name in (h.train_split, h.val_split or "validation", h.test_split)]
        for name in used:  # not the others (e.g. an unlabelled test split)
            ds = splits[name]
            for col in (image_col, label_col):
                if col not in ds.features:
                    raise BadDataError(f"{sources[name]}: column {col!r} not found; columns: {', '.join(ds.features)} "
                                     "(set data.image_column / data.label_column)")
            splits[name] = filter_bad_rows(number_rows(ds), [image_col, label_col], sources[name], h.on_bad_rows)
        self.label_names = self._vocabulary(splits[h.train_split], label_col, sources[h.train_split])
        to_id = {}  # raw label value → class id (labels.py), per loaded split
        for name in used:
            splits[name], to_id[name] = check_labels(splits[name], label_col, self.label_names, h.num_classes,
                                                     sources[name], h.on_bad_rows)
        picked = pick_splits(splits, h.train_split, h.val_split, h.test_split, h.val_fraction, h.seed)
        picked["train"] = seeded_subset(picked["train"], h.train_size, h.seed)
        val = h.val_split or ("validation" if "validation" in splits else None)
        origin = {"train": h.train_split, "val": val or h.train_split, "test": h.test_split or val or h.train_split}
        if h.dataset == DIGITS:
            self.splits = {name: self._tensors(ds, image_col, label_col, to_id[origin[name]])
                           for name, ds in picked.items()}
            self.collate = _ResizeNormalize(self.data_config)
        else:
            self.splits = {
                name: self._transformed(ds, image_col, label_col, to_id[origin[name]], train=name == "train")
                for name, ds in picked.items()
            }

    @staticmethod
    def _tensors(ds: Dataset, image_col: str, label_col: str, to_id: dict) -> TensorDataset:
        x = ds.with_format("torch")[:][image_col].float()  # the whole split as one tensor
        ids = torch.tensor([to_id[v] for v in ds[label_col]], dtype=torch.long)
        return TensorDataset(x.unsqueeze(1) if x.ndim == 3 else x, ids)

    def _transformed(self, ds: Dataset, image_col: str, label_col: str, to_id: dict, train: bool) -> Dataset:
        """``ds`` decoded, transformed and its labels mapped through ``to_id`` lazily, per batch."""
        from timm.data import create_transform

        transform = create_transform(**self.data_config, is_training=train and self.hparams.augment)

        def apply(batch: dict[str, list]) -> dict[str, list]:
            return {
                "pixel_values": [transform(img.convert("RGB")) for img in batch[image_col]],
                "labels": [to_id[v] for v in batch[label_col]],
            }

        return ds.with_transform(apply)
