"""``ShardDataset``: the IterableDataset that turns shards into collated ``Batch`` objects.

It runs inside each DataLoader worker and yields whole batches (the DataLoader is used with
``batch_size=None``): batches must be formed where the per-source streams live, since a
debiased batch comes from a single source. Each batch carries its logical worker id, the
worker's stream positions after it and its skip counts, which is all ``ShardLoader`` needs to
checkpoint and resume exactly.

Two ways to make batches:

* mixed (``debiased=False``): one stream over all sources, split into equal row ranges per
  global worker ``g = rank * num_workers + worker``; each worker emits batches from its range.
* debiased (ZeroVL): a global schedule (``sampling.DebiasedSchedule``) names the source of every
  global step, the same on every rank; a rank's ``k``-th batch is step ``k``, made by logical
  worker ``k % num_workers`` from its piece of that source's rows.

Logical vs DataLoader workers: the DataLoader hands out work round-robin starting at its worker
0. To resume in the middle of a round, ``ShardLoader`` rotates the mapping (DataLoader worker i
plays logical worker ``(offset + i) % W``), so the interleaving of batches continues as it would
have without the interruption.

Parts (``part_size``): the unit a worker makes may be a *part* of a step, ``part_size`` rows, and a
step ``batch_size / part_size`` consecutive parts of the rank (the trainer assembles them,
:mod:`vlscale.train.assemble`). Every worker then works on every step, and the host holds
``num_workers × prefetch_factor`` parts in flight instead of as many whole local batches. Mixed
mode simply batches each worker's range by ``part_size``; debiased mode makes item ``i`` of a rank
part ``i % n`` of global step ``i // n`` (``sampling.py``). ``part_size=0``: the unit is the step.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from vlscale.data.collate import PIXEL_DTYPES, Batch, CaptionMasker, EndOfStream, collate, sample_seeds
from vlscale.data.fs import IO_STATS
from vlscale.divisors import nearest_divisors
from vlscale.data.sampling import MIXED, DebiasedSchedule
from vlscale.data.stream import RowStream, ShardIndex, epoch_order, global_worker, worker_range, worker_spans
from vlscale.data.transforms import ImageTransform

log = logging.getLogger(__name__)
_AUG_SALT = 0xA06
_STEP_KEY = 0x57E9  # marks debiased batch positions (rank, step) apart from mixed ones (g, k)


class ShardDataset(IterableDataset):
    """Batches of (image, caption) pairs from a ``ShardIndex`` for one rank.

    Exactly-once: with ``drop_last=False`` every row of every readable shard is emitted (or
    skipped and counted) exactly once per epoch over all (rank, worker). With ``drop_last=True``
    rows that cannot make a full batch are counted as ``dropped_tail`` instead; in mixed mode
    every worker owns the same number of rows and emits only full batches, in debiased mode every
    rank emits one batch per global step (see ``sampling.py``).
    """

    def __init__(self, index: ShardIndex, *, batch_size: int, transform: ImageTransform,
                 tokenizer: Callable | None = None, max_length: int = 77, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1024, drop_last: bool = False,
                 debiased: bool = False, on_error: str = "raise", with_concepts: bool = False,
                 caption_masker: CaptionMasker | None = None, pixel_dtype: str = "float32",
                 part_size: int = 0) -> None:
        super().__init__()
        if pixel_dtype not in PIXEL_DTYPES:
            raise ValueError(f"pixel_dtype must be one of {PIXEL_DTYPES}, got {pixel_dtype!r}")
        if batch_size <= 0 or max_length <= 0 or world_size <= 0:
            raise ValueError(f"batch_size ({batch_size}), max_length ({max_length}) and world_size "
                             f"({world_size}) must be positive")
        if part_size < 0 or (part_size and batch_size % part_size):
            raise ValueError(f"part_size ({part_size}) must divide the per-rank batch of {batch_size} rows (0 = whole "
                             f"batches); fix: a divisor of {batch_size}, e.g. {nearest_divisors(batch_size, part_size)[0]}")
        self.part_size = part_size
        self.part = part_size or batch_size  # rows of one unit a worker makes
        self.parts_per_step = batch_size // self.part
        self.index, self.transform, self.tokenizer = index, transform, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.shuffle_buffer, self.drop_last = shuffle, shuffle_buffer, drop_last
        self.debiased, self.on_error, self.with_concepts = debiased, on_error, with_concepts
        self.caption_masker, self.pixel_dtype = caption_masker, pixel_dtype
        names = list(index.source_counts()) if debiased else [MIXED]
        self.stream_units = {n: index.units_of(None if n == MIXED else n) for n in names}
        global_worker(rank, world_size, 0, 1)  # validates rank
        if debiased and drop_last:
            small = {n: c for n, c in index.source_counts().items() if c < world_size * batch_size}
            if small:
                log.warning("debiased sampling: sources %s have fewer rows than one global batch (%d = %d ranks x "
                            "%d) and are never drawn; their rows are counted as dropped_tail", small,
                            world_size * batch_size, world_size, batch_size)
        self.configure()

    def configure(self, *, epoch: int = 0, worker_states: dict[int, dict] | None = None,
                  worker_offset: int = 0, num_workers: int = 1) -> None:
        """Set where the next iteration starts (called by ``ShardLoader`` before each pass)."""
        self.epoch, self.worker_states = epoch, dict(worker_states or {})
        self.worker_offset, self.num_workers = worker_offset, max(1, num_workers)

    def schedule(self, epoch: int | None = None) -> DebiasedSchedule:
        """The debiased schedule of ``epoch`` (default: the configured one); the same on every rank."""
        return DebiasedSchedule(self.index.source_counts(), world_size=self.world_size, batch_size=self.batch_size,
                                drop_last=self.drop_last, seed=self.seed, epoch=self.epoch if epoch is None else epoch,
                                parts=self.parts_per_step)

    # -- partition -----------------------------------------------------------------------------
    def _orders(self) -> dict[str, tuple[int, list[int], int]]:
        """Per stream: its id, this epoch's unit order (the same everywhere) and its row count."""
        out = {}
        for s, (name, units) in enumerate(sorted(self.stream_units.items())):
            order = epoch_order(units, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle, stream=s)
            out[name] = (s, order, sum(self.index.units[u].rows for u in units))
        return out

    def _stream(self, s: int, order: list[int], ranges: list[tuple[int, int]], g: int) -> RowStream:
        spans = [sp for lo, hi in ranges for sp in worker_spans(self.index.units, order, lo, hi)]
        return RowStream(self.index, spans, buffer=self.shuffle_buffer, seed=self.seed, epoch=self.epoch,
                         stream_id=(s, g), shuffle=self.shuffle, on_error=self.on_error)

    def steps_per_epoch(self, num_workers: int) -> int:
        """Steps this rank makes in one epoch: its units grouped ``parts_per_step`` at a time (a
        short last group is a step). Debiased: exactly the global steps."""
        if self.debiased:
            return len(self.schedule())
        return -(-self.batches_per_epoch(num_workers) // self.parts_per_step)

    def batches_per_epoch(self, num_workers: int) -> int:
        """Units (whole batches, or parts with ``part_size``) this rank yields in one epoch.
        Debiased: exactly the global steps × parts per step. Mixed: exact unless samples are
        skipped (then an upper bound)."""
        if self.debiased:
            return len(self.schedule()) * self.parts_per_step
        total, num_workers = 0, max(1, num_workers)
        for w in range(num_workers):
            g, num_global = global_worker(self.rank, self.world_size, w, num_workers)
            for units in self.stream_units.values():
                rows = sum(self.index.units[u].rows for u in units)
                lo, hi = worker_range(rows, g, num_global, rows // num_global if self.drop_last else None)
                n = hi - lo
                total += n // self.part if self.drop_last else -(-n // self.part)
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
        state = self.worker_states.get(worker, {})
        k, positions = int(state.get("k", 0)), dict(state.get("pos", {}))
        done = bool(state.get("done", False))  # the epoch's dropped rows were already counted
        stats: Counter = Counter()
        io_start = IO_STATS.snapshot()  # remote I/O of this pass (requests, bytes, retries) joins the stats
        g, num_global = global_worker(self.rank, self.world_size, worker, self.num_workers)
        orders = self._orders()
        if self.debiased:
            schedule = self.schedule()
            ranges = schedule.worker_rows(self.rank, worker, self.num_workers)
            streams = {n: self._stream(s, order, ranges[n], g) for n, (s, order, _) in orders.items()}
            n = self.parts_per_step  # item i: part i % n of global step i // n
            steps = ((schedule.source(i // n), schedule.part_rows(i, self.rank), (self.rank, i, _STEP_KEY))
                     for i in range(worker + k * self.num_workers, len(schedule) * n, self.num_workers))
            unassigned = 0
        else:
            (s, order, total), = orders.values()
            lo, hi = worker_range(total, g, num_global)
            quota_hi = min(hi, lo + total // num_global) if self.drop_last else hi
            streams = {MIXED: self._stream(s, order, [(lo, quota_hi)], g)}
            unassigned = hi - quota_hi  # rows beyond the equal per-worker quota (drop_last)
            steps = self._mixed_steps(streams[MIXED], positions, g, k)
        for name, need, position in steps:
            rng = batch_rng(self.seed, self.epoch, *position)
            images, rows, positions[name] = self._fill(streams[name], positions.get(name, 0), rng, stats, need)
            k += 1
            if not self.debiased and (not rows or (self.drop_last and len(rows) < need)):
                if rows:  # the stream ran dry (skipped samples): not a full batch
                    stats["dropped_tail"] += len(rows)
                continue
            if self.debiased and len(rows) < need:
                stats["short_batch"] += 1  # skipped samples ate this worker's spares: the step stays aligned
            batch = self._collate(images, rows, position)
            stats["samples"] += len(rows)
            batch.worker = worker
            batch.state = {"epoch": self.epoch, "k": k, "pos": dict(positions)}
            batch.stats = {**stats, **IO_STATS.since(io_start)}
            yield batch
        unread = unassigned + sum(st.num_rows - positions.get(n, 0) for n, st in streams.items())
        if unread and not done:  # rows nobody read this epoch (drop_last tails, unused spares), counted once
            stats["dropped_tail"] += unread
        yield EndOfStream(worker=worker, state={"epoch": self.epoch, "k": k, "pos": dict(positions), "done": True},
                          stats={**stats, **IO_STATS.since(io_start)})

    def _mixed_steps(self, stream: RowStream, positions: dict[str, int], g: int,
                     k: int) -> Iterator[tuple[str, int, tuple[int, ...]]]:
        """Mixed mode: (stream, rows wanted, batch position) while the stream has rows (a full
        batch's worth with drop_last)."""
        while stream.num_rows - positions.get(MIXED, 0) >= (self.part if self.drop_last else 1):
            yield MIXED, self.part, (g, k)
            k += 1

    def _collate(self, images: list[np.ndarray], rows: list[dict], position: tuple[int, ...]) -> Batch:
        batch = collate(images, rows, tokenizer=self.tokenizer, max_length=self.max_length, mean=self.transform.mean,
                        std=self.transform.std, with_concepts=self.with_concepts, image_size=self.transform.size,
                        pixel_dtype=self.pixel_dtype)
        if self.caption_masker is not None and batch.tokens is not None:
            seeds = sample_seeds(self.seed, self.epoch, position, batch.source, batch.keys)
            batch.tokens, batch.attention_mask = self.caption_masker(batch.tokens, batch.attention_mask, seeds)
        return batch

    def _fill(self, stream: RowStream, position: int, rng: random.Random, stats: Counter,
              need: int) -> tuple[list[np.ndarray], list[dict], int]:
        """Read rows from ``position`` until ``need`` good samples (or the stream ends)."""
        images: list[np.ndarray] = []
        rows: list[dict] = []
        end = position
        if need <= 0:
            return images, rows, end
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
            if len(rows) == need:
                break
        return images, rows, end


def batch_rng(seed: int, epoch: int, *position: int) -> random.Random:
    """The augmentation RNG of one unit, a pure function of its position: ``(g, k)`` (unit ``k``
    of global worker ``g``, mixed mode) or ``(rank, i, _STEP_KEY)`` (debiased: item ``i`` of the
    rank, which is global step ``i`` without parts)."""
    state = np.random.SeedSequence([seed, epoch, *position, _AUG_SALT]).generate_state(2, np.uint64)
    return random.Random(int(state[0]) << 64 | int(state[1]))


def seed_worker_threads(_: int) -> None:
    """DataLoader ``worker_init_fn``: one intra-op thread per worker (workers are the parallelism)."""
    torch.set_num_threads(1)
