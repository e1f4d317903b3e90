"""Training at scale, runner side: a weight-only quantized frozen base (torchao), gradient
checkpointing and FSDP2 through `accelerate` for `kronpeft train` (docs/scale.md).

The adapters stay in full precision beside the quantized base: kronpeft's hooks add `adapter(x, y)`
to the output of the (quantized) layer and never touch its weight, so nothing here is adapter-specific.
"""
from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn

from .errors import UsageError

QUANTIZE = ("int8", "int4")
INT4_GROUP_SIZE = 32  # int4 scales per group of 32 input columns: the input width must divide by it


def backbone_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The `nn.Linear` layers of `model`'s backbone (`base_model_prefix`): not the output head or classifier."""
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    root, stem = (backbone, prefix + ".") if isinstance(backbone, nn.Module) else (model, "")
    return {stem + n: m for n, m in root.named_modules() if type(m) is nn.Linear}


def quantize_base(model: nn.Module, kind: str, group_size: int = INT4_GROUP_SIZE) -> list[str]:
    """Quantize the backbone's linear weights in place with torchao, weight-only: `"int8"` (per output
    row) or `"int4"` (per group of `group_size` input columns). Checks every layer before changing any;
    returns the quantized layers' names."""
    if kind not in QUANTIZE:
        raise ValueError(f"quantize {kind!r}: choose one of {', '.join(QUANTIZE)}")
    if importlib.util.find_spec("torchao") is None:
        raise ValueError(f"quantize {kind}: needs torchao; install it with pip install 'kronpeft[quant]' "
                         f"(or pip install torchao)")
    linears = backbone_linears(model)
    if not linears:
        raise ValueError(f"quantize {kind}: {type(model).__name__} has no nn.Linear layer in its backbone to quantize")
    if kind == "int4":
        odd = [(n, m.in_features) for n, m in linears.items() if m.in_features % group_size]
        if odd:
            raise ValueError(f"quantize int4: {odd[0][0]} has {odd[0][1]} input features, not a multiple of the "
                             f"int4 group size {group_size}; use int8 for this model")
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    config = Int8WeightOnlyConfig() if kind == "int8" else IntxWeightOnlyConfig(
        weight_dtype=torch.int4, granularity=PerGroup(group_size))
    chosen = set(map(id, linears.values()))
    quantize_(model, config, filter_fn=lambda module, fqn: id(module) in chosen)
    return list(linears)


def prepare_base(base: nn.Module, args):
    """`kronpeft train --quantize`: quantize the base before the adapters are built (they stay fp32)."""
    kind = getattr(args, "quantize", None)
    if kind is None:
        return
    if args.method == "full":
        raise UsageError(f"--quantize {kind} freezes a quantized base, but --method full trains every weight; "
                         f"pick an adapter method or drop --quantize")
    try:
        quantize_base(base, kind)
    except ValueError as err:
        raise UsageError(f"--{err}") from None


def prepare_model(model: nn.Module, args):
    """`kronpeft train --gradient-checkpointing`: transformers' non-reentrant activation checkpointing."""
    if getattr(args, "gradient_checkpointing", False):  # transformers >= 5 renamed it activation checkpointing
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def fsdp_plugin(args):
    """accelerate's FSDP2 plugin, checked before anything is built: the `accelerate launch` config's when it
    asks for FSDP, else for `--fsdp` a unit per transformer block, full parameters gathered per unit in
    forward and backward and freed after (`reshard_after_forward`). None for neither, and for one process
    (nothing to shard over; accelerate would also mark the whole process as FSDP in `os.environ`)."""
    from_config = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not (from_config or getattr(args, "fsdp", False)):
        return None
    if getattr(args, "quantize", None):
        raise UsageError(f"--fsdp with --quantize {args.quantize}: FSDP2 cannot shard torchao's quantized weights; "
                         f"drop one of them")
    from accelerate import FullyShardedDataParallelPlugin

    # from_config: the plugin reads accelerate's config from the environment
    plugin = FullyShardedDataParallelPlugin() if from_config else FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT", cpu_ram_efficient_loading=False)
    if plugin.fsdp_version != 2:
        raise UsageError(f"kronpeft train drives FSDP2, not FSDP{plugin.fsdp_version}: set fsdp_version: 2 in "
                         f"the accelerate config, or pass --fsdp")
    return plugin if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None


def use_fsdp(accelerator, plugin, base: nn.Module) -> bool:
    """Before `accelerator.prepare`; returns whether the model is to be sharded (`plugin`: `fsdp_plugin`'s).
    Names the base's transformer blocks as FSDP units unless the config did.
    accelerate (1.16 here) turns its FSDP plugin on for GPU-type process groups only and runs plain DDP on CPU
    (`MULTI_CPU`); there kronpeft switches the state to FSDP, so that accelerate's own `fully_shard`
    preparation runs on gloo."""
    from accelerate.utils import DistributedType

    from ..sharding import block_classes

    state = accelerator.state
    if state.distributed_type == DistributedType.DEEPSPEED:
        raise UsageError("kronpeft train does not drive DeepSpeed: shard with --fsdp (FSDP2), or train with "
                         "DeepSpeed through the library (docs/scale.md)")
    if plugin is None:
        return False
    switch_to_fsdp(accelerator, plugin)
    if not plugin.transformer_cls_names_to_wrap:
        embeddings = base.get_input_embeddings()  # accelerate gives it a unit of its own: no block may hold it
        blocks = [c.__name__ for c in block_classes(base)
                  if not any(m is embeddings for b in base.modules() if type(b) is c for m in b.modules())]
        plugin.transformer_cls_names_to_wrap = sorted(blocks)
    return True


def switch_to_fsdp(accelerator, plugin):
    """Set accelerate's state to FSDP with `plugin`, as `AcceleratorState` does on GPUs: its own field and the
    shared `PartialState` one (every later `AcceleratorState()` copies that one back)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        accelerator.state.fsdp_plugin = plugin
        accelerator.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
