"""Adapters on a sharded or quantized base: gather a sharded adapter's full tensors for saving, and
refuse to merge into a weight that is not a plain floating-point tensor.

FSDP2 (`torch.distributed.fsdp.fully_shard`) turns every parameter, the adapters' included, into a
`DTensor` holding one shard per process; `full_tensor()` all-gathers it (a collective: every process
must call it, in the same order). torchao / bitsandbytes quantize a weight into a tensor subclass
(or an integer tensor) that a Kronecker delta cannot be added to in place.
"""
from __future__ import annotations

import contextlib
import functools
import sys

import torch
import torch.distributed as dist


def _is_dtensor(t) -> bool:
    """Whether `t` is a `DTensor`. No tensor can be one before its module is imported, so importing it here
    (0.7 s) is left to FSDP2: `import kronpeft` and `KronModel` stay fast."""
    module = sys.modules.get("torch.distributed.tensor") or sys.modules.get("torch.distributed._tensor")
    return module is not None and isinstance(t, module.DTensor)


def is_sharded(tensors) -> bool:
    """True when any of `tensors` is a `DTensor` (FSDP2 shards it over processes)."""
    return any(_is_dtensor(t) for t in tensors)


def gather_full(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every `DTensor` replaced by its full (all-gathered) tensor, in key order.
    Collective when anything is sharded: call it on every process."""
    return {key: t.full_tensor() if _is_dtensor(t) else t for key, t in state.items()}


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` (the whole tensor, the same on every process) cut as `like` is: this process's `DTensor`
    shard when `like` is one (no communication), else `full` itself. The inverse of `gather_full`."""
    if not _is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)


@contextlib.contextmanager
def full_params(module: torch.nn.Module):
    """Inside the block, FSDP1 units within `module` hold their full parameters (`summon_full_params`), and
    so do the adapters' ZeRO-3 partitioned parameters (`GatheredParameters`): collectives. Yields whether
    anything was gathered; FSDP2 and unsharded modules pass through unchanged."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    units = [m for m in module.modules() if isinstance(m, FSDP)]
    outermost = [u for u in units if not any(u is not o and any(u is m for m in o.modules()) for o in units)]
    zero3 = [p for n, p in module.named_parameters() if hasattr(p, "ds_id") and ".kronpeft." in f".{n}"]
    with contextlib.ExitStack() as stack:
        for unit in outermost:
            stack.enter_context(FSDP.summon_full_params(unit, writeback=False, recurse=True))
        if zero3:  # DeepSpeed ZeRO-3 partitions every parameter: gather the adapters' alone
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(zero3, modifier_rank=None))
        yield bool(outermost or zero3)


def block_classes(model: torch.nn.Module) -> set[type]:
    """The transformer block classes of `model`: those its Hugging Face models name in `_no_split_modules`."""
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or ())}
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def fsdp1_auto_wrap_policy(model: torch.nn.Module, blocks: set[type] | None = None):
    """An FSDP1 `auto_wrap_policy` under which no flat parameter mixes frozen and trained tensors, so FSDP1's
    default `use_orig_params=False` works: a unit per transformer block (`blocks`, default `block_classes`)
    and one per trained module (each module whose parameters all train while its parent's do not: the
    adapters, a trained head). Pass it as `FullyShardedDataParallel(model, auto_wrap_policy=...)`."""
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    blocks, units = tuple(blocks if blocks is not None else block_classes(model)), _trained_units(model)
    return functools.partial(lambda_auto_wrap_policy,
                             lambda_fn=lambda module: isinstance(module, blocks) or id(module) in units)


def _trained_units(model: torch.nn.Module) -> set[int]:
    """ids of the outermost modules whose parameters all train, looking inside containers (an adapter site
    is a `ModuleDict` that is never called: its adapters are)."""
    def trains(m):
        params = list(m.parameters())
        return params and all(p.requires_grad for p in params)

    units, stack = set(), [model]
    while stack:
        module = stack.pop()
        if trains(module) and not isinstance(module, (torch.nn.ModuleDict, torch.nn.ModuleList)):
            units.add(id(module))
        else:
            stack.extend(module.children())
    return units


def is_main_process() -> bool:
    """Rank 0 of the default process group, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def unmergeable_weight(module_name: str, weight: torch.Tensor, shape: tuple[int, int]) -> str | None:
    """Why `weight` (of `module_name`, whose full weight has `shape`) cannot take a merged delta in place,
    or None when it can."""
    if hasattr(weight, "ds_id"):
        return (f"{module_name}.weight is partitioned by DeepSpeed ZeRO-3. Save the adapter (save_pretrained "
                f"gathers it), then merge it into an unsharded base (KronModel.from_pretrained(base, "
                f"adapter_dir).merge_and_unload(), or `kronpeft merge`)")
    if _is_dtensor(weight):
        return (f"{module_name}.weight is sharded over processes (FSDP2 DTensor); merging would change one shard "
                f"at a time. Save the adapter (save_pretrained gathers it), then merge it into an unsharded base "
                f"(KronModel.from_pretrained(base, adapter_dir).merge_and_unload(), or `kronpeft merge`)")
    plain = type(weight) in (torch.Tensor, torch.nn.Parameter) and type(weight.data) is torch.Tensor
    if not plain or not weight.dtype.is_floating_point:
        kind = type(weight.data).__name__ if type(weight.data) is not torch.Tensor else str(weight.dtype)
        return (f"{module_name}.weight is quantized ({kind}); adding the adapter's delta into it is not defined "
                f"(dequantizing, merging and re-quantizing would add a rounding error the size of the quantization "
                f"step). Run the adapter unmerged, or load the base unquantized to merge "
                f"(KronModel.from_pretrained(base, adapter_dir).merge_and_unload(), or `kronpeft merge`)")
    if _storage_freed(weight):
        return (f"{module_name}.weight is an FSDP1 flat-parameter view (use_orig_params=False) whose storage is "
                f"freed outside forward. Save the adapter (save_pretrained gathers it), then merge it into an "
                f"unsharded base (KronModel.from_pretrained(base, adapter_dir).merge_and_unload(), "
                f"or `kronpeft merge`)")
    if tuple(weight.shape) != tuple(shape):
        return (f"{module_name}.weight holds only this process's part of the weight (shape {tuple(weight.shape)}, "
                f"not {tuple(shape)}: FSDP1 or DeepSpeed ZeRO-3 partition it). Save the adapter (save_pretrained "
                f"gathers it under FSDP1), then merge it into an unsharded base (KronModel.from_pretrained(base, "
                f"adapter_dir).merge_and_unload(), or `kronpeft merge`)")
    return None


def _storage_freed(weight: torch.Tensor) -> bool:
    """True for FSDP1's `use_orig_params=False` views: outside forward the weight keeps its shape while its
    flat parameter's storage is freed (writing into it would crash the process)."""
    needed = (weight.storage_offset() + weight.numel()) * weight.element_size()
    return weight.numel() > 0 and weight.untyped_storage().nbytes() < needed


def partitioned_adapter(module_name: str, adapter: torch.nn.Module) -> str | None:
    """Why the adapter at `module_name` cannot compute its delta here (ZeRO-3 holds a part of its
    tensors on each process), or None when it can."""
    if any(hasattr(p, "ds_id") for p in adapter.parameters()):
        return (f"the adapter at {module_name} is partitioned by DeepSpeed ZeRO-3. Save it (save_pretrained "
                f"gathers it), then merge it into an unsharded base (KronModel.from_pretrained(base, "
                f"adapter_dir).merge_and_unload(), or `kronpeft merge`)")
    return None
