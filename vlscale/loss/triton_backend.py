"""Triton backend: :class:`vlscale.loss.backend.LossBackend` on top of :mod:`vlscale.kernels.contrastive`.

Runs on CUDA devices of compute capability ≥ 8.0 and, for tests, in Triton's CPU interpreter
(``TRITON_INTERPRET=1``). Whether it *can* run is decided by :mod:`vlscale.loss.backends`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from vlscale.kernels import contrastive as kern


class TritonBackend:
    """Fused kernels: forward O(M+N) statistics, backward recomputes S tile by tile.

    ``settings`` fixes every tile size (tests); otherwise :func:`kern.kernel_settings` picks them per
    shape and ``overrides`` (KernelSettings field names, e.g. ``block_n=128`` or
    ``backward="banded"``) replace some of them (benchmark tuning, the backward variants).
    ``name`` is ``"triton"`` for the default backward, else ``"triton-<backward>"`` (the registered
    impl names of :mod:`vlscale.loss.backends`).
    """

    def __init__(self, settings: kern.KernelSettings | None = None, **overrides: object) -> None:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(kern.KernelSettings)}
        if unknown:
            raise ValueError(f"unknown kernel settings {sorted(unknown)}")
        backward = settings.backward if settings is not None else overrides.get("backward", "shared")
        if backward not in kern.BACKWARDS:
            raise ValueError(f"backward must be one of {kern.BACKWARDS}, got {backward!r}")
        self.settings = settings
        self.overrides = overrides
        self.name = "triton" if backward == kern.BACKWARDS[0] else f"triton-{backward}"

    def _cfg(self, q: Tensor, k: Tensor) -> kern.KernelSettings:
        if q.dtype == torch.float64:
            raise ValueError("the triton backend takes float16, bfloat16 or float32 embeddings, not float64")
        if self.settings is not None:
            return self.settings
        cfg = kern.kernel_settings(q.shape[0], k.shape[0], q.shape[1], q.dtype, q.device)
        return dataclasses.replace(cfg, **self.overrides) if self.overrides else cfg

    def lse(self, q: Tensor, k: Tensor, scale: Tensor, *, need_col: bool = True) -> tuple[Tensor, Tensor | None]:
        return kern.lse(q, k, scale, need_col=need_col, settings=self._cfg(q, k))

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
        return kern.grad(q, k, scale, row_lse, col_lse, row_coef, col_coef, need_dk=need_dk,
                         settings=self._cfg(q, k))
