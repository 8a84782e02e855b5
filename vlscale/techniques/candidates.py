"""BriVL's exact 1 + K candidate set: each query against its own positive key and a key queue.

WenLan / BriVL (arXiv 2103.06561; official ``models/vl_model.py``) scores every query against its
positive momentum key and the K queued keys only — not against the other keys of the batch::

    ℓ_i = −log( exp(s·⟨q_i, k_i⟩) / (exp(s·⟨q_i, k_i⟩) + Σ_{n ∈ queue} exp(s·⟨q_i, n⟩)) )

With mixup soft targets (``mix = (partner, lam)``, partners as LOCAL row indices) the candidates are
the query's target keys — its own and its partner's — plus the queue, and the target puts ``lam``
on the first and ``1 − lam`` on the second (a row that is its own partner has one target).

The queue part never materialises the (B, K) logits: its row log-sum-exp comes from the fused loss
backends (:mod:`vlscale.loss.backend`, ``lse`` / ``grad``), O(B) memory. Every term is local to its
row, so nothing is gathered across ranks; the value returned is the global mean over all ranks'
rows, and each rank's gradient is the one the engines' rank-average turns into the global gradient
(W × the local share for the rows, the local mean's for ``logit_scale``), the convention of
:mod:`vlscale.gradcache`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from vlscale.loss.backend import LossBackend
from vlscale.loss.backends import get_backend


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _RowLse(torch.autograd.Function):
    """``lse_i = log Σ_j exp(s·⟨q_i, k_j⟩)`` (fp32, (M,)) with gradients for q and s (k is constant)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, scale: Tensor, backend: LossBackend) -> Tensor:  # type: ignore[override]
        s = scale.detach().reshape(()).to(_acc(q))
        lse, _ = backend.lse(q, k, s, need_col=False)
        ctx.save_for_backward(q, k, s, lse)
        ctx.backend, ctx.scale_shape, ctx.scale_dtype = backend, scale.shape, scale.dtype
        return lse.to(_acc(q))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        q, k, s, lse = ctx.saved_tensors
        # dS_ij = g_i·softmax_ij: the backend's row term with the per-row coefficient g_i.
        acc = _acc(q)
        dq, _ = ctx.backend.grad(q, k, s, lse, None, grad.to(acc).contiguous(), None, need_dk=False)
        dq = dq.to(acc)
        ds = (dq * q.to(acc)).sum() / s if ctx.needs_input_grad[2] else None
        ds = None if ds is None else ds.reshape(ctx.scale_shape).to(ctx.scale_dtype)
        return dq.to(q.dtype), None, ds, None


def row_lse(q: Tensor, k: Tensor, scale: Tensor, *, impl: str | LossBackend = "auto") -> Tensor:
    """Differentiable row log-sum-exp of ``s·Q·Kᵀ`` without the (M, N) matrix (``k`` gets no gradient)."""
    backend = get_backend(impl, q.device) if isinstance(impl, str) else impl
    return _RowLse.apply(q, k.detach(), scale, backend)


def positive_queue_nce(query: Tensor, keys: Tensor, queue: Tensor | None, logit_scale: Tensor, *,
                       mix: tuple[Tensor, float] | None = None, impl: str | LossBackend = "auto",
                       process_group: object | None = None) -> Tensor:
    """Mean over all ranks' rows of the 1 + K loss above (fp32 scalar); ``keys[i]`` is row i's positive.

    ``queue`` (K, E): negatives shared by every row (None = none yet: only the positives);
    ``mix = (partner, lam)``: LOCAL partner row of each row, soft targets lam / 1 − lam."""
    if query.dim() != 2 or keys.shape != query.shape:
        raise ValueError(f"query {tuple(query.shape)} and keys {tuple(keys.shape)} must be the same (B, E)")
    if queue is not None and (queue.dim() != 2 or queue.shape[1] != query.shape[1]):
        raise ValueError(f"queue {tuple(queue.shape)} must be (K, {query.shape[1]})")
    acc = _acc(query)
    s = logit_scale.reshape(()).to(acc)
    q32, keys = query.to(acc), keys.detach().to(acc)
    pos = s * (q32 * keys).sum(-1)
    candidates, target = [pos], pos
    if mix is not None and float(mix[1]) != 1.0:
        partner, lam = mix[0].to(query.device).long(), float(mix[1])
        if partner.shape != (query.shape[0],) or bool((partner < 0).any() | (partner >= query.shape[0]).any()):
            raise ValueError(f"mix partners must be {query.shape[0]} LOCAL row indices, got {tuple(partner.shape)}")
        other = s * (q32 * keys[partner]).sum(-1)
        self_partner = partner == torch.arange(query.shape[0], device=query.device)
        # A row that is its own partner has one target: its key must not be counted twice.
        candidates.append(other.masked_fill(self_partner, float("-inf")))
        target = lam * pos + (1.0 - lam) * other
    if queue is not None and queue.shape[0] > 0:
        candidates.append(row_lse(query, queue.to(query.dtype), logit_scale, impl=impl))
    per_row = torch.logsumexp(torch.stack(candidates), dim=0) - target
    return _global_mean(per_row, process_group)


def _global_mean(per_row: Tensor, group: object | None) -> Tensor:
    """Σ_local / N_global as the gradient path (× W), the global mean as the value."""
    if group is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return per_row.mean()
    world = dist.get_world_size(group)
    stats = torch.stack([per_row.detach().sum(), per_row.new_tensor(float(per_row.shape[0]))])
    dist.all_reduce(stats, group=group)
    local = per_row.sum() * (world / stats[1])
    return local + (stats[0] / stats[1] - local).detach()
