"""Lightning callbacks for adapters. Each finds its layers with ``adapter_layers(pl_module)``, so it works
on any LightningModule that contains lora_lightning adapter layers, not only ``LoRAModule``."""

from .adapter_checkpoint import AdapterCheckpoint
from .allora import ALLoRARescaling
from .dropout import DropoutRemoval
from .generation import GenerationSamples
from .gradient_flow import GradientFlowCheck, GradientFlowError
from .monitor import AdapterMonitor
from .nonfinite import NonFiniteGuard, NonFiniteLossError
from .predictions import CompletionWriter
from .sds import SDSReorthonormalization
from .step_checkpoint import StepCheckpoint
from .supervision import NoSupervisionError, SupervisionCheck

__all__ = [
    "ALLoRARescaling",
    "AdapterCheckpoint",
    "AdapterMonitor",
    "CompletionWriter",
    "DropoutRemoval",
    "GenerationSamples",
    "GradientFlowCheck",
    "GradientFlowError",
    "NoSupervisionError",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "SDSReorthonormalization",
    "StepCheckpoint",
    "SupervisionCheck",
]
