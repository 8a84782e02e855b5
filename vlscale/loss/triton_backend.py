"""Triton backend: :class:`vlscale.loss.backend.LossBackend` on top of :mod:`vlscale.kernels.contrastive`.

Runs on CUDA devices of compute capability ≥ 8.0 and, for tests, in Triton's CPU interpreter
(``TRITON_INTERPRET=1``). Whether it *can* run is decided by :mod:`vlscale.loss.backends`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlscale.kernels import contrastive as kern


class TritonBackend:
    """Fused kernels: forward O(M+N) statistics, backward recomputes S tile by tile."""

    name = "triton"

    def __init__(self, settings: kern.KernelSettings | None = None) -> None:
        self.settings = settings  # None: kern.kernel_settings picks per shape

    @staticmethod
    def _check(q: Tensor) -> None:
        if q.dtype == torch.float64:
            raise ValueError("the triton backend takes float16, bfloat16 or float32 embeddings, not float64")

    def lse(self, q: Tensor, k: Tensor, scale: Tensor, *, need_col: bool = True) -> tuple[Tensor, Tensor | None]:
        self._check(q)
        return kern.lse(q, k, scale, need_col=need_col, settings=self.settings)

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
        self._check(q)
        return kern.grad(q, k, scale, row_lse, col_lse, row_coef, col_coef, need_dk=need_dk,
                         settings=self.settings)
