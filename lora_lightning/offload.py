"""Activation offload: what autograd saves for backward goes to pinned CPU memory and comes back in backward.

Inside ``offload_activations(model)`` every CUDA tensor autograd saves (``saved_tensors_hooks``) of at least
``min_bytes`` that is not a parameter or buffer of ``model`` (nor a view of one: frozen weights are saved
by reference and must stay where they are) is copied to a pinned host buffer at once and copied back when
backward needs it. With gradient checkpointing only what checkpointing keeps is offloaded (each block's
input and what lies outside the blocks): the blocks' own activations are recomputed on the GPU in backward,
so the GPU then holds almost nothing between forward and backward.

Cost [ours, measured nowhere here: this machine has no GPU]: every offloaded byte crosses PCIe twice per
step, on the compute stream (like ``torch.autograd.graph.save_on_cpu``; torchtune's ``OffloadActivations``
overlaps the copies on side streams instead), so a step slows by about 2·(offloaded bytes)/(PCIe bandwidth),
e.g. 2 × 1 GiB / 25 GB/s ≈ 85 ms on PCIe 4.0 ×16, and the same bytes of page-locked host RAM are held. It
pays when activations, not weights, are what does not fit; with gradient checkpointing the offloaded bytes are
only L·B·T·H·d. On CPU it would only copy memory to memory: ``LoRAModule`` refuses it there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

MIN_BYTES = 2**20  # smaller tensors stay on the GPU: the copy would cost more than it frees


@contextmanager
def offload_activations(model: nn.Module, min_bytes: int = MIN_BYTES) -> Iterator[None]:
    """Offload the tensors saved for backward inside this block to pinned CPU memory (module docstring)."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}

    def pack(t: Tensor):
        storage = t.untyped_storage()
        if t.device.type != "cuda" or storage.nbytes() < min_bytes or storage.data_ptr() in own:
            return t
        host = torch.empty(t.shape, dtype=t.dtype, layout=t.layout, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return t.device, host

    def unpack(packed):
        if isinstance(packed, tuple):
            device, host = packed
            return host.to(device, non_blocking=True)
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


__all__ = ["MIN_BYTES", "offload_activations"]
