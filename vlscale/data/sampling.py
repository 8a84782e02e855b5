"""Debiased sampling (ZeroVL): which source every GLOBAL step draws from, and which rows each
(rank, worker) reads for it.

ZeroVL (arXiv 2112.09331, §3.3) builds every batch from one source dataset, so the contrastive
negatives of a step come from one domain; the source is drawn with probability proportional to
its size. The batch that matters is the global one (all ranks at one optimizer step: the loss
gathers every rank's embeddings), so the draw is made once per step, for all ranks.

The schedule of one epoch is a pure function of (seed, epoch, per-source row counts, world size,
batch size, drop_last), computed identically by every rank and worker:

* a step of source ``s`` takes ``batch_size`` rows of ``s`` on every rank (one global batch of
  ``world_size * batch_size`` rows); source ``s`` has ``N_s // (world_size * batch_size)`` full
  steps, plus, without ``drop_last``, one last short step holding its remaining rows;
* the order of the steps is a uniformly random interleaving of the sources' steps (a seeded
  permutation of the multiset of step labels). That is sampling global batches without
  replacement: given the steps already taken, step ``t`` comes from source ``s`` with probability
  (global batches ``s`` has left) / (global batches left), i.e. proportional to the rows each
  source has left across all ranks; its marginal is ``N_s / N``, and every row is used once.

Rows: each epoch a source's record batches are put in one seeded order (``epoch_order``); rank
``r`` owns the contiguous range ``worker_range(N_s, r, world_size)`` of that sequence. A rank's
``k``-th batch is global step ``k``, produced by logical DataLoader worker ``k % num_workers``
(the DataLoader visits workers round-robin), so within a rank's range worker ``w`` gets one
contiguous piece holding exactly the rows of its steps of ``s``. With ``parts`` per step
(``data.part_size``) the loader's unit is a part: a rank's item ``i`` is part ``i % parts`` of step
``i // parts``, made by worker ``i % num_workers``, and a worker's piece holds the rows of its
parts (a full step's part has ``batch_size / parts`` rows; a short step's rows are split evenly
over its parts). ``parts=1`` is the whole-step schedule above, item for item. With ``drop_last`` the rows of
a rank's range beyond its full steps (fewer than ``batch_size`` + the source's last partial
global batch) are spares, split over the workers: a worker that skipped a corrupt sample fills its
batch from the next rows, the spares last. Spare rows left at the end of the epoch are counted as
``dropped_tail``; they are never delivered silently or twice.

Mixed sampling (``debiased=False``) is one stream over all sources, partitioned over
(rank, worker) in ``stream.py``; this module is not involved.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from vlscale.data.stream import worker_range

_SCHEDULE_SALT = 0xB1A5
MIXED = "*"


class DebiasedSchedule:
    """The source of every global step of one epoch, and each (rank, worker)'s rows.

    ``sizes`` maps source name -> rows in the whole dataset (all ranks), e.g.
    ``ShardIndex.source_counts()``. ``len(schedule)`` is the number of global steps; every rank
    yields exactly that many batches per epoch.
    """

    def __init__(self, sizes: Mapping[str, int], *, world_size: int, batch_size: int, drop_last: bool,
                 seed: int, epoch: int, parts: int = 1) -> None:
        if world_size <= 0 or batch_size <= 0 or parts <= 0:
            raise ValueError(f"world_size ({world_size}), batch_size ({batch_size}) and parts ({parts}) must be positive")
        if batch_size % parts:
            raise ValueError(f"{parts} parts per step do not divide the batch of {batch_size} rows")
        self.parts = parts
        if any(int(n) < 0 for n in sizes.values()):
            raise ValueError(f"source sizes must be >= 0, got {dict(sizes)}")
        self.names = sorted(sizes)
        self.world_size, self.batch_size, self.drop_last = world_size, batch_size, drop_last
        self.sizes = np.array([int(sizes[n]) for n in self.names], dtype=np.int64)
        global_batch = world_size * batch_size
        self.full = self.sizes // global_batch  # full global batches per source
        self.tail = self.sizes - self.full * global_batch  # rows of the last, partial global batch
        steps = self.full + ((self.tail > 0) & (not drop_last))
        rng = np.random.default_rng([int(seed), int(epoch), _SCHEDULE_SALT])
        self.sources = rng.permutation(np.repeat(np.arange(len(self.names)), steps))
        # occurrence[t]: how many earlier steps drew the same source (its j-th global batch)
        self.occurrence = np.zeros(len(self.sources), dtype=np.int64)
        for s in range(len(self.names)):
            at = np.flatnonzero(self.sources == s)
            self.occurrence[at] = np.arange(len(at))

    def __len__(self) -> int:
        return len(self.sources)

    def source(self, t: int) -> str:
        """Name of the source of global step ``t``."""
        return self.names[int(self.sources[t])]

    def _tail_share(self, s: int, rank: int) -> int:
        lo, hi = worker_range(int(self.tail[s]), rank, self.world_size)
        return hi - lo

    def rows(self, t: int, rank: int) -> int:
        """Rows rank ``rank`` contributes to step ``t``: ``batch_size``, or its share of a
        source's last partial global batch (``drop_last=False``; it can be 0 on some ranks)."""
        s = int(self.sources[t])
        return self.batch_size if self.occurrence[t] < self.full[s] else self._tail_share(s, rank)

    def part_rows(self, i: int, rank: int) -> int:
        """Rows of rank ``rank``'s item ``i``: part ``i % parts`` of step ``i // parts``."""
        t, j = divmod(i, self.parts)
        lo, hi = worker_range(self.rows(t, rank), j, self.parts)
        return hi - lo

    def steps_left(self, t: int) -> dict[str, int]:
        """Global batches each source has left before step ``t`` (its draw is ∝ these)."""
        done = np.bincount(self.sources[:t], minlength=len(self.names))
        total = np.bincount(self.sources, minlength=len(self.names))
        return dict(zip(self.names, (total - done).tolist()))

    def worker_rows(self, rank: int, worker: int, num_workers: int) -> dict[str, list[tuple[int, int]]]:
        """Per source, the row ranges (of the source's epoch sequence) that logical worker
        ``worker`` of rank ``rank`` reads, in order: its steps' rows, then its share of spares."""
        if not 0 <= worker < num_workers:
            raise ValueError(f"worker {worker} out of range for {num_workers} workers")
        is_full = self.occurrence < self.full[self.sources]
        tail_share = np.array([self._tail_share(s, rank) for s in range(len(self.names))], dtype=np.int64)
        need = np.where(is_full, self.batch_size, tail_share[self.sources])
        # items: part j of step t is item t * parts + j, with worker_range(need, j, parts)'s rows
        i = np.arange(len(self.sources) * self.parts)
        t, j = i // self.parts, i % self.parts
        need = (j + 1) * need[t] // self.parts - j * need[t] // self.parts
        sources = self.sources[t]
        # rows of each (source, worker): worker w makes the items i with i % num_workers == w
        per = np.bincount(sources * num_workers + i % num_workers, weights=need,
                          minlength=len(self.names) * num_workers).astype(np.int64).reshape(-1, num_workers)
        out = {}
        for s, name in enumerate(self.names):
            lo, hi = worker_range(int(self.sizes[s]), rank, self.world_size)
            start = lo + int(per[s, :worker].sum())
            used = int(per[s].sum())
            spare_lo, spare_hi = worker_range(hi - lo - used, worker, num_workers)
            out[name] = [(start, start + int(per[s, worker])), (lo + used + spare_lo, lo + used + spare_hi)]
        return out
