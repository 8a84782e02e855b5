"""Distributed contrastive loss: local rows × global columns, O(N) statistics exchange, exact gradients.

Called by :func:`vlscale.loss.contrastive_loss` / :func:`vlscale.loss.info_nce` when their
``process_group`` has more than one rank; it can also be called directly. With W ranks, rank r
holding ``b_r`` pairs, the loss is the one of a single process holding the concatenation of all
ranks' rows in rank order, and no rank ever holds a B×B block or the O(B²/W) logits of
open_clip's local loss. The math is the single-process autograd core,
:func:`vlscale.loss.contrastive.fused_loss`, run on local rows × gathered columns; this module adds
the communication (:mod:`vlscale.loss.comm`) and the gradient convention.

Algorithm (per call)
    1. All-gather a small metadata vector (sizes, dtype, D, grad flags, finiteness, the scale,
       mixup λ, label ranges, a fingerprint of ``extra_keys``): every rank learns every local
       size, so uneven sizes (a last partial batch) just work, and bad or inconsistent inputs
       raise the same ``ValueError`` on every rank instead of leaving the others hanging in a
       collective. This is the call's one device→host sync.
    2. Gather the column side (text / keys; O(N·D)) asynchronously; with mixup, all-gather the
       ``labels_b`` slices too (O(N) int64, symmetric loss only).
    3. Row log-sum-exps are complete locally; column log-sum-exps (symmetric loss) are partial
       and merged with an all-reduce MAX + all-reduce SUM of exp-shifted values: 2·N fp32.
    4. Backward: the gathered columns' gradient partials are reduce-scattered to their owners
       (fp32, so the sum over ranks is exact to fp32); the logit-scale gradient is all-reduced.

    Memory per rank: the gathered columns (N·D, input dtype), their fp32 gradient in the
    backward (N·D·4) and O(N) statistics; never a logits block. Bytes moved per rank and a
    comparison with open_clip, DisCo-CLIP and Inf-CL: ``benchmarks/comm_model.py``.

Gradient convention (read this; open_clip #616 is this bug)
    DDP, DeepSpeed and FSDP AVERAGE parameter gradients over the W ranks after backward. So that
    the average is exactly the single-process gradient of the global loss:

    - the returned loss is the GLOBAL loss, identical on every rank (log it from any rank);
    - each rank's embedding gradients are **W ×** the exact gradient of the global loss w.r.t.
      its local rows (each rank's parameters see only their own rows: averaging W·gᵣ gives Σᵣ gᵣ);
    - the ``logit_scale`` gradient is the exact global gradient on every rank, i.e. W × this
      rank's 1/W share (it is shared by all rows: averaging W identical copies gives it back).

    If you SUM gradients over ranks instead of averaging, divide by W. The upstream gradient of
    the loss must be the same on all ranks (true for ``loss.backward()``, a loss weight, or a
    loss scale shared by the engine), and every rank must run the backward (it has collectives).

Labels, mixup and extra keys in the distributed case
    - Indices are GLOBAL: positions in the concatenation of every rank's columns in rank order.
    - ``info_nce(labels=None)`` means each query's own global index (rank offset + local index),
      i.e. ``arange(M)`` over the concatenated batch; explicit ``labels`` are this rank's slice of
      the global labels, values in ``[0, N_global)``.
    - ``mix=(labels_b, lam)``: ``labels_b`` is this rank's slice (one per local row) of the
      global ``labels_b``, in global indices; ``lam`` must be the same on every rank. For the
      symmetric loss the slices are all-gathered, because column j's second target is row
      ``labels_b[j]``, which may live on another rank.
    - ``extra_keys`` (a momentum queue) must be IDENTICAL on every rank, as MoCo/WenLan queues
      are after enqueueing gathered keys: every query sees the same negatives, exactly as a single
      process would. A cheap fingerprint is compared across ranks; a mismatch raises ValueError.

What is overlapped
    The column gather is W async broadcasts, one per owner (one all-gather above
    ``comm.PIPELINE_MAX_WORLD`` ranks). The forward's log-sum-exp starts at once on the local block
    (local rows × own columns, from the local tensor), then takes each other rank's piece as soon as
    it has landed, while the later pieces are still in flight; the mixup labels' all-gather rides
    along. What cannot be overlapped inside the loss: the column log-sum-exp merge (its input is the
    whole forward's output and the loss needs its result) and, in the backward, the reduce-scatter
    (its input is the gradient kernel's output and the towers' backward needs its result).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from vlscale.loss.backend import LossBackend
from vlscale.loss.comm import (
    GroupComm,
    Layout,
    PendingGather,
    dtype_code,
    exchange_meta,
    extra_fingerprint,
    flag_mask,
    flag_names,
    start_gather,
)
from vlscale.loss.contrastive import fused_loss, one_way_plan, symmetric_plan

__all__ = ["distributed_contrastive_loss", "distributed_info_nce"]


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor`` (W: see the convention)."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


class _OverlappedGather:
    """A :class:`LossBackend` wrapper that overlaps the column gather with the forward's compute.

    ``fused_loss`` first touches the gathered columns through ``backend.lse(q, k_all, ...)`` (the
    seam's documented order). That call runs while the gather is still in flight: it computes the
    block of this rank's own columns from the LOCAL tensor (its slot in the buffer may still be
    in flight on other streams), then, for a pipelined gather, waits for each other rank's piece
    only and computes its block while the later pieces are still arriving (W calls of N/W
    columns); for a single all-gather, waits once and computes the rest in two calls. Row lse are
    merged by log-sum-exp, column lse concatenated in rank order. Later calls pass through.
    """

    def __init__(self, inner: LossBackend, pending: PendingGather, k_local: Tensor, rank: int) -> None:
        self.inner = inner
        self.name = inner.name
        self._pending: PendingGather | None = pending
        self._k_local = k_local.detach()
        self._rank = rank

    def _finish(self) -> None:
        if self._pending is not None:
            self._pending.wait()
            self._pending = None

    def lse(self, q: Tensor, k: Tensor, scale: Tensor, **kw: object) -> tuple[Tensor, Tensor | None]:
        pending = self._pending
        buf = None if pending is None else pending.buffer
        if buf is None or k.data_ptr() != buf.data_ptr() or k.shape != buf.shape:
            self._finish()
            return self.inner.lse(q, k, scale, **kw)
        lo = sum(pending.sizes[: self._rank])
        blocks = [(lo, self.inner.lse(q, self._k_local, scale, **kw))]
        if pending.pipelined:  # one block per owner, each as soon as its piece has landed
            for src in range(len(pending.sizes)):
                if src != self._rank:
                    blocks.append((sum(pending.sizes[:src]), self.inner.lse(q, pending.wait_piece(src), scale, **kw)))
        else:  # one all-gather: wait once, then the columns before and after our own in two calls
            hi = lo + self._k_local.shape[0]
            self._finish()
            blocks += [(a, self.inner.lse(q, k[a:b], scale, **kw)) for a, b in ((0, lo), (hi, k.shape[0])) if b > a]
        self._finish()
        blocks.sort(key=lambda item: item[0])
        row = torch.logsumexp(torch.stack([r for _, (r, _) in blocks]), dim=0)
        if blocks[0][1][1] is None:
            return row, None
        return row, torch.cat([c for _, (_, c) in blocks])

    def grad(self, *args: object, **kw: object) -> tuple[Tensor, Tensor | None]:
        self._finish()
        return self.inner.grad(*args, **kw)


def _group(process_group: object | None) -> object:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("the distributed loss needs an initialised torch.distributed process group")
    return dist.group.WORLD if process_group is None else process_group


def _as_scale(logit_scale: Tensor | float, like: Tensor) -> Tensor:
    if isinstance(logit_scale, Tensor):
        return logit_scale
    return torch.tensor(float(logit_scale), dtype=torch.float32, device=like.device)


def _index_range(*indices: Tensor | None) -> tuple[Tensor | float, Tensor | float]:
    """(min, max) over the given index tensors as 0-dim device tensors (no host sync)."""
    given = [i.reshape(-1) for i in indices if i is not None and i.numel() > 0]
    if not given:
        return float("inf"), float("-inf")
    allv = torch.cat(given)
    return allv.min(), allv.max()


def _check_index_shape(name: str, idx: Tensor, rows: int, device: torch.device) -> Tensor:
    if not isinstance(idx, Tensor) or idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of global indices")
    if idx.shape != (rows,):
        raise ValueError(f"{name} must have shape ({rows},) (this rank's slice, one per local row), got {tuple(idx.shape)}")
    if idx.device != device:
        raise ValueError(f"device mismatch: embeddings on {device}, {name} on {idx.device}")
    return idx.long()


def _split_mix(mix: object, rows: int, device: torch.device) -> tuple[Tensor | None, float]:
    if mix is None:
        return None, 1.0
    if not isinstance(mix, (tuple, list)) or len(mix) != 2:
        raise ValueError("mix must be a pair (labels_b, lam)")
    lam = float(mix[1])
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"mix lam must lie in [0, 1], got {lam}")
    return _check_index_shape("mix labels", mix[0], rows, device), lam


def _meta(q: Tensor, k: Tensor, scale: Tensor, *, lam: float, labels: tuple[Tensor | None, ...],
          mix: bool, extra: Tensor | None, default_labels: bool) -> dict[str, float | Tensor]:
    lo, hi = _index_range(*labels)
    flags = flag_mask(grad_enabled=torch.is_grad_enabled(), q_grad=q.requires_grad, k_grad=k.requires_grad,
                      scale_grad=scale.requires_grad, default_labels=default_labels, mix=mix,
                      extra=extra is not None)
    s = scale.detach().reshape(()).double()
    finite = torch.stack([torch.isfinite(q).all(), torch.isfinite(k).all(), torch.isfinite(s) & (s > 0)]).all()
    return {"rows": float(q.shape[0]), "cols": float(k.shape[0]), "dim": float(q.shape[1]),
            "dtype": dtype_code(q.dtype), "flags": flags, "finite": finite, "scale": s, "lam": lam,
            "label_min": lo, "label_max": hi, **extra_fingerprint(extra)}


def _validate(layout: Layout, *, paired: bool, labels_bound: int) -> None:
    """Raise the same ValueError on every rank (all ranks see the same gathered metadata)."""
    bad = [r for r, ok in enumerate(layout.field("finite")) if not ok]
    if bad:
        raise ValueError(f"non-finite embeddings or logit_scale (or logit_scale <= 0) on rank(s) {bad}")
    masks = layout.field("flags")
    if len(set(masks)) != 1:
        differ = set.union(*map(flag_names, masks)) - set.intersection(*map(flag_names, masks))
        raise ValueError(f"ranks disagree on {sorted(differ)} (requires_grad, grad mode, labels=None, mix and "
                         "extra_keys must be the same on every rank: they decide which collectives run)")
    for name, what in (("dim", "embedding dimension D"), ("dtype", "embedding dtype"),
                       ("scale", "logit_scale (a replicated parameter)"),
                       ("lam", "mix lam"), ("extra_rows", "number of extra_keys")):
        vals = layout.field(name)
        if len(set(vals)) != 1:
            raise ValueError(f"{what} differs across ranks: {vals} (every rank must call the loss the same way)")
    for name in ("extra_sum", "extra_wsum"):
        vals = layout.field(name)
        if max(vals) - min(vals) > 1e-5 * (1.0 + max(abs(v) for v in vals)):
            raise ValueError(
                "extra_keys differ across ranks: the distributed loss needs the SAME queue on every rank "
                f"(fingerprints {vals}); enqueue all-gathered keys so that all ranks hold one queue"
            )
    if paired and layout.sizes("rows") != layout.sizes("cols"):
        raise ValueError(f"image and text rows differ: {layout.sizes('rows')} vs {layout.sizes('cols')}")
    lo, hi = min(layout.field("label_min")), max(layout.field("label_max"))
    if lo < 0 or hi >= labels_bound:
        raise ValueError(
            f"labels / mix labels are GLOBAL column indices and must lie in [0, {labels_bound}); "
            f"got min {int(lo)} max {int(hi)} over all ranks"
        )


def _gather_columns(k: Tensor, layout: Layout, backend: LossBackend, group: object) -> tuple[Tensor, LossBackend]:
    """Start the column gather; return (the buffer it fills, a backend that overlaps with it)."""
    pending = start_gather(k, layout.sizes("cols"), group)
    return pending.buffer, _OverlappedGather(backend, pending, k, layout.rank)


def distributed_contrastive_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor | float,
    *,
    mix: tuple[Tensor, float | Tensor] | None = None,
    backend: LossBackend,
    process_group: object | None = None,
) -> Tensor:
    """Symmetric CLIP loss over the concatenation of every rank's pairs (see the module docstring).

    ``image_emb``/``text_emb`` (b_r, D): this rank's pairs (b_r may differ across ranks).
    ``mix=(labels_b, lam)``: ``labels_b`` (b_r,) is this rank's slice of the global labels_b, in
    global indices. Returns the global loss on every rank; embedding gradients are W × exact.
    """
    group = _group(process_group)
    scale = _as_scale(logit_scale, image_emb)
    n = image_emb.shape[0]
    if text_emb.shape[0] != n:
        raise ValueError(f"image_emb has {n} rows but text_emb has {text_emb.shape[0]} (paired row by row)")
    labels_b, lam = _split_mix(mix, n, image_emb.device)
    meta = _meta(image_emb, text_emb, scale, lam=lam, labels=(labels_b,), mix=mix is not None, extra=None,
                 default_labels=False)
    layout = exchange_meta(meta, image_emb.device, group)
    total = layout.total("cols")
    _validate(layout, paired=True, labels_bound=total)
    pending_labels = None
    if labels_b is not None:  # tiny: one all-gather, in flight together with the columns
        pending_labels = start_gather(labels_b, layout.sizes("cols"), group, pipelined=False)
    k_all, inner = _gather_columns(text_emb, layout, backend, group)
    offset = layout.offset("cols")
    mix_global = None if pending_labels is None else (pending_labels.wait(), lam)
    plan = symmetric_plan(n, num_total=total, offset=offset, mix=mix_global, device=image_emb.device)
    comm = GroupComm(group, layout.sizes("cols"), layout.rank)
    q = _ScaleGrad.apply(image_emb, float(layout.world))
    k = _ScaleGrad.apply(text_emb, float(layout.world))
    return fused_loss(q, k, scale, plan, backend=inner, k_all=k_all, comm=comm)


def distributed_info_nce(
    query: Tensor,
    keys: Tensor,
    logit_scale: Tensor | float,
    *,
    labels: Tensor | None = None,
    mix: tuple[Tensor, float | Tensor] | None = None,
    extra_keys: Tensor | None = None,
    backend: LossBackend,
    process_group: object | None = None,
) -> Tensor:
    """One-way InfoNCE of the concatenated queries against the concatenated keys (+ a shared queue).

    ``query`` (m_r, D), ``keys`` (n_r, D): this rank's rows (sizes may differ across ranks and
    m_r ≠ n_r). ``labels`` (m_r,): global key indices (default: each query's global index);
    ``mix`` labels likewise; ``extra_keys`` (E, D): identical on every rank, negatives only.
    """
    group = _group(process_group)
    scale = _as_scale(logit_scale, query)
    m = query.shape[0]
    if labels is not None:
        labels = _check_index_shape("labels", labels, m, query.device)
    labels_b, lam = _split_mix(mix, m, query.device)
    meta = _meta(query, keys, scale, lam=lam, labels=(labels, labels_b), mix=mix is not None,
                 extra=extra_keys, default_labels=labels is None)
    layout = exchange_meta(meta, query.device, group)
    n_total, m_total = layout.total("cols"), layout.total("rows")
    _validate(layout, paired=False, labels_bound=n_total)
    if labels is None:
        if m_total > n_total:
            raise ValueError(f"labels=None means the global arange({m_total}) but there are only {n_total} keys")
        labels = layout.offset("rows") + torch.arange(m, device=query.device)
    k_all, inner = _gather_columns(keys, layout, backend, group)
    mix_local = None if labels_b is None else (labels_b, lam)
    plan = one_way_plan(labels, num_total=m_total, mix=mix_local, col_offset=layout.offset("cols"))
    comm = GroupComm(group, layout.sizes("cols"), layout.rank)
    q = _ScaleGrad.apply(query, float(layout.world))
    k = _ScaleGrad.apply(keys, float(layout.world))
    return fused_loss(q, k, scale, plan, backend=inner, k_all=k_all, extra_keys=extra_keys, comm=comm)

