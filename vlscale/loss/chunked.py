"""Chunked pure-torch backend: the same function as the Triton kernels, in row × column blocks.

The path for CPU and for GPUs without Triton tensor cores (V100). Memory is bounded by one
``block_m × block_n`` tile (fp32 S, its exponentials, P) whatever M and N are; statistics and
gradients accumulate in fp32 (fp64 for fp64 inputs, which the tests use). Every matmul goes through
:func:`vlscale.loss.precision.mm_f32`: on CUDA, 16-bit blocks stay 16-bit inside cuBLAS with an
fp32 output, so S is never rounded to 16 bits before its exponential.

The backward casts P to the 16-bit input dtype on CUDA (scaled by 2^k first, see
:mod:`vlscale.loss.precision`); ``cast_p=True`` or ``VLSCALE_LOSS_CAST_P=1`` does the same on CPU.

The elementwise work of a tile (scale, exponentials, sums, the P cast) is in the small functions
of :data:`EAGER`; :class:`vlscale.loss.compiled.CompiledChunkedBackend` runs the same functions
through ``torch.compile`` (one fused pass per tile instead of several fp32 tile passes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from vlscale.loss.precision import mm_f32, normalised_coefs, p_dtype, p_scale_exp


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def lse_rows_cols(tile: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Row and column log-sum-exp of ``s·tile``."""
    x = tile * s
    return torch.logsumexp(x, 1), torch.logsumexp(x, 0)


def lse_rows(tile: Tensor, s: Tensor) -> Tensor:
    """Row log-sum-exp of ``s·tile``."""
    return torch.logsumexp(tile * s, 1)


def probs_both(tile: Tensor, s: Tensor, rl: Tensor, rc: Tensor, cl: Tensor, cc: Tensor,
               dtype: torch.dtype) -> Tensor:
    """``P = rc·exp(s·tile − rl) + cc·exp(s·tile − cl)`` cast to ``dtype``."""
    x = tile * s
    return (rc[:, None] * torch.exp(x - rl[:, None]) + cc[None, :] * torch.exp(x - cl[None, :])).to(dtype)


def probs_rows(tile: Tensor, s: Tensor, rl: Tensor, rc: Tensor, dtype: torch.dtype) -> Tensor:
    """``P = rc·exp(s·tile − rl)`` cast to ``dtype`` (row direction only)."""
    return (rc[:, None] * torch.exp(tile * s - rl[:, None])).to(dtype)


def probs_cols(tile: Tensor, s: Tensor, cl: Tensor, cc: Tensor, dtype: torch.dtype) -> Tensor:
    """``P = cc·exp(s·tile − cl)`` cast to ``dtype`` (column direction only)."""
    return (cc[None, :] * torch.exp(tile * s - cl[None, :])).to(dtype)


EAGER: dict[str, Callable[..., object]] = {
    "lse_rows_cols": lse_rows_cols, "lse_rows": lse_rows,
    "probs_both": probs_both, "probs_rows": probs_rows, "probs_cols": probs_cols,
}


class ChunkedBackend:
    """``lse`` / ``grad`` of :class:`vlscale.loss.backend.LossBackend` over ``block_m × block_n`` tiles.

    ``cast_p``: cast P to the 16-bit input dtype before the products (None = on CUDA, or when
    ``VLSCALE_LOSS_CAST_P=1``). ``scale_p=False`` drops the 2^k scaling of P (only to show what it
    fixes; never needed otherwise).
    """

    name = "chunked"
    fns: dict[str, Callable[..., object]] = EAGER

    def __init__(self, block_m: int = 1024, block_n: int = 4096, *, cast_p: bool | None = None,
                 scale_p: bool = True) -> None:
        if block_m < 1 or block_n < 1:
            raise ValueError(f"block sizes must be positive, got {block_m}, {block_n}")
        self.block_m, self.block_n = block_m, block_n
        self.cast_p, self.scale_p = cast_p, scale_p

    def _tiles(self, m: int, n: int) -> Iterator[tuple[slice, slice]]:
        for m0 in range(0, m, self.block_m):
            for n0 in range(0, n, self.block_n):
                yield slice(m0, m0 + self.block_m), slice(n0, n0 + self.block_n)

    def lse(self, q: Tensor, k: Tensor, scale: Tensor, *, need_col: bool = True) -> tuple[Tensor, Tensor | None]:
        acc = _acc(q)
        s = scale.detach().reshape(()).to(acc)
        kt = k.T
        row = torch.full((q.shape[0],), float("-inf"), device=q.device, dtype=acc)
        col = torch.full((k.shape[0],), float("-inf"), device=q.device, dtype=acc) if need_col else None
        for rs, cs in self._tiles(q.shape[0], k.shape[0]):
            tile = mm_f32(q[rs], kt[:, cs])
            if col is not None:
                r, c = self.fns["lse_rows_cols"](tile, s)
                col[cs] = torch.logaddexp(col[cs], c)
            else:
                r = self.fns["lse_rows"](tile, s)
            row[rs] = torch.logaddexp(row[rs], r)
        return row, col

    def grad(
        self,
        q: Tensor,
        k: Tensor,
        scale: Tensor,
        row_lse: Tensor,
        col_lse: Tensor | None,
        row_coef: Tensor | None,
        col_coef: Tensor | None,
        *,
        need_dk: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        acc = _acc(q)
        s = scale.detach().reshape(()).to(acc)
        low = p_dtype(q, acc, cast_p=self.cast_p)
        rc, cc, fold = normalised_coefs(row_coef, col_coef, acc, p_scale_exp(low) if self.scale_p else 0)
        rl = row_lse.to(acc)
        cl = None if col_lse is None else col_lse.to(acc)
        if cc is not None and cl is None:
            raise ValueError("col_coef given without col_lse")
        dq = torch.zeros(q.shape, device=q.device, dtype=acc)
        dk = torch.zeros(k.shape, device=q.device, dtype=acc) if need_dk else None
        kt = k.T
        for rs, cs in self._tiles(q.shape[0], k.shape[0]):
            tile = mm_f32(q[rs], kt[:, cs])
            if rc is not None and cc is not None:
                p = self.fns["probs_both"](tile, s, rl[rs], rc[rs], cl[cs], cc[cs], low)
            elif rc is not None:
                p = self.fns["probs_rows"](tile, s, rl[rs], rc[rs], low)
            else:
                p = self.fns["probs_cols"](tile, s, cl[cs], cc[cs], low)
            del tile
            mm_f32(p, k[cs], out=dq[rs], accumulate=True)
            if dk is not None:
                mm_f32(p.T, q[rs], out=dk[cs], accumulate=True)
        mult = s * fold
        return dq.mul_(mult), (dk.mul_(mult) if dk is not None else None)
