"""LightningDataModules on HF ``datasets``: text and image classification (digits built in), causal-LM data
(chat, instruction, plain text; packing). Shared by every datamodule: the bad-row policy (rows.py) and the
label vocabulary (labels.py)."""

from .causal_lm import CausalLMDataModule
from .image import ImageClassificationDataModule, digits_dataset
from .rows import BadDataError, BadRowsWarning, filter_bad_rows
from .text import TextClassificationDataModule

__all__ = [
    "BadDataError",
    "BadRowsWarning",
    "CausalLMDataModule",
    "ImageClassificationDataModule",
    "TextClassificationDataModule",
    "digits_dataset",
    "filter_bad_rows",
]
