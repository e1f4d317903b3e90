"""Merging adapters into the base model's weights, and taking them out again, exactly.

Operations on one site (`merge_site`, `unmerge_site`, `write_merged_weight`) and the loops over a
base model's sites that `KronModel.merge_adapter` / `unmerge_adapter` / `unload` /
`merge_and_unload` delegate to. A merged layer keeps its original weight `W0`, so unmerging gives it
back bit-exactly in every dtype. Functions take the base model (and what they need) as arguments.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import sharding
from .injection import AdapterSite, detach, linear_shape, sites


def write_merged_weight(module: nn.Module, site: AdapterSite):
    """`W = W0 + Σ delta` over the adapters in `site.merged`, `W0` being the weight before the first merge.

    `W0` is kept in `site.unmerged_weight` while anything is merged, and written back when nothing
    is: adding and then subtracting a delta in bf16/fp16 would round twice and drift. The sum is
    taken in fp32 (or wider) and rounded once. GPT-2's `Conv1D` stores `W (in, out)`, the delta is `(out, in)`.
    """
    weight = module.weight
    if site.unmerged_weight is None:
        site.unmerged_weight = weight.detach().clone()
    if not site.merged:
        weight.copy_(site.unmerged_weight)
        site.unmerged_weight = None
        return
    total = site.unmerged_weight.to(torch.promote_types(weight.dtype, torch.float32))
    for name in sorted(site.merged):  # a fixed order: the same set of merged adapters gives the same bits
        delta = site[name].delta_weight()
        total = total + (delta.T if isinstance(module, Conv1D) else delta).to(total.dtype)
    weight.copy_(total)


def merge_site(owner: nn.Module, site: AdapterSite, adapter_name: str):
    """Add the adapter `adapter_name` into `owner`'s weight (nothing if it has no adapter here, is a
    copy of a module to save, or is merged already)."""
    if adapter_name in site and adapter_name not in site.merged and adapter_name not in site.copies:
        site.merged.add(adapter_name)
        write_merged_weight(owner, site)


def unmerge_site(owner: nn.Module, site: AdapterSite, adapter_name: str):
    """Take the adapter `adapter_name` out of `owner`'s weight, if it is merged there."""
    if adapter_name in site.merged:
        site.merged.discard(adapter_name)
        write_merged_weight(owner, site)


def merge(base_model: nn.Module, adapter_name: str):
    """Merge `adapter_name` into every weight it adapts (checked beforehand with `check_mergeable`)."""
    with torch.no_grad():
        for owner, site in sites(base_model):
            merge_site(owner, site, adapter_name)


def unmerge(base_model: nn.Module, adapter_name: str):
    """Take `adapter_name` out of every weight it is merged into; the original weights come back exactly."""
    with torch.no_grad():
        for owner, site in sites(base_model):
            unmerge_site(owner, site, adapter_name)


def is_merged(base_model: nn.Module, adapter_name: str) -> bool:
    return any(adapter_name in site.merged for _, site in sites(base_model))


def check_mergeable(base_model: nn.Module, adapter_name: str, method: str):
    """A ValueError unless every layer of adapter `adapter_name` (of `method`) can be merged: the adapter
    is linear in one layer's input, and neither it nor the layer's weight is partitioned or quantized."""
    for owner, site in sites(base_model):
        if adapter_name in site and adapter_name not in site.copies and not site[adapter_name].mergeable:
            raise ValueError(
                f"adapter {adapter_name!r} ({method}) cannot be merged: it is non-linear in the hidden state "
                f"or spans a whole feed-forward block, so no single weight matrix equals it. "
                f"Only KronA (an update of one linear layer) merges; run this adapter unmerged."
            )
        if adapter_name in site and adapter_name not in site.copies and adapter_name not in site.merged:
            shape = linear_shape(owner)[::-1] if isinstance(owner, Conv1D) else linear_shape(owner)
            reason = (sharding.partitioned_adapter(site.owner_name, site[adapter_name])
                      or sharding.unmergeable_weight(site.owner_name, owner.weight, shape))
            if reason:
                raise ValueError(f"cannot merge adapter {adapter_name!r}: {reason}")


def remove_sites(base_model: nn.Module, keep_copies_of: str | None = None):
    """Detach every site from `base_model`; `keep_copies_of`: that adapter's copies of `modules_to_save`
    take the original modules' places (what `merge_and_unload` returns)."""
    for owner, site in sites(base_model):
        clone = site[keep_copies_of] if keep_copies_of is not None and keep_copies_of in site.copies else None
        detach(owner, site)
        if clone is not None:
            parent, _, child = site.owner_name.rpartition(".")
            setattr(base_model.get_submodule(parent), child, clone)


def remerge_loaded(kron_model: nn.Module, incompatible_keys):
    """Load-state-dict post-hook: recompute every merged weight from the adapters just loaded (else it
    stays the merge of the adapters' old values)."""
    with torch.no_grad():
        for owner, site in sites(kron_model.base_model):
            if site.merged:
                write_merged_weight(owner, site)
