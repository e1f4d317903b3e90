"""Timing and memory measurement shared by the layer- and model-level benchmarks.

Variants are timed round-robin (one call of each per repetition) so that drift of a shared
machine hits every variant alike; we report medians. Memory is measured in a separate, untimed
call: on CUDA the allocator's `max_memory_allocated`, on CPU the peak of the running sum of the
allocation/free events the PyTorch profiler records (`profile_memory=True`). Both are the peak of
tensor bytes allocated during the call above what was allocated before it, so they count exactly
the activations, intermediates and gradients the call creates, and nothing of the interpreter,
of freed-but-cached pages or of other processes.
"""
from __future__ import annotations

import itertools
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from kronpeft.runner.study.results import cpu_name


def cpu_model() -> str:
    """The processor as study rows record it: model name, family and model, the SIMD flags that change speed."""
    try:
        return cpu_name(Path("/proc/cpuinfo").read_text()) or platform.processor()
    except OSError:
        return platform.processor()


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(fns: dict[str, Callable[[], None]], reps: int, device: torch.device,
                        warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, calling them round-robin `warmup + reps` times."""
    times = {name: [] for name in fns}
    for rep in range(warmup + reps):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if rep >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes of tensors allocated by one call of `fn`, above those allocated before it."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
