"""The contrastive losses of vlscale: public API, the autograd core, and the seam for the distributed loss.

Public API (other parts and hidden tests call these names)::

    contrastive_loss(image_emb, text_emb, logit_scale, *, mix=None, impl="auto", process_group=None)
    info_nce(query, keys, logit_scale, *, labels=None, mix=None, extra_keys=None, impl="auto",
             process_group=None)
    ContrastiveLoss(impl="auto", process_group=None)      # nn.Module form of contrastive_loss

Both losses are one computation on one similarity matrix ``S = s·Q·Kᵀ``: a backend (see
:mod:`vlscale.loss.backend`) gives the row and column log-sum-exp in ONE ``lse`` call and the dense
gradient of both directions in ONE ``grad`` call; everything sparse (targets, mixup, the loss value,
d(loss)/d(s)) is assembled here in O((M+N)·D) torch code. With targets written as a sparse list of
pairs ``(i, j, w)``::

    loss = row_coef·Σ_i row_lse_i + col_coef·Σ_j col_lse_j − Σ_pairs w·S_ij
    dS   = g·row_coef·P_row + g·col_coef·P_col − g·Σ_pairs w·δ_ij
    dQ = s·dS·K,  dK = s·dSᵀ·Q,  ds = Σ_ij dS_ij·S_ij / s = Σ_i ⟨dQ_i, Q_i⟩ / s

``contrastive_loss``: row_coef = col_coef = 1/(2B); ``info_nce``: row_coef = 1/M, col_coef = 0.

THE SEAM FOR THE DISTRIBUTED LOSS (stable; :mod:`vlscale.loss.distributed` codes against it)
-----------------------------------------------------------------------------------------
``fused_loss(q, k, scale, plan, *, backend, k_all=None, extra_keys=None, comm=None) -> Tensor``

- ``q``: (M_local, D) this rank's rows (gradient returned for them, exact global gradient).
- ``k``: (N_local, D) this rank's columns: the tensor that receives the columns' gradient.
- ``k_all``: (N, D) every column (the all-gathered keys, without autograd history; default ``k``).
  It must hold ``k_all[plan.col_offset : plan.col_offset + N_local] == k``.
- ``extra_keys``: (E, D) negatives seen by every local row, no gradient (e.g. a momentum queue).
- ``scale``: the logit multiplier s, shape [] or [1]; its gradient is the exact global one.
- ``plan``: a :class:`LossPlan` (targets as sparse pairs in GLOBAL column indices, coefficients
  already divided by the GLOBAL row count). Build it with :func:`symmetric_plan` /
  :func:`one_way_plan`, which take ``offset`` (global index of the first local row) and
  ``num_total`` (the global row count).
- ``backend``: a :class:`~vlscale.loss.backend.LossBackend` (``get_backend(impl, device)``).
- ``comm``: an object with three methods (single process: :class:`LocalComm`, the identity)::

      merge_col_lse(col_lse_partial: Tensor (N,) fp32) -> Tensor (N,)
          log-sum-exp all-reduce of column statistics computed over the local rows only.
      reduce_dk(dk_all: Tensor (N, D) fp32) -> Tensor (N_local, D)
          sum the per-rank partial column gradients and return this rank's slice
          [plan.col_offset, plan.col_offset + N_local) (a reduce-scatter).
      sum_scalar(x: Tensor []) -> Tensor []
          all-reduce SUM of a 0-dim fp32 tensor (loss terms, the scale gradient).

  ``merge_col_lse`` is called in the forward (only when ``plan.col_coef != 0``); ``reduce_dk``
  (only when ``k`` requires grad) and ``sum_scalar`` in the backward, so every rank must run the
  backward. The returned loss is the global loss on every rank, and every gradient is the exact
  gradient of that global loss: W ranks × B/W rows give the single-process gradients for B rows.
  (An engine that AVERAGES parameter gradients over ranks must therefore be fed loss·W, or the
  caller rescales; that convention belongs to the distributed module.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from vlscale.loss.backend import LossBackend
from vlscale.loss.backends import get_backend
from vlscale.loss.checks import (
    check_embeddings,
    check_labels,
    check_mix,
    check_scale,
    check_values,
)

Mix = tuple[Tensor, "float | Tensor"]


class Comm(Protocol):
    """Collectives the core needs; see the module docstring for the exact contract."""

    def merge_col_lse(self, col_lse_partial: Tensor) -> Tensor: ...

    def reduce_dk(self, dk_all: Tensor) -> Tensor: ...

    def sum_scalar(self, x: Tensor) -> Tensor: ...


class LocalComm:
    """Single process: every collective is the identity (local rows are all rows)."""

    def merge_col_lse(self, col_lse_partial: Tensor) -> Tensor:
        return col_lse_partial

    def reduce_dk(self, dk_all: Tensor) -> Tensor:
        return dk_all

    def sum_scalar(self, x: Tensor) -> Tensor:
        return x


@dataclass(frozen=True)
class LossPlan:
    """Targets and weights of one loss evaluation, independent of the embeddings' values.

    ``loss = row_coef·Σ_local rows row_lse + col_coef·Σ_local cols col_lse − Σ_p pair_coef_p·S[p]``.
    """

    pair_rows: Tensor  # (P,) int64: LOCAL row index of each target pair
    pair_cols: Tensor  # (P,) int64: GLOBAL column index (into k_all) of each target pair
    pair_coef: Tensor  # (P,) fp32: weight of S[row, col] in the loss (includes 1/M and ½ factors)
    row_coef: float  # weight of each row's log-sum-exp
    col_coef: float = 0.0  # weight of each column's log-sum-exp; 0.0 = no column direction
    col_offset: int = 0  # global index of this rank's first column within k_all


def _pairs(rows: list[Tensor], cols: list[Tensor], coefs: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    return torch.cat(rows), torch.cat(cols), torch.cat(coefs).float()


def symmetric_plan(
    num_local: int,
    *,
    num_total: int,
    offset: int = 0,
    mix: tuple[Tensor, float] | None = None,
    device: torch.device | str = "cpu",
) -> LossPlan:
    """Plan of the symmetric CLIP loss over ``num_total`` pairs; this rank holds rows and columns
    ``[offset, offset + num_local)``. ``mix = (labels_b, lam)`` with ``labels_b`` GLOBAL (num_total,):
    row i targets lam on column i and 1−lam on column labels_b[i]; column j targets lam on row j and
    1−lam on row labels_b[j] (only pairs whose row is local are listed here)."""
    rc = cc = 0.5 / num_total
    local = torch.arange(num_local, device=device)
    glob = local + offset
    if mix is None or mix[1] == 1.0:
        coef = torch.full((num_local,), rc + cc, device=device)
        return LossPlan(local, glob, coef, rc, cc, offset)
    labels_b, lam = mix[0].to(device), float(mix[1])
    # Column j's second target is row labels_b[j]: keep the columns whose target row is ours.
    col_j = torch.nonzero((labels_b >= offset) & (labels_b < offset + num_local)).flatten()
    rows, cols, coefs = _pairs(
        [local, local, labels_b[col_j] - offset],
        [glob, labels_b[glob], col_j],
        [
            torch.full((num_local,), (rc + cc) * lam, device=device),
            torch.full((num_local,), rc * (1.0 - lam), device=device),
            torch.full((col_j.numel(),), cc * (1.0 - lam), device=device),
        ],
    )
    return LossPlan(rows, cols, coefs, rc, cc, offset)


def one_way_plan(
    labels: Tensor, *, num_total: int, mix: tuple[Tensor, float] | None = None, col_offset: int = 0
) -> LossPlan:
    """Plan of ``mean_i CE(row i, labels[i])`` over ``num_total`` rows, of which this rank holds
    ``len(labels)``; ``labels`` and ``mix[0]`` are GLOBAL column indices (one per local row)."""
    rc = 1.0 / num_total
    local = torch.arange(labels.numel(), device=labels.device)
    if mix is None or mix[1] == 1.0:
        return LossPlan(local, labels, torch.full_like(labels, rc, dtype=torch.float32), rc, 0.0, col_offset)
    labels_b, lam = mix[0].to(labels.device), float(mix[1])
    rows, cols, coefs = _pairs(
        [local, local],
        [labels, labels_b],
        [torch.full_like(labels, rc * lam, dtype=torch.float32),
         torch.full_like(labels, rc * (1.0 - lam), dtype=torch.float32)],
    )
    return LossPlan(rows, cols, coefs, rc, 0.0, col_offset)


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# Row blocks for the O((M+N)·D) torch parts: bounds their fp32 temporaries to _ROWS·D floats
# (128 MiB at D = 512) instead of a full fp32 copy of the embeddings (1 GiB at B = 262,144).
_ROWS = 65536


def _pair_scores(q: Tensor, k: Tensor, rows: Tensor, cols: Tensor, acc: torch.dtype) -> Tensor:
    """``⟨q[rows_p], k[cols_p]⟩`` for every target pair, in ``acc``."""
    out = [(q[r].to(acc) * k[c].to(acc)).sum(-1) for r, c in zip(rows.split(_ROWS), cols.split(_ROWS))]
    return torch.cat(out) if out else q.new_zeros(0, dtype=acc)


def _scatter_pairs(out: Tensor, idx: Tensor, w: Tensor, src: Tensor, src_idx: Tensor) -> None:
    """``out[idx_p] += w_p · src[src_idx_p]`` (in place, in ``out``'s dtype)."""
    for i, ww, j in zip(idx.split(_ROWS), w.split(_ROWS), src_idx.split(_ROWS)):
        out.index_add_(0, i, ww[:, None] * src[j].to(out.dtype))


def _dot_sum(a: Tensor, b: Tensor) -> Tensor:
    """``Σ_ij a_ij·b_ij`` in ``a``'s dtype without a full-size converted copy of ``b``."""
    return sum(((x * y.to(a.dtype)).sum() for x, y in zip(a.split(_ROWS), b.split(_ROWS))), a.new_zeros(()))


class _FusedLoss(torch.autograd.Function):
    """forward: O(M+N) statistics from one ``lse`` call; backward: one ``grad`` call + sparse terms."""

    @staticmethod
    def forward(ctx, q, k, scale, k_all, extra, plan: LossPlan, backend: LossBackend, comm: Comm):
        acc = _acc_dtype(q)
        s = scale.detach().reshape(()).to(acc)
        has_col = plan.col_coef != 0.0
        row_lse, col_lse = backend.lse(q, k_all, s, need_col=has_col)
        if extra is not None:
            row_lse = torch.logaddexp(row_lse, backend.lse(q, extra, s, need_col=False)[0])
        col_lse = comm.merge_col_lse(col_lse) if has_col else None
        pair_s = s * _pair_scores(q, k_all, plan.pair_rows, plan.pair_cols, acc)
        local = plan.row_coef * row_lse.to(acc).sum() - (plan.pair_coef.to(acc) * pair_s).sum()
        if has_col:
            mine = col_lse[plan.col_offset : plan.col_offset + k.shape[0]]
            local = local + plan.col_coef * mine.to(acc).sum()
        ctx.save_for_backward(q, k_all, extra, s, row_lse, col_lse)
        ctx.plan, ctx.backend, ctx.comm = plan, backend, comm
        ctx.scale_shape, ctx.scale_dtype = scale.shape, scale.dtype
        return comm.sum_scalar(local)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k_all, extra, s, row_lse, col_lse = ctx.saved_tensors
        plan, backend, comm = ctx.plan, ctx.backend, ctx.comm
        need_k, need_s = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        acc = _acc_dtype(q)
        g = grad_out.detach().reshape(()).to(acc)
        rc = (g * plan.row_coef).expand(q.shape[0]).contiguous()
        cc = (g * plan.col_coef).expand(k_all.shape[0]).contiguous() if col_lse is not None else None
        dq, dk_all = backend.grad(q, k_all, s, row_lse, col_lse, rc, cc, need_dk=need_k)
        dq = dq.to(acc)
        if extra is not None:
            dq = dq + backend.grad(q, extra, s, row_lse, None, rc, None, need_dk=False)[0].to(acc)
        # Sparse target terms: dS_p = −g·coef_p at each pair.
        w = (-g * s) * plan.pair_coef.to(acc)
        _scatter_pairs(dq, plan.pair_rows, w, k_all, plan.pair_cols)
        dk = None
        if need_k:
            dk_all = dk_all.to(acc)
            _scatter_pairs(dk_all, plan.pair_cols, w, q, plan.pair_rows)
            dk = comm.reduce_dk(dk_all).to(k_all.dtype)
            del dk_all
        ds = None
        if need_s:
            ds = comm.sum_scalar(_dot_sum(dq, q)) / s
            ds = ds.reshape(ctx.scale_shape).to(ctx.scale_dtype)
        return dq.to(q.dtype), dk, ds, None, None, None, None, None


def fused_loss(
    q: Tensor,
    k: Tensor,
    scale: Tensor,
    plan: LossPlan,
    *,
    backend: LossBackend,
    k_all: Tensor | None = None,
    extra_keys: Tensor | None = None,
    comm: Comm | None = None,
) -> Tensor:
    """The autograd core (the distributed seam; see the module docstring). Inputs are not validated."""
    k_all = k if k_all is None else k_all.detach()
    extra = None if extra_keys is None else extra_keys.detach()
    return _FusedLoss.apply(q, k, scale, k_all, extra, plan, backend, comm or LocalComm())


def _world_size(process_group: object | None) -> int:
    if process_group is None:
        return 1
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group given but torch.distributed is not initialised")
    return dist.get_world_size(process_group)


def _distributed(name: str):
    """The distributed entry point ``name`` of :mod:`vlscale.loss.distributed` (imported lazily)."""
    import importlib.util

    if importlib.util.find_spec("vlscale.loss.distributed") is None:
        raise NotImplementedError(
            "contrastive loss over a process group with world size > 1 needs vlscale.loss.distributed, "
            "which is not available in this build; gather the embeddings yourself or use world size 1"
        )
    from vlscale.loss import distributed

    return getattr(distributed, name)


def _scale_tensor(logit_scale: Tensor | float, like: Tensor) -> Tensor:
    if not isinstance(logit_scale, Tensor):
        logit_scale = torch.tensor(float(logit_scale), device=like.device)
    return logit_scale


def contrastive_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor | float,
    *,
    mix: Mix | None = None,
    impl: str | LossBackend = "auto",
    process_group: object | None = None,
) -> Tensor:
    """Symmetric CLIP loss ``½·mean_i CE(row i of s·I·Tᵀ, i) + ½·mean_j CE(column j, j)`` (fp32 scalar).

    ``mix=(labels_b, lam)``: row i targets lam on column i and 1−lam on column labels_b[i];
    column j targets lam on row j and 1−lam on row labels_b[j].
    """
    scale = _scale_tensor(logit_scale, image_emb)
    check_embeddings(("image_emb", image_emb), ("text_emb", text_emb), paired=True)
    check_scale(scale, image_emb.device)
    backend = get_backend(impl, image_emb.device)
    if _world_size(process_group) > 1:
        # mix labels are GLOBAL indices there, and values are checked COLLECTIVELY by the
        # distributed module: a local-only raise would leave the other ranks hanging.
        fn = _distributed("distributed_contrastive_loss")
        return fn(image_emb, text_emb, scale, mix=mix, backend=backend, process_group=process_group)
    mix_t = check_mix(mix, image_emb.shape[0], text_emb.shape[0], image_emb.device)
    check_values(
        [("image_emb", image_emb), ("text_emb", text_emb)],
        [("mix labels", mix_t[0], text_emb.shape[0])] if mix_t else [],
        scale,
    )
    plan = symmetric_plan(image_emb.shape[0], num_total=image_emb.shape[0], mix=mix_t, device=image_emb.device)
    return fused_loss(image_emb, text_emb, scale, plan, backend=backend)


