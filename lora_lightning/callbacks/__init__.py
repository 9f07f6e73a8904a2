"""Lightning callbacks for adapters. Each finds its layers with ``adapter_layers(pl_module)``, so it works
on any LightningModule that contains lora_lightning adapter layers, not only ``LoRAModule``."""

from .adapter_checkpoint import AdapterCheckpoint
from .allora import ALLoRARescaling
from .dropout import DropoutRemoval
from .generation import GenerationSamples
from .monitor import AdapterMonitor
from .predictions import CompletionWriter
from .sds import SDSReorthonormalization

__all__ = [
    "ALLoRARescaling",
    "AdapterCheckpoint",
    "AdapterMonitor",
    "CompletionWriter",
    "DropoutRemoval",
    "GenerationSamples",
    "SDSReorthonormalization",
]
