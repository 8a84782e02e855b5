"""``ShardDataset``: the IterableDataset that turns shards into collated ``Batch`` objects.

It runs inside each DataLoader worker and yields whole batches (the DataLoader is used with
``batch_size=None``): batches must be formed where the per-source streams live, since a
debiased batch comes from a single source. Each batch carries its logical worker id, the
worker's stream positions after it and its skip counts, which is all ``ShardLoader`` needs to
checkpoint and resume exactly.

Logical vs DataLoader workers: the DataLoader hands out work round-robin starting at its worker
0. To resume in the middle of a round, ``ShardLoader`` rotates the mapping (DataLoader worker i
plays logical worker ``(offset + i) % W``), so the interleaving of batches continues as it would
have without the interruption.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from vlscale.data.collate import Batch, EndOfStream, collate
from vlscale.data.fs import IO_STATS
from vlscale.data.sampling import MIXED, BatchScheduler
from vlscale.data.stream import RowStream, ShardIndex, epoch_order, global_worker, worker_range, worker_spans
from vlscale.data.transforms import ImageTransform

_AUG_SALT = 0xA06


class ShardDataset(IterableDataset):
    """Batches of (image, caption) pairs from a ``ShardIndex`` for one rank.

    Exactly-once: with ``drop_last=False`` every row of every readable shard is emitted (or
    skipped and counted) exactly once per epoch over all (rank, worker). With ``drop_last=True``
    every worker owns the same number of rows per stream and emits only full batches.
    """

    def __init__(self, index: ShardIndex, *, batch_size: int, transform: ImageTransform,
                 tokenizer: Callable | None = None, max_length: int = 77, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1024, drop_last: bool = False,
                 debiased: bool = False, on_error: str = "raise", with_concepts: bool = False) -> None:
        super().__init__()
        if batch_size <= 0 or max_length <= 0 or world_size <= 0:
            raise ValueError(f"batch_size ({batch_size}), max_length ({max_length}) and world_size "
                             f"({world_size}) must be positive")
        self.index, self.transform, self.tokenizer = index, transform, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.shuffle_buffer, self.drop_last = shuffle, shuffle_buffer, drop_last
        self.debiased, self.on_error, self.with_concepts = debiased, on_error, with_concepts
        names = list(index.source_counts()) if debiased else [MIXED]
        self.stream_units = {n: index.units_of(None if n == MIXED else n) for n in names}
        global_worker(rank, world_size, 0, 1)  # validates rank
        self.configure()

    def configure(self, *, epoch: int = 0, worker_states: dict[int, dict] | None = None,
                  worker_offset: int = 0, num_workers: int = 1) -> None:
        """Set where the next iteration starts (called by ``ShardLoader`` before each pass)."""
        self.epoch, self.worker_states = epoch, dict(worker_states or {})
        self.worker_offset, self.num_workers = worker_offset, max(1, num_workers)

    # -- partition -----------------------------------------------------------------------------
    def _streams(self, g: int, num_global: int) -> dict[str, RowStream]:
        streams = {}
        for s, (name, units) in enumerate(sorted(self.stream_units.items())):
            order = epoch_order(units, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle, stream=s)
            total = sum(self.index.units[u].rows for u in units)
            quota = total // num_global if self.drop_last else None
            lo, hi = worker_range(total, g, num_global, quota)
            streams[name] = RowStream(self.index, worker_spans(self.index.units, order, lo, hi),
                                      buffer=self.shuffle_buffer, seed=self.seed, epoch=self.epoch,
                                      stream_id=(s, g), shuffle=self.shuffle, on_error=self.on_error)
        return streams

    def batches_per_epoch(self, num_workers: int) -> int:
        """Batches this rank yields in one epoch if no sample is skipped (an upper bound otherwise)."""
        total, num_workers = 0, max(1, num_workers)
        for w in range(num_workers):
            g, num_global = global_worker(self.rank, self.world_size, w, num_workers)
            for units in self.stream_units.values():
                rows = sum(self.index.units[u].rows for u in units)
                lo, hi = worker_range(rows, g, num_global, rows // num_global if self.drop_last else None)
                n = hi - lo
                total += n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return total

    # -- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch | EndOfStream]:
        info = get_worker_info()
        num_workers = 1 if info is None else info.num_workers
        if num_workers != self.num_workers:
            raise RuntimeError(f"ShardDataset configured for {self.num_workers} workers, DataLoader has {num_workers}")
        worker = 0 if info is None else (self.worker_offset + info.id) % num_workers
        return self.iter_worker(worker)

    def iter_worker(self, worker: int) -> Iterator[Batch | EndOfStream]:
        """The batches of logical worker ``worker`` (of ``num_workers``) in this epoch, from its
        saved position on. ``__iter__`` calls it in each DataLoader worker; tests call it directly."""
        g, num_global = global_worker(self.rank, self.world_size, worker, self.num_workers)
        streams = self._streams(g, num_global)
        sched = BatchScheduler({n: st.num_rows for n, st in streams.items()}, batch_size=self.batch_size,
                               drop_last=self.drop_last, seed_key=(self.seed, self.epoch, g))
        state = self.worker_states.get(worker, {})
        k, positions = int(state.get("k", 0)), dict(state.get("pos", {}))
        stats: Counter = Counter()
        io_start = IO_STATS.snapshot()  # remote I/O of this pass (requests, bytes, retries) joins the stats
        while (name := sched.choose(k, positions)) is not None:
            rng = batch_rng(self.seed, self.epoch, g, k)
            images, rows, positions[name] = self._fill(streams[name], positions.get(name, 0), rng, stats)
            k += 1
            if not rows or (self.drop_last and len(rows) < self.batch_size):
                continue  # the stream ran dry (skipped samples); its remainder is dropped
            batch = collate(images, rows, tokenizer=self.tokenizer, max_length=self.max_length,
                            mean=self.transform.mean, std=self.transform.std, with_concepts=self.with_concepts)
            stats["samples"] += len(rows)
            batch.worker = worker
            batch.state = {"epoch": self.epoch, "k": k, "pos": dict(positions)}
            batch.stats = {**stats, **IO_STATS.since(io_start)}
            yield batch
        yield EndOfStream(worker=worker, state={"epoch": self.epoch, "k": k, "pos": dict(positions)},
                          stats={**stats, **IO_STATS.since(io_start)})

    def _fill(self, stream: RowStream, position: int, rng: random.Random,
              stats: Counter) -> tuple[list[np.ndarray], list[dict], int]:
        """Read rows from ``position`` until ``batch_size`` good samples (or the stream ends)."""
        images: list[np.ndarray] = []
        rows: list[dict] = []
        end = position
        for end, row in stream.rows(position):  # noqa: B007 - `end` after the loop is the new position
            if row is None:
                stats["unreadable_batch"] += 1
                continue
            if not (row.get("caption") or "").strip():
                stats["empty_caption"] += 1
                continue
            try:
                images.append(self.transform.decode_transform(row["image"], rng))
            except Exception:  # any decoder failure means corrupt bytes: skip and count
                stats["unreadable_image"] += 1
                continue
            rows.append(row)
            if len(rows) == self.batch_size:
                break
        return images, rows, end


def batch_rng(seed: int, epoch: int, g: int, k: int) -> random.Random:
    """The augmentation RNG of batch ``k`` of global worker ``g``: a pure function of its position."""
    state = np.random.SeedSequence([seed, epoch, g, k, _AUG_SALT]).generate_state(2, np.uint64)
    return random.Random(int(state[0]) << 64 | int(state[1]))


def seed_worker_threads(_: int) -> None:
    """DataLoader ``worker_init_fn``: one intra-op thread per worker (workers are the parallelism)."""
    torch.set_num_threads(1)
