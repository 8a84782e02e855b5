"""Divisors of batch sizes, for the fixes that config errors name (a world size that divides the
global batch, a ``data.part_size`` that divides the per-rank batch). One O(√n) implementation
instead of a scan of every candidate at each place that needs one.
"""

from __future__ import annotations

import math


def divisors(n: int) -> list[int]:
    """The positive divisors of ``n`` (>= 1), ascending."""
    if n < 1:
        raise ValueError(f"divisors of a positive integer only, got {n}")
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def nearest_divisors(n: int, want: int, count: int = 1) -> list[int]:
    """The ``count`` divisors of ``n`` closest to ``want`` (ties: the smaller), ascending."""
    return sorted(sorted(divisors(n), key=lambda d: (abs(d - want), d))[:count])


__all__ = ["divisors", "nearest_divisors"]
