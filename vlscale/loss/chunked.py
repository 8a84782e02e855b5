"""Chunked pure-torch backend: the same function as the Triton kernels, in row × column blocks.

The path for CPU and for GPUs without Triton tensor cores (V100). Memory is bounded by one
``block_m × block_n`` fp32 tile (plus its exponentials) whatever M and N are; statistics and
gradients accumulate in fp32 (fp64 for fp64 inputs, which the tests use). On CUDA, 16-bit blocks go
through cuBLAS in their own dtype with an fp32 output where torch supports it (``out_dtype``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


_MM_OUT_DTYPE = {"ok": True}  # set False once torch.mm(out_dtype=) fails (older torch, old GPU)


def _mm(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """``a @ b`` with an ``acc``-typed result; 16-bit CUDA inputs stay 16-bit inside cuBLAS."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and b.dtype == a.dtype:
        if _MM_OUT_DTYPE["ok"]:
            try:
                return torch.mm(a, b, out_dtype=acc)  # fp32 output: S is not rounded to 16 bits
            except (TypeError, RuntimeError, NotImplementedError):
                _MM_OUT_DTYPE["ok"] = False
        return (a @ b).to(acc)
    return a.to(acc) @ b.to(acc)


class ChunkedBackend:
    """``lse`` / ``grad`` of :class:`vlscale.loss.backend.LossBackend` over ``block_m × block_n`` tiles."""

    name = "chunked"

    def __init__(self, block_m: int = 1024, block_n: int = 4096) -> None:
        if block_m < 1 or block_n < 1:
            raise ValueError(f"block sizes must be positive, got {block_m}, {block_n}")
        self.block_m, self.block_n = block_m, block_n

    def _tiles(self, m: int, n: int):
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
            tile = _mm(q[rs], kt[:, cs], acc) * s
            row[rs] = torch.logaddexp(row[rs], torch.logsumexp(tile, dim=1))
            if col is not None:
                col[cs] = torch.logaddexp(col[cs], torch.logsumexp(tile, dim=0))
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
        # Normalise the coefficients (~1/B) so the 16-bit products on CUDA do not underflow.
        alpha = torch.stack([c.abs().max() for c in (row_coef, col_coef) if c is not None]).max()
        alpha = alpha.to(acc).clamp_min(1e-30)
        rc = None if row_coef is None else row_coef.to(acc) / alpha
        cc = None if col_coef is None else col_coef.to(acc) / alpha
        low = q.dtype if (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)) else acc
        dq = torch.zeros(q.shape, device=q.device, dtype=acc)
        dk = torch.zeros(k.shape, device=q.device, dtype=acc) if need_dk else None
        kt = k.T
        for rs, cs in self._tiles(q.shape[0], k.shape[0]):
            tile = _mm(q[rs], kt[:, cs], acc) * s
            p = torch.zeros_like(tile)
            if rc is not None:
                p += rc[rs, None] * torch.exp(tile - row_lse[rs, None].to(acc))
            if cc is not None:
                p += cc[None, cs] * torch.exp(tile - col_lse[None, cs].to(acc))
            p = p.to(low)
            dq[rs] += _mm(p, k[cs], acc)
            if dk is not None:
                dk[cs] += _mm(p.T, q[rs], acc)
        mult = s * alpha
        return dq.mul_(mult), (dk.mul_(mult) if dk is not None else None)
