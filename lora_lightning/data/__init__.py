"""LightningDataModules on HF ``datasets``: text classification and image classification (digits built in).
Shared by every datamodule: the bad-row policy (rows.py) and the label vocabulary (labels.py)."""

from .image import ImageClassificationDataModule, digits_dataset
from .rows import BadDataError, BadRowsWarning, filter_bad_rows
from .text import TextClassificationDataModule

__all__ = [
    "BadDataError",
    "BadRowsWarning",
    "ImageClassificationDataModule",
    "TextClassificationDataModule",
    "digits_dataset",
    "filter_bad_rows",
]
