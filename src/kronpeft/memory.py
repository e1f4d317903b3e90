"""Refuse an adapter size the machine cannot hold, before allocating it (`r = 2**31 - 1` would otherwise
die allocating hundreds of GiB). The count is exact: the adapters are built on the meta device first."""
from __future__ import annotations

import os

import torch

from .layers import build_adapter


def adapter_bytes(config, places: dict[str, tuple[int, int]], dtype: torch.dtype) -> int:
    """Bytes of the parameters of `config`'s adapters at places `{module: (out_features, in_features)}`;
    a ValueError naming the module when `config` does not fit one."""
    total = 0
    for owner, (out_features, in_features) in places.items():
        try:
            adapter = build_adapter(config, out_features, in_features, dtype, torch.device("meta"))
        except ValueError as err:
            raise ValueError(f"{owner}: {err}") from None
        total += sum(p.numel() * p.element_size() for p in adapter.parameters())
    return total


def device_memory(device: torch.device) -> int | None:
    """Total memory of `device` in bytes (RAM for the CPU); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def check_fits(nbytes: int, device: torch.device, what: str):
    """A ValueError when `nbytes` of weights exceed `device`'s whole memory (training needs about 4x more)."""
    available = device_memory(torch.device(device))
    if available is not None and nbytes > available:
        raise ValueError(f"{what} need {nbytes / 2**30:,.1f} GiB for their weights alone, more than the "
                         f"{available / 2**30:,.1f} GiB of memory of {device}; pick a smaller size (e.g. r)")
