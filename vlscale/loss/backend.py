"""The two primitives every contrastive-loss implementation provides.

A *backend* (``reference``, ``chunked``, ``triton``) knows how to do exactly two things with the
similarity matrix ``S = s · Q · Kᵀ`` (Q: M×D rows, K: N×D columns) without the caller ever
seeing S:

``lse(q, k, scale, *, need_col=True)``
    row log-sum-exp ``r_i = log Σ_j exp(S_ij)`` (M,) and column log-sum-exp
    ``c_j = log Σ_i exp(S_ij)`` (N,), both fp32, from ONE pass over S. Over the rows *given* (in the
    distributed loss the column statistics are partial and are merged across ranks afterwards).
    ``need_col=False`` returns ``None`` for the columns (one-way losses, extra negatives).

``grad(q, k, scale, row_lse, col_lse, row_coef, col_coef)``
    the dense part of the gradient. With
    ``dS_ij = row_coef_i · exp(S_ij − row_lse_i) + col_coef_j · exp(S_ij − col_lse_j)``
    it returns ``dq = s · dS · K`` (M×D) and ``dk = s · dSᵀ · Q`` (N×D), both fp32.
    ``row_coef`` / ``col_coef`` may be ``None`` (that direction absent); ``col_lse`` may then be
    ``None`` too. ``need_dk=False`` skips ``dk`` (keys without gradient, e.g. a queue).

Everything sparse — the targets (labels, mixup), the loss value, d(loss)/d(scale) — is assembled
by :mod:`vlscale.loss.contrastive` in O((M+N)·D) torch code on top of these two calls, so a new
backend only has to get these two right. ``reference`` materialises S and is the oracle.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class LossBackend(Protocol):
    """What :mod:`vlscale.loss.contrastive` needs from an implementation."""

    name: str

    def lse(self, q: Tensor, k: Tensor, scale: Tensor, *, need_col: bool = True) -> tuple[Tensor, Tensor | None]: ...

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
    ) -> tuple[Tensor, Tensor | None]: ...


def _scaled_logits(q: Tensor, k: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return scale.to(dtype).reshape(()) * (q.to(dtype) @ k.to(dtype).T)


class ReferenceBackend:
    """Materialises the full M×N logits (in fp32, or fp64 for fp64 inputs). The test oracle."""

    name = "reference"

    @staticmethod
    def _acc(q: Tensor) -> torch.dtype:
        return torch.float64 if q.dtype == torch.float64 else torch.float32

    def lse(self, q: Tensor, k: Tensor, scale: Tensor, *, need_col: bool = True) -> tuple[Tensor, Tensor | None]:
        s = _scaled_logits(q, k, scale, self._acc(q))
        return torch.logsumexp(s, dim=1), (torch.logsumexp(s, dim=0) if need_col else None)

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
        acc = self._acc(q)
        s = _scaled_logits(q, k, scale, acc)
        ds = torch.zeros_like(s)
        if row_coef is not None:
            ds += row_coef.to(acc)[:, None] * torch.exp(s - row_lse.to(acc)[:, None])
        if col_coef is not None:
            if col_lse is None:
                raise ValueError("col_coef given without col_lse")
            ds += col_coef.to(acc)[None, :] * torch.exp(s - col_lse.to(acc)[None, :])
        sc = scale.to(acc).reshape(())
        dq = sc * (ds @ k.to(acc))
        dk = sc * (ds.T @ q.to(acc)) if need_dk else None
        return dq, dk
