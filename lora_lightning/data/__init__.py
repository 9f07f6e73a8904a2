"""LightningDataModules on HF ``datasets``: text and image classification (digits built in), causal-LM data
(chat, instruction, plain text; packing)."""

from .causal_lm import CausalLMDataModule
from .image import ImageClassificationDataModule, digits_dataset
from .text import TextClassificationDataModule

__all__ = ["CausalLMDataModule", "ImageClassificationDataModule", "TextClassificationDataModule", "digits_dataset"]
