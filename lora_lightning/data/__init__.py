"""LightningDataModules on HF ``datasets``: text classification and image classification (digits built in)."""

from .image import ImageClassificationDataModule, digits_dataset
from .text import TextClassificationDataModule

__all__ = ["ImageClassificationDataModule", "TextClassificationDataModule", "digits_dataset"]
