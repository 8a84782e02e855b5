"""Triton kernels of the fused contrastive loss (installed as ``vlscale.kernels.contrastive``).

The similarity matrix ``S = s·Q·Kᵀ`` (Q: M×D, K: N×D) is never stored whole.

``_lse_kernel`` (forward)
    row AND column log-sum-exp of S from ONE evaluation of every S tile (the FLOP floor
    8·M·N·D counts one S in the forward). Each program owns a rectangle of S — a band of
    ``ROW_BAND`` rows × ``COL_BAND`` columns — and walks it tile by tile: row statistics (running
    max, sum of exp) live in registers over the band's columns; column statistics are updated
    read-modify-write in a per-row-band partial buffer that only this program touches. The host
    then merges the partials with one ``logsumexp``. Memory: ``(#row bands)·N + (#col bands)·M``
    (max, sum) pairs — 2·22·B·8 bytes ≈ 92 MiB at B = 262,144 on an H100 (22 bands each way),
    versus a (M/BLOCK_M)×N partial buffer (4 GiB at that size, Inf-CL's whole budget) or a second
    column pass (a second S: 10·M·N·D instead of 8·M·N·D).

Backward, ``dA = Σ_b P_ab·B_b`` with ``P_ab = ca_a·exp(S_ab − la_a) + cb_b·exp(S_ab − lb_b)``, run
twice: with (A, B) = (Q, K) it gives dQ/(s·α); with (K, Q) — S transposed — dK/(s·α). So the
backward evaluates S twice and the whole loss executes 10·M·N·D FLOPs against the 8·M·N·D floor
(a single pass would need B×D fp32 atomics on dK). Two variants (``KernelSettings.backward``):

``"banded"`` (default): ``_probs_kernel`` — a GEMM with a softmax epilogue — writes a band of
    R rows of P (R·N elements in the input dtype, ``band_elems`` ≈ 256 MiB), and cuBLAS computes
    ``P_band · B`` with an fp32 result. Half of the backward FLOPs (the products with B) run in
    cuBLAS; the band costs one write and one read of R·N·2 bytes per 2·R·N·D FLOPs (compute-bound
    for D ≳ 256).
``"fused"``: ``_grad_kernel`` — each program owns BLOCK_M rows of A and loops over all of B; as D
    may be up to 1024 its fp32 accumulator lives in the output (read-modify-write per BLOCK_D chunk,
    owned by this program only) instead of registers. No P buffer, but that traffic is L2-bound
    (~BLOCK_N/2 FLOPs per byte), which is why it is not the default.

Softmax math follows FlashAttention-2 (Dao, 2023): base-2 exponentials with log2(e) folded into the
scale, fp32 accumulation, ``P`` cast to the input dtype before the tensor-core product (as the
gradient coefficients are divided by their maximum α on the host, P stays within [−2, 2] and does
not underflow in fp16/bf16 even when the coefficients are ~1/B).

Precision is explicit: ``tl.dot(..., input_precision=...)`` from :func:`kernel_settings`. Under the
CPU interpreter (``TRITON_INTERPRET=1``) every load is cast to fp32 at once (interpreted bf16
arithmetic is wrong); on a GPU the dots stay in the input dtype with fp32 accumulation.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x·log2 e); constexpr so kernels may read it
LN2 = math.log(2.0)


@triton.jit
def _scores(A, B, rows, cols, rmask, cmask, D, stride_a, stride_b,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``A[rows] · B[cols]ᵀ`` as a fp32 (BLOCK_M, BLOCK_N) tile, D consumed in BLOCK_D chunks."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    a_row = rows.to(tl.int64)[:, None] * stride_a
    b_row = cols.to(tl.int64)[:, None] * stride_b
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        a = tl.load(A + a_row + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        b = tl.load(B + b_row + d[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _lse_kernel(Q, K, SCALE, ROW_M, ROW_L, COL_M, COL_L,
                M, N, D, stride_q, stride_k, ROW_BAND, COL_BAND,
                HAS_COL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Partial (max, Σexp) of base-2 logits over one ROW_BAND × COL_BAND rectangle of S.

    Writes ``ROW_M/ROW_L[pid_col_band, row]`` and accumulates ``COL_M/COL_L[pid_row_band, col]``.
    """
    pid_a = tl.program_id(0)
    pid_b = tl.program_id(1)
    scale2 = tl.load(SCALE).to(tl.float32) * LOG2E
    row_lo = pid_a * ROW_BAND
    row_hi = tl.minimum(row_lo + ROW_BAND, M)
    col_lo = pid_b * COL_BAND
    col_hi = tl.minimum(col_lo + COL_BAND, N)
    for m0 in range(row_lo, row_hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < row_hi
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for n0 in range(col_lo, col_hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < col_hi
            s2 = _scores(Q, K, rows, cols, rmask, cmask, D, stride_q, stride_k,
                         BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, INPUT_PRECISION) * scale2
            s2 = tl.where(rmask[:, None] & cmask[None, :], s2, float("-inf"))
            # Online log-sum-exp; a fully masked row keeps max −inf, so shift by 0 instead.
            m_new = tl.maximum(m_i, tl.max(s2, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(s2 - m_use[:, None]), axis=1)
            m_i = m_new
            if HAS_COL:
                cptr = pid_a.to(tl.int64) * N + cols
                cm = tl.load(COL_M + cptr, mask=cmask, other=float("-inf"))
                cl = tl.load(COL_L + cptr, mask=cmask, other=0.0)
                cm_new = tl.maximum(cm, tl.max(s2, axis=0))
                cm_use = tl.where(cm_new == float("-inf"), 0.0, cm_new)
                cl = cl * tl.exp2(cm - cm_use) + tl.sum(tl.exp2(s2 - cm_use[None, :]), axis=0)
                tl.store(COL_M + cptr, cm_new, mask=cmask)
                tl.store(COL_L + cptr, cl, mask=cmask)
                # The next row tile re-reads these columns: make the stores visible to all threads.
                tl.debug_barrier()
        rptr = pid_b.to(tl.int64) * M + rows
        tl.store(ROW_M + rptr, m_i, mask=rmask)
        tl.store(ROW_L + rptr, l_i, mask=rmask)


@triton.jit
def _probs(s2, rows, rmask, cols, cmask, A_LSE, A_COEF, B_LSE, B_COEF,
           HAS_A: tl.constexpr, HAS_B: tl.constexpr):
    """``P_ab = ca_a·2^(S2_ab − la2_a) + cb_b·2^(S2_ab − lb2_b)`` (fp32, 0 outside the masks)."""
    p = tl.zeros(s2.shape, dtype=tl.float32)
    if HAS_A:
        a_lse2 = tl.load(A_LSE + rows, mask=rmask, other=0.0) * LOG2E
        a_coef = tl.load(A_COEF + rows, mask=rmask, other=0.0)
        p += a_coef[:, None] * tl.exp2(s2 - a_lse2[:, None])
    if HAS_B:
        b_lse2 = tl.load(B_LSE + cols, mask=cmask, other=0.0) * LOG2E
        b_coef = tl.load(B_COEF + cols, mask=cmask, other=0.0)
        p += b_coef[None, :] * tl.exp2(s2 - b_lse2[None, :])
    return tl.where(rmask[:, None] & cmask[None, :], p, 0.0)


@triton.jit
def _grad_kernel(A, B, SCALE, A_LSE, A_COEF, B_LSE, B_COEF, DA,
                 M, N, D, stride_a, stride_b, stride_da,
                 HAS_A: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr):
    """Fused backward: ``DA[rows] += Σ_b P_ab·B_b`` over all of B, P recomputed per tile."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    scale2 = tl.load(SCALE).to(tl.float32) * LOG2E
    da_row = rows.to(tl.int64)[:, None] * stride_da
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < N
        s2 = _scores(A, B, rows, cols, rmask, cmask, D, stride_a, stride_b,
                     BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, INPUT_PRECISION) * scale2
        p = _probs(s2, rows, rmask, cols, cmask, A_LSE, A_COEF, B_LSE, B_COEF, HAS_A, HAS_B)
        if not UPCAST:
            p = p.to(B.dtype.element_ty)
        b_col = cols.to(tl.int64)[:, None] * stride_b
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dmask = d < D
            b = tl.load(B + b_col + d[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
            if UPCAST:
                b = b.to(tl.float32)
            out_mask = rmask[:, None] & dmask[None, :]
            acc = tl.load(DA + da_row + d[None, :], mask=out_mask, other=0.0)
            acc = tl.dot(p, b, acc, input_precision=INPUT_PRECISION)
            tl.store(DA + da_row + d[None, :], acc, mask=out_mask)
            tl.debug_barrier()


@triton.jit
def _probs_kernel(A, B, SCALE, A_LSE, A_COEF, B_LSE, B_COEF, P,
                  M, N, D, stride_a, stride_b, stride_p,
                  HAS_A: tl.constexpr, HAS_B: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr):
    """Banded backward: one (BLOCK_M, BLOCK_N) tile of P written in P's dtype (a GEMM epilogue)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    scale2 = tl.load(SCALE).to(tl.float32) * LOG2E
    s2 = _scores(A, B, rows, cols, rmask, cmask, D, stride_a, stride_b,
                 BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, INPUT_PRECISION) * scale2
    p = _probs(s2, rows, rmask, cols, cmask, A_LSE, A_COEF, B_LSE, B_COEF, HAS_A, HAS_B)
    ptr = P + rows.to(tl.int64)[:, None] * stride_p + cols[None, :]
    tl.store(ptr, p.to(P.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@dataclass(frozen=True)
class KernelSettings:
    """Tile sizes and launch shape; from :func:`kernel_settings` (override for tests)."""

    block_m: int
    block_n: int
    block_d: int
    row_bands: int  # forward: programs along M (each walks ROW_BAND rows)
    col_bands: int  # forward: programs along N
    num_warps: int = 4
    num_stages: int = 2
    input_precision: str = "ieee"
    upcast: bool = False
    grad_block_m: int = 64
    grad_block_n: int = 64
    backward: str = "banded"  # "banded": P band + cuBLAS products; "fused": one kernel, no P buffer
    band_elems: int = 1 << 27  # banded: elements of the P band buffer (256 MiB in bf16)


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(x: int, lo: int = 16, hi: int = 1 << 30) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def kernel_settings(m: int, n: int, d: int, dtype: torch.dtype, device: torch.device) -> KernelSettings:
    """Block sizes keyed on the shape and device (the single place they are chosen).

    Interpreter: 32×32 tiles (few interpreted programs), fp32 everywhere, 2×2 bands so the band
    logic is exercised. GPU: 128×64 forward tiles (FlashAttention-2's shape), 128×128 tiles for the
    banded backward's GEMM-with-epilogue (64×64 for the fused one), BLOCK_D=64 (32 for fp32),
    8 warps, 3 stages, and enough forward bands for ~4 programs per SM.

    What was tried — ahead-of-time compilation only (no GPU was available when these were chosen),
    bf16, with the divisibility-by-16 specialisation a real launch gets (registers / spills /
    shared memory from ptxas): forward 128×64: sm_90 195 regs, sm_80 175, no spills, 72 / 48 KiB;
    forward 128×128: 255 regs (no spill yet; too tight), 96 / 64 KiB; banded P 128×128: sm_90 106
    regs, sm_80 176, no spills, 96 / 64 KiB; P 64×64: 48 / 73 regs; fused 64×64: 114 / 128 regs.
    fp32 with BLOCK_D=64 needs ~2× the shared memory, hence 32 (3 stages then fit in sm_86's
    99 KiB). None of this is timed: retune on a GPU with ``benchmarks/bench_contrastive_loss.py
    --tune`` (every try is recorded); ``tests/test_loss_kernels.py`` re-checks the compilation.
    """
    block_d = _pow2(d, hi=64)
    if interpreting() or device.type != "cuda":
        bm = bn = 32
        return KernelSettings(bm, bn, block_d, row_bands=2, col_bands=2, input_precision="ieee",
                              upcast=True, grad_block_m=32, grad_block_n=32)
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    bm, bn = 128, 64
    if dtype == torch.float32:  # 4-byte tiles: halve BLOCK_D so 3 stages fit in sm_86's 99 KiB
        block_d = _pow2(d, hi=32)
    tiles_m, tiles_n = triton.cdiv(m, bm), triton.cdiv(n, bn)
    side = max(1, math.isqrt(4 * sms))
    precision = "tf32x3" if dtype == torch.float32 else "tf32"  # "tf32" is a no-op for 16-bit inputs
    return KernelSettings(bm, bn, block_d, row_bands=min(side, tiles_m), col_bands=min(side, tiles_n),
                          num_warps=8, num_stages=3, input_precision=precision, upcast=False,
                          grad_block_m=128, grad_block_n=128, backward="banded")


def _prep(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def lse(q: Tensor, k: Tensor, scale: Tensor, *, need_col: bool = True,
        settings: KernelSettings | None = None) -> tuple[Tensor, Tensor | None]:
    """Row (M,) and column (N,) log-sum-exp of ``s·Q·Kᵀ`` (fp32), one pass over S."""
    q, k = _prep(q), _prep(k)
    (m, d), n = q.shape, k.shape[0]
    cfg = settings or kernel_settings(m, n, d, q.dtype, q.device)
    bm, bn = cfg.block_m, cfg.block_n
    row_band = triton.cdiv(triton.cdiv(m, bm), cfg.row_bands) * bm
    col_band = triton.cdiv(triton.cdiv(n, bn), cfg.col_bands) * bn
    grid = (triton.cdiv(m, row_band), triton.cdiv(n, col_band))
    f32 = dict(device=q.device, dtype=torch.float32)
    row_m, row_l = torch.empty(grid[1], m, **f32), torch.empty(grid[1], m, **f32)
    col_m = torch.full((grid[0], n) if need_col else (1,), float("-inf"), **f32)
    col_l = torch.zeros((grid[0], n) if need_col else (1,), **f32)
    s = scale.detach().reshape(1).to(torch.float32).contiguous()
    _lse_kernel[grid](q, k, s, row_m, row_l, col_m, col_l, m, n, d, q.stride(0), k.stride(0),
                      row_band, col_band, HAS_COL=need_col, BLOCK_M=bm, BLOCK_N=bn,
                      BLOCK_D=cfg.block_d, UPCAST=cfg.upcast, INPUT_PRECISION=cfg.input_precision,
                      num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    row = torch.logsumexp((row_m + torch.log2(row_l)) * LN2, dim=0)
    col = torch.logsumexp((col_m + torch.log2(col_l)) * LN2, dim=0) if need_col else None
    return row, col


def _grad_rows(a: Tensor, b: Tensor, s: Tensor, a_lse: Tensor | None, a_coef: Tensor | None,
               b_lse: Tensor | None, b_coef: Tensor | None, cfg: KernelSettings) -> Tensor:
    m, d = a.shape
    out = torch.zeros(m, d, device=a.device, dtype=torch.float32)
    dummy = s  # never read when the matching HAS_* flag is off
    grid = (triton.cdiv(m, cfg.grad_block_m),)
    _grad_kernel[grid](a, b, s, a_lse if a_lse is not None else dummy, a_coef if a_coef is not None else dummy,
                       b_lse if b_lse is not None else dummy, b_coef if b_coef is not None else dummy, out,
                       m, b.shape[0], d, a.stride(0), b.stride(0), out.stride(0),
                       HAS_A=a_coef is not None, HAS_B=b_coef is not None, BLOCK_M=cfg.grad_block_m,
                       BLOCK_N=cfg.grad_block_n, BLOCK_D=cfg.block_d, UPCAST=cfg.upcast,
                       INPUT_PRECISION=cfg.input_precision, num_warps=cfg.num_warps,
                       num_stages=cfg.num_stages)
    return out


def _mm_f32(p: Tensor, b: Tensor) -> Tensor:
    """``p @ b`` with an fp32 result; 16-bit CUDA operands stay 16-bit inside cuBLAS."""
    if p.is_cuda and p.dtype in (torch.float16, torch.bfloat16):
        try:
            return torch.mm(p, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # torch without mm(out_dtype=)
            return (p @ b).float()
    return p @ b.to(p.dtype)


def _grad_banded(a: Tensor, b: Tensor, s: Tensor, a_lse: Tensor | None, a_coef: Tensor | None,
                 b_lse: Tensor | None, b_coef: Tensor | None, cfg: KernelSettings) -> Tensor:
    """``dA = P·B`` band by band: a kernel writes a (R, N) band of P, cuBLAS multiplies it by B."""
    (m, d), n = a.shape, b.shape[0]
    bm, bn = cfg.grad_block_m, cfg.grad_block_n
    rows = min(triton.cdiv(m, bm) * bm, max(bm, cfg.band_elems // n // bm * bm))
    buf = torch.empty(rows, n, device=a.device, dtype=torch.float32 if cfg.upcast else a.dtype)
    out = torch.empty(m, d, device=a.device, dtype=torch.float32)
    flags = dict(HAS_A=a_coef is not None, HAS_B=b_coef is not None, BLOCK_M=bm, BLOCK_N=bn,
                 BLOCK_D=cfg.block_d, UPCAST=cfg.upcast, INPUT_PRECISION=cfg.input_precision,
                 num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        p = buf[: r1 - r0]
        band_lse = a_lse[r0:r1] if a_lse is not None else s  # s: never read when HAS_A is off
        band_coef = a_coef[r0:r1] if a_coef is not None else s
        _probs_kernel[(triton.cdiv(r1 - r0, bm), triton.cdiv(n, bn))](
            a[r0:r1], b, s, band_lse, band_coef, b_lse if b_lse is not None else s,
            b_coef if b_coef is not None else s, p, r1 - r0, n, d, a.stride(0), b.stride(0), p.stride(0), **flags)
        out[r0:r1] = _mm_f32(p, b)
    return out


def grad(q: Tensor, k: Tensor, scale: Tensor, row_lse: Tensor, col_lse: Tensor | None,
         row_coef: Tensor | None, col_coef: Tensor | None, *, need_dk: bool = True,
         settings: KernelSettings | None = None) -> tuple[Tensor, Tensor | None]:
    """``dq = s·dS·K``, ``dk = s·dSᵀ·Q`` (fp32), ``dS = rc·exp(S − r) + cc·exp(S − c)`` never stored."""
    q, k = _prep(q), _prep(k)
    cfg = settings or kernel_settings(q.shape[0], k.shape[0], q.shape[1], q.dtype, q.device)
    # Divide the coefficients by their largest magnitude α so P is O(1) in the 16-bit dot.
    parts = [c.abs().max() for c in (row_coef, col_coef) if c is not None]
    alpha = torch.stack(parts).max().clamp_min(1e-30).float()
    rc = None if row_coef is None else (row_coef.float() / alpha).contiguous()
    cc = None if col_coef is None else (col_coef.float() / alpha).contiguous()
    rl = row_lse.float().contiguous()
    cl = None if col_lse is None else col_lse.float().contiguous()
    s = scale.detach().reshape(1).to(torch.float32).contiguous()
    mult = s[0] * alpha
    if cfg.backward not in ("banded", "fused"):
        raise ValueError(f"KernelSettings.backward must be 'banded' or 'fused', got {cfg.backward!r}")
    run = _grad_banded if cfg.backward == "banded" else _grad_rows
    dq = run(q, k, s, rl, rc, cl, cc, cfg).mul_(mult)  # in place: no second B×D fp32 buffer
    dk = run(k, q, s, cl, cc, rl, rc, cfg).mul_(mult) if need_dk else None
    return dq, dk
