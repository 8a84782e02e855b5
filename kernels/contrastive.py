"""Triton kernels of the fused contrastive loss (installed as ``vlscale.kernels.contrastive``).

The similarity matrix ``S = s·Q·Kᵀ`` (Q: M×D, K: N×D) is never stored whole.

``_lse_kernel`` (forward)
    row AND column log-sum-exp of S from ONE evaluation of every S tile (the FLOP floor 8·M·N·D
    counts one S in the forward). A persistent grid of one program per SM, on axis 0: each owns a
    rectangle of S (``ROW_BAND`` rows × ``COL_BAND`` columns); for each row tile, one flattened loop
    over (column tile, D chunk) so loads are prefetched across tiles; row statistics (running max, sum of exp) live in registers; column statistics are
    read-modify-written in a per-row-band partial buffer only this program touches, merged on the
    host with one ``logsumexp``. Memory: ``(#row bands)·N + (#col bands)·M`` (max, sum) pairs —
    ~46 MiB at B = 262,144 on an H100 (12 × 11 rectangles), versus a (M/BLOCK_M)×N partial buffer
    (4 GiB) or a second column pass (a second S: 10·M·N·D instead of 8·M·N·D).

Backward. With ``P_ab = ca_a·exp(S_ab − la_a) + cb_b·exp(S_ab − lb_b)`` (the coefficients divided
by their largest magnitude α and multiplied by 2^k on the host, see :mod:`vlscale.loss.precision`),
``dQ = P·K`` and ``dK = Pᵀ·Q`` up to the factor s·α/2^k. Variants (``KernelSettings.backward``):

``"shared"`` (default): ``_probs_kernel`` — a GEMM with a softmax epilogue — writes P for one block
    of ``p_block`` rows × ``p_block`` columns (32 MiB in bf16), and cuBLAS computes BOTH products
    from it with fp32 accumulation into dQ and dK (``addmm(out_dtype=float32)``, the pattern of
    Liger-Kernel's fused linear cross-entropy). S is evaluated once in the backward: the loss
    executes the 8·M·N·D floor. 2/3 of the backward FLOPs run in cuBLAS; P costs one write and two
    reads of 2 bytes per 6·D FLOPs (and a block that size mostly stays in L2).
``"banded"``: per direction — P for R full rows (``band_elems``), one cuBLAS product; then the same
    with (K, Q), S transposed. S twice in the backward: 10·M·N·D.
``"fused"``: per direction in one kernel — each program owns BLOCK_M rows of A and loops over all
    of B, its fp32 accumulator in the output (read-modify-write per BLOCK_D chunk, owned by this
    program). No P buffer, but L2-bound (~BLOCK_N/2 FLOPs per byte); 10·M·N·D.

Softmax math follows FlashAttention-2 (Dao, 2023): base-2 exponentials with log2(e) folded into the
scale, fp32 accumulation, ``P`` cast to the input dtype before a tensor-core product. Precision is
explicit: ``tl.dot(..., input_precision=...)`` from :func:`kernel_settings`. Under the CPU
interpreter (``TRITON_INTERPRET=1``) every load is widened to fp32 at once (interpreted bf16
arithmetic is wrong) and P stays fp32 unless ``cast_p`` (``VLSCALE_LOSS_CAST_P=1``) asks for the
GPU's rounding. Tile sizes and launch shapes: :mod:`vlscale.kernels.contrastive_settings`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from vlscale.kernels.contrastive_settings import (  # noqa: F401 — re-exported: the kernels' settings
    BACKWARDS,
    KernelSettings,
    _bands,
    interpreting,
    kernel_settings,
)

from vlscale.loss.precision import mm_f32, normalised_coefs, p_scale_exp

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
def _lse_tile(acc, m_i, l_i, scale2, rmask, cols, cmask, COL_M, COL_L, N, pid_a, HAS_COL: tl.constexpr):
    """Fold one finished S tile (``acc`` = Q·Kᵀ, fp32) into the row statistics (registers) and the
    column statistics (read-modify-written in this row band's slot of COL_M / COL_L)."""
    s2 = tl.where(rmask[:, None] & cmask[None, :], acc * scale2, float("-inf"))
    # Online log-sum-exp; a fully masked row keeps max −inf, so shift by 0 instead.
    m_new = tl.maximum(m_i, tl.max(s2, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(s2 - m_use[:, None]), axis=1)
    if HAS_COL:
        cptr = pid_a.to(tl.int64) * N + cols
        cm = tl.load(COL_M + cptr, mask=cmask, other=float("-inf"))
        cl = tl.load(COL_L + cptr, mask=cmask, other=0.0)
        cm_new = tl.maximum(cm, tl.max(s2, axis=0))
        cm_use = tl.where(cm_new == float("-inf"), 0.0, cm_new)
        cl = cl * tl.exp2(cm - cm_use) + tl.sum(tl.exp2(s2 - cm_use[None, :]), axis=0)
        tl.store(COL_M + cptr, cm_new, mask=cmask)
        tl.store(COL_L + cptr, cl, mask=cmask)
    return m_new, l_i


@triton.jit
def _lse_kernel(Q, K, SCALE, ROW_M, ROW_L, COL_M, COL_L,
                M, N, D, stride_q, stride_k, ROW_BAND, COL_BAND, NUM_COL_BANDS,
                HAS_COL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                FLATTEN: tl.constexpr):
    """Partial (max, Σexp) of base-2 logits over one ROW_BAND × COL_BAND rectangle of S.

    One program per rectangle on grid axis 0 (pid = row band · NUM_COL_BANDS + column band). For
    each row tile, the band's column tiles: with ``FLATTEN`` in ONE loop over (column tile, D chunk)
    pairs, the tile's statistics folded in at its last D chunk, so the software pipeliner prefetches
    the next tile's first chunks behind the current tile's epilogue (the persistent-matmul
    pattern); otherwise a column-tile loop around a pipelined D loop (``_scores``). Within a row
    tile every column is visited once, so the column read-modify-writes need no barrier there;
    the one barrier sits between row tiles, outside the pipelined loop. Writes
    ``ROW_M/ROW_L[col band, row]``; read-modify-writes ``COL_M/COL_L[row band, col]``.
    """
    pid = tl.program_id(0)
    pid_a = pid // NUM_COL_BANDS
    pid_b = pid % NUM_COL_BANDS
    scale2 = tl.load(SCALE).to(tl.float32) * LOG2E
    row_lo = pid_a * ROW_BAND
    row_hi = tl.minimum(row_lo + ROW_BAND, M)
    col_lo = pid_b * COL_BAND
    col_hi = tl.minimum(col_lo + COL_BAND, N)
    tiles_n = tl.cdiv(col_hi - col_lo, BLOCK_N)
    d_chunks = tl.cdiv(D, BLOCK_D)
    for m0 in range(row_lo, row_hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < row_hi
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        if FLATTEN:
            a_row = rows.to(tl.int64)[:, None] * stride_q
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for it in range(0, tiles_n * d_chunks):
                tn = it // d_chunks
                kd = it - tn * d_chunks
                cols = col_lo + tn * BLOCK_N + tl.arange(0, BLOCK_N)
                cmask = cols < col_hi
                d = kd * BLOCK_D + tl.arange(0, BLOCK_D)
                dmask = d < D
                a = tl.load(Q + a_row + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
                b = tl.load(K + cols.to(tl.int64)[:, None] * stride_k + d[None, :],
                            mask=cmask[:, None] & dmask[None, :], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION)
                if kd == d_chunks - 1:
                    m_i, l_i = _lse_tile(acc, m_i, l_i, scale2, rmask, cols, cmask, COL_M, COL_L, N, pid_a,
                                         HAS_COL)
                    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        else:
            for n0 in range(col_lo, col_hi, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                cmask = cols < col_hi
                acc = _scores(Q, K, rows, cols, rmask, cmask, D, stride_q, stride_k,
                              BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, INPUT_PRECISION)
                m_i, l_i = _lse_tile(acc, m_i, l_i, scale2, rmask, cols, cmask, COL_M, COL_L, N, pid_a, HAS_COL)
        rptr = pid_b.to(tl.int64) * M + rows
        tl.store(ROW_M + rptr, m_i, mask=rmask)
        tl.store(ROW_L + rptr, l_i, mask=rmask)
        if HAS_COL:
            # The next row tile re-reads this band's columns: make the stores visible to all threads.
            tl.debug_barrier()


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
                 CAST_P: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Fused backward: ``DA[rows] += Σ_b P_ab·B_b`` over all of B, P recomputed per tile.

    ``CAST_P``: P is rounded to B's dtype before the product (always on a GPU: the tensor-core dot
    takes one dtype; in the interpreter only when asked, then widened again for the fp32 dot).
    """
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
        if CAST_P:
            p = p.to(B.dtype.element_ty)
        if UPCAST:
            p = p.to(tl.float32)
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
    """One (BLOCK_M, BLOCK_N) tile of P written in P's dtype (a GEMM with a softmax epilogue).

    1-D grid on axis 0 (no 65,535 cap), tiles column-major: the programs running at once share a
    few column tiles of B and all of this block's rows of A, which stay in L2.
    """
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    rows = (pid % tiles_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid // tiles_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    scale2 = tl.load(SCALE).to(tl.float32) * LOG2E
    s2 = _scores(A, B, rows, cols, rmask, cmask, D, stride_a, stride_b,
                 BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, INPUT_PRECISION) * scale2
    p = _probs(s2, rows, rmask, cols, cmask, A_LSE, A_COEF, B_LSE, B_COEF, HAS_A, HAS_B)
    ptr = P + rows.to(tl.int64)[:, None] * stride_p + cols[None, :]
    tl.store(ptr, p.to(P.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


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
    row_bands, col_bands = triton.cdiv(m, row_band), triton.cdiv(n, col_band)
    f32 = dict(device=q.device, dtype=torch.float32)
    row_m, row_l = torch.empty(col_bands, m, **f32), torch.empty(col_bands, m, **f32)
    col_m = torch.full((row_bands, n) if need_col else (1,), float("-inf"), **f32)
    col_l = torch.zeros((row_bands, n) if need_col else (1,), **f32)
    s = scale.detach().reshape(1).to(torch.float32).contiguous()
    _lse_kernel[(row_bands * col_bands,)](
        q, k, s, row_m, row_l, col_m, col_l, m, n, d, q.stride(0), k.stride(0), row_band, col_band,
        col_bands, HAS_COL=need_col, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=cfg.block_d, UPCAST=cfg.upcast,
        INPUT_PRECISION=cfg.input_precision, FLATTEN=cfg.flatten, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    row = torch.logsumexp((row_m + torch.log2(row_l)) * LN2, dim=0)
    col = torch.logsumexp((col_m + torch.log2(col_l)) * LN2, dim=0) if need_col else None
    return row, col


Side = tuple[Tensor | None, Tensor | None]  # (lse, coefficients) of one side of S; None = absent


def _fused_rows(a: Tensor, b: Tensor, s: Tensor, sa: Side, sb: Side, cfg: KernelSettings) -> Tensor:
    """``"fused"``: ``P·B`` for all rows of A, one kernel, P recomputed per tile."""
    m, d = a.shape
    out = torch.zeros(m, d, device=a.device, dtype=torch.float32)
    _grad_kernel[(triton.cdiv(m, cfg.grad_block_m),)](
        a, b, s, *(x if x is not None else s for x in (*sa, *sb)), out,  # s: never read when HAS_* is off
        m, b.shape[0], d, a.stride(0), b.stride(0), out.stride(0),
        HAS_A=sa[1] is not None, HAS_B=sb[1] is not None, BLOCK_M=cfg.grad_block_m,
        BLOCK_N=cfg.grad_block_n, BLOCK_D=cfg.block_d, UPCAST=cfg.upcast,
        CAST_P=cfg.cast_p or not cfg.upcast, INPUT_PRECISION=cfg.input_precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def _write_p(p: Tensor, a: Tensor, b: Tensor, s: Tensor, sa: Side, sb: Side, cfg: KernelSettings) -> None:
    """``p[:] = P`` for the rows of ``a`` × rows of ``b`` (lse / coefficients sliced to match)."""
    (m, d), n = a.shape, b.shape[0]
    grid = (triton.cdiv(m, cfg.grad_block_m) * triton.cdiv(n, cfg.grad_block_n),)
    _probs_kernel[grid](a, b, s, *(x if x is not None else s for x in (*sa, *sb)), p,
                        m, n, d, a.stride(0), b.stride(0), p.stride(0),
                        HAS_A=sa[1] is not None, HAS_B=sb[1] is not None, BLOCK_M=cfg.grad_block_m,
                        BLOCK_N=cfg.grad_block_n, BLOCK_D=cfg.block_d, UPCAST=cfg.upcast,
                        INPUT_PRECISION=cfg.input_precision, num_warps=cfg.num_warps,
                        num_stages=cfg.num_stages)


def _cut(side: Side, sl: slice) -> Side:
    return tuple(None if x is None else x[sl] for x in side)


def _rows_per_block(total: int, block: int, target: int) -> int:
    return min(triton.cdiv(total, block) * block, max(block, target // block * block))


def _banded_rows(a: Tensor, b: Tensor, s: Tensor, sa: Side, sb: Side, cfg: KernelSettings,
                 p_dtype: torch.dtype) -> Tensor:
    """``"banded"``: ``P·B`` band by band — a kernel writes R full rows of P, cuBLAS multiplies."""
    (m, d), n = a.shape, b.shape[0]
    rows = _rows_per_block(m, cfg.grad_block_m, cfg.band_elems // n)
    buf = torch.empty(rows * n, device=a.device, dtype=p_dtype)
    out = torch.empty(m, d, device=a.device, dtype=torch.float32)
    for r0 in range(0, m, rows):
        r = slice(r0, min(m, r0 + rows))
        p = buf[: (r.stop - r0) * n].view(r.stop - r0, n)
        _write_p(p, a[r], b, s, _cut(sa, r), sb, cfg)
        mm_f32(p, b, out=out[r])
    return out


def _shared(q: Tensor, k: Tensor, s: Tensor, sq: Side, sk: Side, cfg: KernelSettings,
            p_dtype: torch.dtype, need_dk: bool) -> tuple[Tensor, Tensor | None]:
    """``"shared"``: P once per (R × C) block, both products from it in cuBLAS (fp32 accumulate).

    ``dQ[r] += P·K[c]`` and ``dK[c] += Pᵀ·Q[r]``: S is evaluated once in the backward, so the loss
    executes 8·M·N·D FLOPs. A 4096² block is 32 MiB in 16 bits, sized to stay largely in an A100 /
    H100 L2 (40 / 50 MB) between the kernel that writes it and the two GEMMs that read it (a design
    choice, not yet timed on a GPU; ``p_block`` is a setting).
    """
    (m, d), n = q.shape, k.shape[0]
    rows = _rows_per_block(m, cfg.grad_block_m, cfg.p_block)
    cols = _rows_per_block(n, cfg.grad_block_n, cfg.p_block)
    buf = torch.empty(rows * cols, device=q.device, dtype=p_dtype)
    dq = torch.zeros(m, d, device=q.device, dtype=torch.float32)
    dk = torch.zeros(n, d, device=q.device, dtype=torch.float32) if need_dk else None
    for r0 in range(0, m, rows):
        r = slice(r0, min(m, r0 + rows))
        for c0 in range(0, n, cols):
            c = slice(c0, min(n, c0 + cols))
            p = buf[: (r.stop - r0) * (c.stop - c0)].view(r.stop - r0, c.stop - c0)
            _write_p(p, q[r], k[c], s, _cut(sq, r), _cut(sk, c), cfg)
            mm_f32(p, k[c], out=dq[r], accumulate=True)
            if dk is not None:
                mm_f32(p.T, q[r], out=dk[c], accumulate=True)
    return dq, dk


def grad(q: Tensor, k: Tensor, scale: Tensor, row_lse: Tensor, col_lse: Tensor | None,
         row_coef: Tensor | None, col_coef: Tensor | None, *, need_dk: bool = True,
         settings: KernelSettings | None = None) -> tuple[Tensor, Tensor | None]:
    """``dq = s·dS·K``, ``dk = s·dSᵀ·Q`` (fp32), ``dS = rc·exp(S − r) + cc·exp(S − c)`` never stored."""
    q, k = _prep(q), _prep(k)
    cfg = settings or kernel_settings(q.shape[0], k.shape[0], q.shape[1], q.dtype, q.device)
    if cfg.backward not in BACKWARDS:
        raise ValueError(f"KernelSettings.backward must be one of {BACKWARDS}, got {cfg.backward!r}")
    p_dtype = q.dtype if (cfg.cast_p or not cfg.upcast) else torch.float32
    # Coefficients over their largest magnitude α, times 2^k: P is O(2^k) in the 16-bit products.
    rc, cc, fold = normalised_coefs(row_coef, col_coef, torch.float32, p_scale_exp(p_dtype) if cfg.scale_p else 0)
    sq = (row_lse.float().contiguous(), rc)
    sk = (None if col_lse is None else col_lse.float().contiguous(), cc)
    s = scale.detach().reshape(1).to(torch.float32).contiguous()
    mult = s[0] * fold
    if cfg.backward == "shared":
        dq, dk = _shared(q, k, s, sq, sk, cfg, p_dtype, need_dk)
    elif cfg.backward == "banded":
        dq = _banded_rows(q, k, s, sq, sk, cfg, p_dtype)
        dk = _banded_rows(k, q, s, sk, sq, cfg, p_dtype) if need_dk else None
    else:
        dq = _fused_rows(q, k, s, sq, sk, cfg)
        dk = _fused_rows(k, q, s, sk, sq, cfg) if need_dk else None
    return dq.mul_(mult), (dk.mul_(mult) if dk is not None else None)  # in place: no second buffer
