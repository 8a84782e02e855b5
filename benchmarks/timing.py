"""Timing and memory helpers shared by the loss benchmarks (a sibling script: benchmarks/ is no package)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_ms(fn: Callable[[], None], device: torch.device, reps: int) -> float:
    """Median milliseconds: ``do_bench`` on CUDA, wall clock otherwise."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=max(reps * 10, 100), return_mode="median"))
    fn()  # warm-up (compilation, caches)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def peak_extra_mib(fn: Callable[[], None], device: torch.device) -> float | None:
    """Peak CUDA memory of one ``fn()`` above what was allocated before it (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20
