"""Adapters on many devices: DDP, FSDP2 (``fully_shard``) and FSDP1 (``FSDPStrategy``) units, sharded tensors.

DDP (``--trainer.strategy=ddp``) needs nothing special: every rank holds the whole model, gradients of the
trainable tensors are averaged, so 2 ranks with batch b take the same steps as 1 rank with batch 2b, and the
SDS / ALLoRA callbacks compute the same bases and coefficients on every rank from identical factors.

FSDP units. FSDP1 flattens all parameters of one wrapped unit into one ``FlatParameter``; a unit holding
both frozen and trainable tensors either fails (``use_orig_params=False``: "uniform requires_grad") or keeps a
gradient buffer for the whole flat parameter, frozen part included (pytorch#104690, litgpt#1417), which
throws away the memory LoRA saves. ``fsdp_units`` gives every trainable tensor a unit with no frozen one:

    every AdapterLayer                       its factors (lora_A, lora_B, DoRA's magnitude), all trainable
    each AdapterLayer's ``base``             frozen W0 (+ bias) in its own unit
    every module owning trainable tensors    ``modules_to_save`` (the head, trained norms)
    transformer blocks (``block_classes``)   only frozen leftovers (attention/MLP layers not targeted, norms)
    the root                                 only frozen leftovers (embeddings ...)

Exception: DoRA and Conv2d adapter layers read ``base.weight`` in their own forward (DoRA's row norm
‖W0 + s·B·A‖, the Conv2d kernel shape), so their base stays in their unit. Under FSDP1 that unit mixes
frozen and trainable tensors, which works with ``use_orig_params=True`` (Lightning's default) at the cost of a
W0-sized gradient buffer per such layer; FSDP2 shards each tensor on its own, so there it costs nothing.

FSDP2: ``LoRAModule`` applies ``shard_adapters`` in ``configure_model`` when it runs under Lightning's
``ModelParallelStrategy`` (``self.device_mesh`` is set): ``fully_shard`` on the units above, bottom-up, then
on the backbone. Parameters become DTensors sharded along dim 0 (``Shard(0)``), so a rank holds whole rows
of A (r×in) and B (out×r): ALLoRA's per-row norms are local. SDS's QR/SVD need whole matrices:
``full_params`` gathers them and writes the new shards back. ``save_adapter`` gathers every shard (all
ranks call it, rank 0 writes); ``load_adapter`` keeps each rank's shard; ``merge_sharded`` merges. Works on
CPU with gloo (2 processes in the tests) and on GPUs with NCCL.

QLoRA (4-bit frozen bases, ``lora_lightning.quantize``): FSDP2 shards torchao's NF4Tensor as it is (its
``fsdp_pre_all_gather`` / ``fsdp_post_all_gather`` gather the 4-bit codes and scales, not a dense weight, as
torchtune's QLoRA recipes rely on). NF4 splits along dim 0 only into whole double-quantisation groups: a
weight is sharded over W ranks when its out-rows divide by W and numel/W is a multiple of 64·group (group = 256
for Llama/Qwen projections; ``nf4_shardable``).
A 4-bit weight that does not split (a small projection of a test model) is passed to ``fully_shard`` as an
``ignored_params`` entry and stays whole and replicated on every rank, as under DDP (4 bits, frozen: no
gradient to reduce), and its base layer gets no unit of its own, so the adapter layer keeps the fused path.

FSDP1: ``AdapterFSDPStrategy`` (Lightning's ``FSDPStrategy`` with ``adapter_fsdp_policy`` as the default
auto-wrap policy) for GPU users who stay on FSDP1. Outside forward FSDP1 keeps parameters as flattened 1-D
shards, so the SDS / ALLoRA callbacks and ``save_adapter`` refuse them with an error pointing to FSDP2;
Lightning's own checkpoints (``state_dict_type="full"``) still hold the adapter tensors in full.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Union

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn

from .adapters import AdapterLayer, DoRALayer
from .inject import adapter_layers
from .quantize import is_quantized
from .state import DTensor, full_tensor, is_flat_sharded

try:  # torch >= 2.6; 2.4-2.5 ship it under _composable
    from torch.distributed.fsdp import fully_shard
except ImportError:  # pragma: no cover
    from torch.distributed._composable.fsdp import fully_shard

BlockClasses = Union[str, Sequence[Union[str, type]], None]


def _base_separable(layer: AdapterLayer) -> bool:
    """Whether the layer only reaches W0 through ``base(x)`` (so ``base`` can be its own unit)."""
    return not isinstance(layer, DoRALayer) and layer.kind != "conv2d"


def _block_names(model: nn.Module, block_classes: BlockClasses) -> set[str]:
    if block_classes == "auto":  # transformers' own list of blocks not to split (what accelerate wraps)
        return {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    return {c if isinstance(c, str) else c.__name__ for c in (block_classes or [])}


def nf4_shardable(weight: Tensor, world_size: int) -> bool:
    """Whether FSDP2 can shard this 4-bit NF4 weight over ``world_size`` ranks (module docstring): whole rows and
    whole double-quantisation groups (64·``scaler_block_size`` weights) per rank."""
    if type(weight).__name__ != "NF4Tensor":
        return False
    group = weight.block_size * weight.scaler_block_size
    return weight.shape[0] % world_size == 0 and weight.numel() % (world_size * group) == 0


def unshardable_4bit(model: nn.Module, world_size: int) -> set[nn.Parameter]:
    """4-bit weights FSDP2 cannot shard over ``world_size`` ranks: kept whole (``ignored_params``)."""
    return {p for p in model.parameters() if is_quantized(p) and not nf4_shardable(p, world_size)}


def fsdp_units(
    model: nn.Module, block_classes: BlockClasses = "auto", ignored: frozenset = frozenset()
) -> list[nn.Module]:
    """The submodules of ``model`` that get their own FSDP unit, children before parents (see module
    docstring). ``block_classes``: class names (or classes) of blocks to wrap too; "auto" = the
    ``_no_split_modules`` of transformers models inside ``model``; None = none. ``ignored``: parameters FSDP
    leaves alone; a base layer holding nothing else gets no unit."""
    layers = adapter_layers(model).values()
    inside = {id(m) for layer in layers for m in layer.modules() if m is not layer}
    wanted = {id(layer) for layer in layers}
    wanted |= {
        id(layer.base)
        for layer in layers
        if _base_separable(layer) and any(p not in ignored for p in layer.base.parameters())
    }
    blocks = _block_names(model, block_classes)
    for m in model.modules():
        own_trainable = any(p.requires_grad for p in m.parameters(recurse=False))
        if (own_trainable and id(m) not in inside) or type(m).__name__ in blocks:
            wanted.add(id(m))
    wanted.discard(id(model))
    return [m for m in reversed(list(model.modules())) if id(m) in wanted]


def adapter_fsdp_policy(model: nn.Module, block_classes: BlockClasses = "auto") -> Callable[..., bool]:
    """An FSDP1 ``auto_wrap_policy`` (``lambda_auto_wrap_policy``) that wraps exactly ``fsdp_units(model)``;
    build it after the adapters are injected (``AdapterFSDPStrategy`` does, in ``setup``)."""
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    ids = {id(m) for m in fsdp_units(model, block_classes)}
    return functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda module: id(module) in ids)


class AdapterFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` (FSDP1, GPUs only) wrapping with ``adapter_fsdp_policy`` unless an
    ``auto_wrap_policy`` is given. ``block_classes``: as in ``fsdp_units`` (YAML: a list of class names).
    Every other argument is ``FSDPStrategy``'s."""

    def __init__(self, block_classes: BlockClasses = "auto", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.block_classes = block_classes

    def setup_environment(self) -> None:
        if self.root_device.type == "cpu":
            raise ValueError(
                "AdapterFSDPStrategy (FSDP1) needs GPUs (accelerator='gpu'); on CPU shard with FSDP2 instead: "
                "strategy ModelParallelStrategy(data_parallel_size=<devices>, tensor_parallel_size=1), "
                "see configs/fsdp.yaml"
            )
        super().setup_environment()

    def setup(self, trainer: Any) -> None:
        if "auto_wrap_policy" not in self.kwargs:  # configure_model has run: the adapters exist
            self.kwargs["auto_wrap_policy"] = adapter_fsdp_policy(self.lightning_module, self.block_classes)
        super().setup(trainer)


def data_parallel_mesh(mesh: Any) -> Any:
    """The 1-D data-parallel mesh to shard over: ``mesh`` itself if 1-D, else its "data_parallel" dimension
    (Lightning's ModelParallelStrategy mesh) when tensor parallelism is off."""
    if mesh.ndim == 1:
        return mesh
    names = mesh.mesh_dim_names or ()
    if "data_parallel" not in names or mesh.size() != mesh["data_parallel"].size():
        raise ValueError(
            "adapters shard with FSDP2 over data parallelism only, but the device mesh is "
            f"{dict(zip(names, mesh.shape))}; "
            "use ModelParallelStrategy(data_parallel_size=<number of devices>, tensor_parallel_size=1)"
        )
    return mesh["data_parallel"]


def shard_adapters(model: nn.Module, mesh: Any, block_classes: BlockClasses = "auto", **fsdp_kwargs: Any) -> nn.Module:
    """FSDP2: ``fully_shard`` every module of ``fsdp_units(model)`` (bottom-up), then ``model`` itself, over
    ``mesh`` (a 1-D DeviceMesh, or Lightning's 2-D one with tensor_parallel_size=1). Call it after
    ``inject_adapters`` with the same initial weights on every rank (FSDP2 does not broadcast: seed first).
    ``fsdp_kwargs`` go to ``fully_shard`` (``mp_policy``, ``reshard_after_forward`` ...). Returns ``model``."""
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("model is already sharded (it has DTensor parameters); call shard_adapters once")
    mesh = data_parallel_mesh(mesh)
    ignored = unshardable_4bit(model, mesh.size()) | set(fsdp_kwargs.pop("ignored_params", None) or ())
    if ignored:
        fsdp_kwargs["ignored_params"] = ignored
    for module in fsdp_units(model, block_classes, frozenset(ignored)):
        fully_shard(module, mesh=mesh, **fsdp_kwargs)
    fully_shard(model, mesh=mesh, **fsdp_kwargs)
    return model


def check_not_flat_sharded(module: nn.Module, what: str) -> None:
    """Refuse FSDP1's flattened parameter shards (``what`` needs whole adapter matrices)."""
    if is_flat_sharded(module):
        raise RuntimeError(
            f"{what} needs whole adapter matrices, but FSDP1 (FSDPStrategy) keeps parameters as flattened 1-D "
            "shards; shard with FSDP2 instead: strategy ModelParallelStrategy(data_parallel_size=<devices>, "
            "tensor_parallel_size=1) (configs/fsdp.yaml), or use DDP"
        )


def local_part(full: Tensor, like: Tensor) -> Tensor:
    """This rank's part of ``full`` laid out as the DTensor ``like`` (``full`` itself if ``like`` is a plain
    tensor). No communication: every rank must hold the same ``full``."""
    if not isinstance(like, DTensor):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


def local_rows(t: Tensor) -> Tensor:
    """The rows of ``t`` this rank holds, whole: ``t`` itself, or the local shard of a DTensor sharded along
    dim 0 (FSDP2's default) or replicated. A shard along another dim is refused (rows would be split)."""
    if not isinstance(t, DTensor):
        return t
    if any(not (p.is_replicate() or (p.is_shard() and p.dim == 0)) for p in t.placements):
        raise ValueError(
            f"need whole rows but this DTensor is placed {t.placements}; shard adapter factors along dim 0 "
            "(FSDP2's default: do not pass a shard_placement_fn that shards lora_A/lora_B along dim 1)"
        )
    return t.to_local()


@contextmanager
def full_params(module: nn.Module) -> Iterator[None]:
    """Inside the block, the DTensor parameters ``module`` owns directly are whole plain tensors (gathered on
    every rank; all ranks must enter); on exit each rank's shard is written back in place from the (possibly
    changed) whole tensor, so the optimiser's parameter objects and state stay valid. A no-op for plain
    parameters (single device, DDP)."""
    sharded = {name: p for name, p in module.named_parameters(recurse=False) if isinstance(p, DTensor)}
    with torch.no_grad():
        for name, p in sharded.items():
            module._parameters[name] = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
    try:
        yield
    except BaseException:
        module._parameters.update(sharded)  # no collective on the error path: other ranks may not be here
        raise
    with torch.no_grad():
        for name, p in sharded.items():
            p.to_local().copy_(local_part(module._parameters[name].detach(), p))
            module._parameters[name] = p


@torch.no_grad()
def merge_sharded(model: nn.Module, unmerge: bool = False) -> int:
    """``merge_adapters`` (or ``unmerge_adapters``) for an FSDP2-sharded model; every rank must call it. Each
    layer's factors and W0 are gathered whole (``full_params``), merged exactly as on one device, and the
    shards of W0 written back. (Plain ``merge_adapters`` runs on DTensors for the LoRA family but not for
    DoRA and SDS, whose merge uses ops DTensor cannot shard.) Returns the number of layers."""
    layers = adapter_layers(model)
    for layer in layers.values():
        with full_params(layer), full_params(layer.base):
            layer.unmerge() if unmerge else layer.merge()
    return len(layers)


__all__ = [
    "AdapterFSDPStrategy",
    "adapter_fsdp_policy",
    "check_not_flat_sharded",
    "data_parallel_mesh",
    "fsdp_units",
    "full_params",
    "full_tensor",
    "local_part",
    "local_rows",
    "merge_sharded",
    "nf4_shardable",
    "shard_adapters",
    "unshardable_4bit",
]
