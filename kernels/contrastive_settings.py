"""Tile sizes and launch shapes of the contrastive-loss kernels (:mod:`vlscale.kernels.contrastive`).

:class:`KernelSettings` holds every choice; :func:`kernel_settings` makes it per shape, dtype and device
(the single place block sizes are chosen). ``TritonBackend(**overrides)`` replaces single fields for
tuning and for the backward variants (``backward="shared" | "banded" | "fused"``).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton

from vlscale.loss.precision import cast_p_forced

BACKWARDS = ("shared", "banded", "fused")


@dataclass(frozen=True)
class KernelSettings:
    """Tile sizes and launch shape; from :func:`kernel_settings` (override for tests and tuning)."""

    block_m: int
    block_n: int
    block_d: int
    row_bands: int  # forward: rectangles along M (each program walks ROW_BAND rows)
    col_bands: int  # forward: rectangles along N; row_bands·col_bands programs in all
    num_warps: int = 4
    num_stages: int = 2
    input_precision: str = "ieee"
    upcast: bool = False  # interpreter: every load widened to fp32 at once
    grad_block_m: int = 64
    grad_block_n: int = 64
    backward: str = "shared"  # one of BACKWARDS (module docstring)
    band_elems: int = 1 << 27  # "banded": elements of the P band buffer (256 MiB in bf16)
    p_block: int = 4096  # "shared": P is computed p_block rows × p_block columns at a time
    cast_p: bool = False  # round P to the input dtype even when upcasting (the GPU's arithmetic)
    scale_p: bool = True  # scale P by 2^k before a 16-bit cast (vlscale.loss.precision)
    flatten: bool = True  # forward: let Triton flatten the tile × D loop nest (prefetch across tiles)


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(x: int, lo: int = 16, hi: int = 1 << 30) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _bands(programs: int, tiles_m: int, tiles_n: int) -> tuple[int, int]:
    """``(r, c)`` with r·c ≤ programs, r ≈ c, r ≤ tiles_m, c ≤ tiles_n: the forward's rectangles."""
    r = max(1, min(tiles_m, math.isqrt(programs)))
    while r > 1 and programs % r:  # an exact factorisation fills every SM when the tiles allow
        r -= 1
    c = max(1, min(tiles_n, programs // r))
    r = max(1, min(tiles_m, programs // c))
    return r, c


def kernel_settings(m: int, n: int, d: int, dtype: torch.dtype, device: torch.device) -> KernelSettings:
    """Block sizes keyed on the shape and device (the single place they are chosen).

    Interpreter: 32×32 tiles (few interpreted programs), fp32 everywhere (P rounded to the input
    dtype under ``VLSCALE_LOSS_CAST_P=1``), 2×2 bands so the band logic is exercised. GPU: 128×64
    forward tiles (FlashAttention-2's shape) on a persistent grid of one program per SM (the
    rectangles factorise the SM count, e.g. 12×11 on 132 SMs); 128×128 tiles for the backward's
    GEMM-with-epilogue (64×64 for the fused one); BLOCK_D=64 (32 for fp32); 8 warps, 3 stages.

    What was tried — ahead-of-time compilation only (no GPU was available when these were chosen),
    bf16, with the divisibility-by-16 specialisation a real launch gets (registers / spills /
    shared memory from ptxas): forward 128×64: sm_90 195 regs, sm_80 175, no spills, 72 / 48 KiB
    (one 8-warp program per SM, hence the one-wave grid); forward 128×128: 255 regs (too tight);
    P 128×128: sm_90 106 regs, sm_80 176, no spills, 96 / 64 KiB; fused 64×64: 114 / 128 regs. fp32
    with BLOCK_D=64 needs ~2× the shared memory, hence 32 (3 stages then fit in sm_86's 99 KiB).
    None of this is timed: retune on a GPU with the loss benchmark (``TritonBackend(**overrides)``);
    ``tests/test_loss_kernels.py`` re-checks the compilation for sm_80 and sm_90.
    """
    block_d = _pow2(d, hi=64)
    if interpreting() or device.type != "cuda":
        bm = bn = 32
        return KernelSettings(bm, bn, block_d, row_bands=2, col_bands=2, input_precision="ieee",
                              upcast=True, grad_block_m=32, grad_block_n=32, cast_p=cast_p_forced())
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    bm, bn = 128, 64
    if dtype == torch.float32:  # 4-byte tiles: halve BLOCK_D so 3 stages fit in sm_86's 99 KiB
        block_d = _pow2(d, hi=32)
    row_bands, col_bands = _bands(sms, triton.cdiv(m, bm), triton.cdiv(n, bn))
    precision = "tf32x3" if dtype == torch.float32 else "tf32"  # "tf32" is a no-op for 16-bit inputs
    return KernelSettings(bm, bn, block_d, row_bands=row_bands, col_bands=col_bands, num_warps=8,
                          num_stages=3, input_precision=precision, upcast=False, grad_block_m=128,
                          grad_block_n=128)