def info_nce(
    query: Tensor,
    keys: Tensor,
    logit_scale: Tensor | float,
    *,
    labels: Tensor | None = None,
    mix: Mix | None = None,
    extra_keys: Tensor | None = None,
    impl: str | LossBackend = "auto",
    process_group: object | None = None,
) -> Tensor:
    """One-way InfoNCE ``mean_i CE(row i of s·Q·[K; extra]ᵀ, labels[i])`` (fp32 scalar).

    ``labels`` (M,) index ``keys`` (default ``arange(M)``, which needs N ≥ M); ``extra_keys`` are
    negatives only and get no gradient; ``mix=(labels_b, lam)``: lam on labels[i], 1−lam on labels_b[i].
    """
    scale = _scale_tensor(logit_scale, query)
    named = [("query", query), ("keys", keys)] + ([("extra_keys", extra_keys)] if extra_keys is not None else [])
    check_embeddings(*named, paired=False)
    check_scale(scale, query.device)
    backend = get_backend(impl, query.device)
    if _world_size(process_group) > 1:
        # labels are GLOBAL indices there (None = each query's global index) and values are checked
        # collectively (a local-only raise would leave the other ranks hanging in a collective).
        fn = _distributed("distributed_info_nce")
        return fn(query, keys, scale, labels=labels, mix=mix, extra_keys=extra_keys, backend=backend,
                  process_group=process_group)
    m, n = query.shape[0], keys.shape[0]
    labels = check_labels(labels, m, n, query.device)
    mix_t = check_mix(mix, m, n, query.device)
    label_checks = [("labels", labels, n)] + ([("mix labels", mix_t[0], n)] if mix_t else [])
    check_values(named, label_checks, scale)
    plan = one_way_plan(labels, num_total=m, mix=mix_t)
    return fused_loss(query, keys, scale, plan, backend=backend, extra_keys=extra_keys)


class ContrastiveLoss(nn.Module):
    """``nn.Module`` form of :func:`contrastive_loss`: ``forward(image_emb, text_emb, logit_scale, mix=None)``."""

    def __init__(self, impl: str | LossBackend = "auto", process_group: object | None = None) -> None:
        super().__init__()
        self.impl = impl
        self.process_group = process_group

    def forward(
        self, image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float, mix: Mix | None = None
    ) -> Tensor:
        return contrastive_loss(
            image_emb, text_emb, logit_scale, mix=mix, impl=self.impl, process_group=self.process_group
        )

    def extra_repr(self) -> str:
        return f"impl={self.impl!r}"
