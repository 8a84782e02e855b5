"""Collectives of the distributed contrastive loss: who holds which rows, and the three exchanges.

The distributed loss (:mod:`vlscale.loss.distributed`) needs exactly these collectives per call,
all on one process group, issued in the same order on every rank:

- forward, first: all-gather of the metadata, ``len(META_FIELDS)`` float64 per rank;
- forward: the columns (keys / texts), ``N·D`` in the input dtype, async: W broadcasts, one per
  owner, up to ``PIPELINE_MAX_WORLD`` ranks, else one all-gather of pieces padded to ``n_max``;
- forward, symmetric loss with mixup: all-gather of the ``labels_b`` slices, ``n_max`` int64;
- forward, symmetric loss: all-reduce MAX + all-reduce SUM of ``N`` fp32 each (column lse merge);
- forward: all-reduce SUM of 1 fp32 (the loss value);
- backward: reduce-scatter of the columns' gradient, ``W·n_max·D`` fp32 in, ``n_max·D`` out;
- backward: all-reduce SUM of 1 fp32 (the logit-scale gradient).

The column statistics exchange is O(N) floats, independent of D and never O(N²): each rank
holds log-sum-exps over its local rows, ``c_r``; the merge is ``m = max_r c_r`` (all-reduce
MAX), ``c = m + log Σ_r exp(c_r − m)`` (all-reduce SUM), which never overflows in fp32.

Uneven local batch sizes (a last partial batch) are supported: broadcasts go straight into each
owner's slice; the fixed-size collectives (all-gather, reduce-scatter) pad every piece to the
largest local size ``n_max`` and drop the padding afterwards. Every collective is looked up as ``dist.<name>`` at call time, so a test can count the bytes
moved by wrapping the ``torch.distributed`` functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

# Metadata every rank publishes once per loss call (float64: sizes are exact below 2**53).
META_FIELDS = (
    "rows",  # local query/image rows
    "cols",  # local key/text rows
    "dim",  # D
    "dtype",  # dtype code of the embeddings
    "flags",  # bit mask of FLAG_BITS (must agree on every rank: they decide which collectives run)
    "finite",  # 1 when this rank's embeddings and scale are finite and the scale is > 0
    "scale",  # the logit scale s (a replicated parameter: must be equal on every rank)
    "lam",  # mixup weight (1.0 without mix)
    "label_min",  # smallest label / mix label given on this rank (+inf if none)
    "label_max",  # largest label / mix label given on this rank (-inf if none)
    "extra_rows",  # number of extra keys (a queue shared by all ranks)
    "extra_sum",  # fingerprint of the extra keys: Σ of all entries (fp32 accumulation)
    "extra_wsum",  # fingerprint: Σ_i w_i·rowsum_i with w_i rising from 1 to 2 (order-sensitive)
)
FLAG_BITS = ("grad_enabled", "q_grad", "k_grad", "scale_grad", "default_labels", "mix", "extra")
# torch ≥ 2.14 renamed the tensor-in/tensor-out collectives (same signatures); 2.11 has the old names.
_ALL_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
_REDUCE_SCATTER = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"
_DTYPE_CODES = {torch.float16: 1.0, torch.bfloat16: 2.0, torch.float32: 3.0, torch.float64: 4.0}


@dataclass(frozen=True)
class Layout:
    """Who holds which rows: the metadata of every rank of the group, gathered once per call."""

    rank: int
    world: int
    meta: Tensor  # (W, len(META_FIELDS)) float64 on the CPU

    def field(self, name: str) -> list[float]:
        return self.meta[:, META_FIELDS.index(name)].tolist()

    def sizes(self, name: str) -> list[int]:
        return [int(v) for v in self.field(name)]

    def offset(self, name: str) -> int:
        """Global index of this rank's first row of ``name`` ("rows" or "cols")."""
        return sum(self.sizes(name)[: self.rank])

    def total(self, name: str) -> int:
        return sum(self.sizes(name))


def dtype_code(dtype: torch.dtype) -> float:
    return _DTYPE_CODES.get(dtype, 0.0)


def flag_mask(**flags: bool) -> float:
    """Encode the named booleans of ``FLAG_BITS`` as one float (exact: fewer than 53 bits)."""
    return float(sum(1 << FLAG_BITS.index(name) for name, on in flags.items() if on))


def flag_names(mask: float) -> set[str]:
    """The names of the bits set in a :func:`flag_mask` value."""
    return {name for i, name in enumerate(FLAG_BITS) if int(mask) >> i & 1}


def extra_fingerprint(extra: Tensor | None) -> dict[str, float | Tensor]:
    """Rows, Σ entries and an order-weighted Σ of row sums of the extra keys (no full-size copy)."""
    if extra is None:
        return {"extra_rows": 0.0, "extra_sum": 0.0, "extra_wsum": 0.0}
    row_sums = extra.detach().sum(dim=1, dtype=torch.float32)
    weights = torch.linspace(1.0, 2.0, row_sums.numel(), device=row_sums.device)
    return {"extra_rows": float(extra.shape[0]), "extra_sum": row_sums.sum(),
            "extra_wsum": (row_sums * weights).sum()}


def exchange_meta(values: dict[str, float | Tensor], device: torch.device, group: object) -> Layout:
    """All-gather this rank's metadata (``len(META_FIELDS)`` float64), the call's one host sync.

    Values may be 0-dim device tensors: they are stacked on the device, so computing them costs
    no extra device→host transfer.
    """
    missing = set(META_FIELDS) - set(values)
    if missing:
        raise ValueError(f"metadata fields missing: {sorted(missing)}")
    world = dist.get_world_size(group)
    host = [0.0 if isinstance(values[f], Tensor) else float(values[f]) for f in META_FIELDS]
    mine = torch.tensor(host, dtype=torch.float64, device=device)  # one host→device copy
    for i, f in enumerate(META_FIELDS):
        if isinstance(values[f], Tensor):  # device-side copy, no sync
            mine[i] = values[f].reshape(()).to(torch.float64)
    out = torch.empty(world * mine.numel(), dtype=torch.float64, device=device)
    getattr(dist, _ALL_GATHER)(out, mine, group=group)
    return Layout(dist.get_rank(group), world, out.view(world, -1).cpu())


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    if x.shape[0] == rows:
        return x.contiguous()
    pad = x.new_zeros((rows - x.shape[0], *x.shape[1:]))
    return torch.cat([x, pad])


# Up to this many ranks the column gather is W async broadcasts, one per owner, so that the loss
# can start on each piece as it lands; above it, the launch latency of W collectives outweighs the
# gain and one all-gather is used (overlapped with the local block only).
PIPELINE_MAX_WORLD = 16


@dataclass
class PendingGather:
    """A gather in flight into ``buffer``, the compact (Σ sizes, …) tensor in rank order.

    ``wait_piece(src)`` waits for the rows of rank ``src`` only (pipelined gathers; otherwise it
    waits for everything); ``wait()`` for all of them and returns ``buffer``.
    """

    buffer: Tensor
    sizes: list[int]
    works: list[object | None]  # one per source rank (pipelined) or a single all-gather
    pipelined: bool = False
    recv: Tensor | None = None  # the padded receive buffer of an uneven all-gather, copied on wait
    source: Tensor | None = None  # this rank's sent piece: kept alive until the gather is done

    def piece(self, src: int) -> Tensor:
        off = sum(self.sizes[:src])
        return self.buffer[off : off + self.sizes[src]]

    def wait_piece(self, src: int) -> Tensor:
        if not self.pipelined:
            self.wait()
            return self.piece(src)
        work = self.works[src]
        if work is not None:
            work.wait()
            self.works[src] = None
        return self.piece(src)

    def wait(self) -> Tensor:
        for i, work in enumerate(self.works):
            if work is not None:
                work.wait()
                self.works[i] = None
        if self.recv is not None:  # uneven all-gather: drop the padding
            n_max = max(self.sizes)
            for r, n in enumerate(self.sizes):
                self.piece(r).copy_(self.recv[r * n_max : r * n_max + n])
            self.recv = None
        self.source = None
        return self.buffer


def start_gather(x: Tensor, sizes: list[int], group: object, *, pipelined: bool | None = None) -> PendingGather:
    """Launch an async gather of ``x`` (this rank's rows) from every rank of ``group``.

    Pipelined (default up to ``PIPELINE_MAX_WORLD`` ranks): one broadcast per owner straight into
    its slice of the compact buffer, so uneven sizes need no padding. Otherwise one all-gather of
    pieces padded to ``max(sizes)``, compacted on ``wait()``. Either way each rank sends and receives
    about (W−1)/W of the gathered bytes on a ring.
    """
    world, rank = len(sizes), dist.get_rank(group)
    x = x.detach()
    buffer = x.new_empty((sum(sizes), *x.shape[1:]))
    if pipelined is None:
        pipelined = world <= PIPELINE_MAX_WORLD
    if pipelined:
        pending = PendingGather(buffer, sizes, [], pipelined=True)
        pending.piece(rank).copy_(x)
        for src in range(world):  # every rank issues the same W broadcasts in the same order
            root = dist.get_global_rank(group, src)
            pending.works.append(dist.broadcast(pending.piece(src), src=root, group=group, async_op=True))
        return pending
    n_max = max(sizes)
    piece = _pad_rows(x, n_max)
    recv = buffer if len(set(sizes)) == 1 else piece.new_empty((world * n_max, *piece.shape[1:]))
    work = getattr(dist, _ALL_GATHER)(recv, piece, group=group, async_op=True)
    return PendingGather(buffer, sizes, [work], recv=None if recv is buffer else recv, source=piece)


class GroupComm:
    """The ``comm`` object of :func:`vlscale.loss.contrastive.fused_loss` over a process group.

    ``col_sizes`` are the local column counts of every rank (columns are laid out in rank order).
    """

    def __init__(self, group: object, col_sizes: list[int], rank: int) -> None:
        self.group = group
        self.col_sizes = col_sizes
        self.rank = rank

    def merge_col_lse(self, col_lse_partial: Tensor) -> Tensor:
        """Log-sum-exp all-reduce of O(N) floats: all-reduce MAX, then SUM of exp-shifted values."""
        c = col_lse_partial
        peak = c.clone()
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=self.group)
        # A column no rank saw (impossible with non-empty ranks) would have peak −inf: keep it finite.
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        total = torch.exp(c - peak)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group)
        return peak + torch.log(total)

    def reduce_dk(self, dk_all: Tensor) -> Tensor:
        """Reduce-scatter the partial column gradients; each rank receives its own rows."""
        n_max = max(self.col_sizes)
        if len(set(self.col_sizes)) == 1:
            padded = dk_all.contiguous()
        else:
            pieces = torch.split(dk_all, self.col_sizes)
            padded = torch.cat([_pad_rows(p, n_max) for p in pieces])
        out = padded.new_empty((n_max, *padded.shape[1:]))
        getattr(dist, _REDUCE_SCATTER)(out, padded, op=dist.ReduceOp.SUM, group=self.group)
        return out[: self.col_sizes[self.rank]]

    def sum_scalar(self, x: Tensor) -> Tensor:
        out = x.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out
