"""Shard index, the per-epoch partition of record batches over (rank, worker), and row streams.

The unit of work is a record batch ("unit"). Each epoch:

1. the units of a stream are put in a seeded order (the same on every rank and worker);
2. their rows, concatenated in that order, form one virtual sequence of N rows, and global
   worker ``g`` of ``G = world_size * num_workers`` takes rows ``[g*N//G, (g+1)*N//G)`` —
   slices of record batches, so the split is disjoint, complete and balanced to one row for
   any number of shards and record batches;
3. the worker reads its rows in windows of ``shuffle_buffer`` rows (an in-memory buffer) and
   emits each window in a seeded random permutation.

A worker's position is one integer (rows emitted so far), so resuming is O(1): the window and
the offset inside it follow from the position, with no replay of earlier windows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from vlscale.data.schema import SHARD_SUFFIX, check_schema, read_metadata

_SHUFFLE_SALT = 0x5EED


@dataclass(frozen=True)
class Unit:
    """One record batch: shard file index, batch index in that file, rows, and its source."""

    shard: int
    batch: int
    rows: int
    source: str | None  # None when the record batch mixes sources


@dataclass(frozen=True)
class Span:
    """Rows ``[start, stop)`` of unit ``unit``."""

    unit: int
    start: int
    stop: int


def list_shards(paths: str | Path | list[str | Path]) -> list[str]:
    """Expand a shard folder (all ``*.arrow`` in it, sorted) or a list of files/folders."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    out: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(str(f) for f in p.glob(f"*{SHARD_SUFFIX}") if not f.name.startswith("."))
            if not found:
                raise ValueError(f"{p}: no *{SHARD_SUFFIX} shards in this folder")
            out += found
        else:
            out.append(str(p))
    if not out:
        raise ValueError("no shard paths given")
    return out


def open_shard(path: str) -> pa.ipc.RecordBatchFileReader:
    """Memory-map and open one shard, naming the file in any error (missing, truncated, not Arrow)."""
    try:
        return pa.ipc.open_file(pa.memory_map(path, "r"))
    except FileNotFoundError as e:
        raise ValueError(f"{path}: shard file does not exist") from e
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: unreadable shard (truncated or not an Arrow IPC file): {e}") from e


def _unit_sources(path: str, reader: pa.ipc.RecordBatchFileReader, meta: dict) -> list[tuple[int, str | None]]:
    counts = meta.get("counts", {})
    if len(counts) == 1:  # written by ShardWriter: one source per file, no need to scan
        (only,) = counts
        return [(reader.get_batch(i).num_rows, only) for i in range(reader.num_record_batches)]
    out = []
    for i in range(reader.num_record_batches):
        batch = reader.get_batch(i)
        values = set(batch.column("source").unique().to_pylist())
        out.append((batch.num_rows, values.pop() if len(values) == 1 else None))
    return out


class ShardIndex:
    """Every readable shard's record batches, with per-source row counts.

    ``on_error="raise"`` fails on an unreadable shard or a missing column with a ``ValueError``
    naming the file; ``"skip"`` leaves the shard out and records it in ``skipped``.
    """

    def __init__(self, paths: str | Path | list[str | Path], *, on_error: str = "raise") -> None:
        if on_error not in {"raise", "skip"}:
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.paths: list[str] = []
        self.units: list[Unit] = []
        self.skipped: dict[str, str] = {}
        self.has_concepts: list[bool] = []
        for path in list_shards(paths):
            try:
                reader = open_shard(path)
                check_schema(reader.schema, path)
                rows = _unit_sources(path, reader, read_metadata(reader.schema))
            except ValueError as e:
                if on_error == "raise":
                    raise
                self.skipped[path] = str(e)
                continue
            shard = len(self.paths)
            self.paths.append(path)
            self.has_concepts.append("concepts" in reader.schema.names)
            self.units += [Unit(shard, i, n, src) for i, (n, src) in enumerate(rows) if n > 0]
        if not self.units:
            raise ValueError(f"no readable rows in {len(self.paths)} shard(s); skipped: {self.skipped}")

    @property
    def num_rows(self) -> int:
        return sum(u.rows for u in self.units)

    def source_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for u in self.units:
            out[str(u.source)] = out.get(str(u.source), 0) + u.rows
        return dict(sorted(out.items()))

    def units_of(self, source: str | None) -> list[int]:
        """Unit ids of one source (``None``: all units). Mixed record batches cannot be split by source."""
        if source is None:
            return list(range(len(self.units)))
        mixed = [self.paths[u.shard] for u in self.units if u.source is None]
        if mixed:
            raise ValueError(f"{mixed[0]}: record batches mix several sources; per-source streams (debiased "
                             "sampling) need one source per record batch — rebuild with `vlscale shards build`")
        return [i for i, u in enumerate(self.units) if u.source == source]


def epoch_order(unit_ids: list[int], *, seed: int, epoch: int, shuffle: bool, stream: int = 0) -> list[int]:
    """The units of one stream in this epoch's order (identical on every rank and worker)."""
    if not shuffle:
        return list(unit_ids)
    rng = np.random.default_rng([seed, epoch, _SHUFFLE_SALT, stream])
    return [unit_ids[i] for i in rng.permutation(len(unit_ids))]


def worker_range(total: int, g: int, num_global: int, quota: int | None = None) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of the virtual sequence owned by global worker ``g``; ``quota`` caps the
    count (``drop_last`` gives every worker the same ``total // num_global`` rows)."""
    if not 0 <= g < num_global:
        raise ValueError(f"global worker {g} out of range for {num_global} workers")
    lo, hi = g * total // num_global, (g + 1) * total // num_global
    return lo, hi if quota is None else min(hi, lo + quota)


def worker_spans(units: list[Unit], order: list[int], lo: int, hi: int) -> list[Span]:
    """The slices of record batches covering rows ``[lo, hi)`` of the concatenation of ``order``."""
    spans, offset = [], 0
    for uid in order:
        n = units[uid].rows
        start, stop = max(lo - offset, 0), min(hi - offset, n)
        if start < stop:
            spans.append(Span(uid, start, stop))
        offset += n
        if offset >= hi:
            break
    return spans


class RowStream:
    """The rows of one worker's spans, emitted window by window in a seeded permutation.

    ``rows(position)`` yields ``(position_after, row_dict)`` starting at any position, which
    is what makes resuming exact and O(1). A record batch that fails to read raises a
    ``ValueError`` naming the file, or (``on_error="skip"``) its rows come out as ``None`` so
    the caller can count them.
    """

    def __init__(self, index: ShardIndex, spans: list[Span], *, buffer: int, seed: int, epoch: int,
                 stream_id: tuple[int, ...], shuffle: bool, on_error: str = "raise") -> None:
        self.index, self.spans = index, spans
        self.buffer = max(1, int(buffer))
        self.shuffle, self.on_error = shuffle, on_error
        self.seed_key = [seed, epoch, _SHUFFLE_SALT + 1, *stream_id]
        self.num_rows = sum(s.stop - s.start for s in spans)
        self._starts = np.cumsum([0] + [s.stop - s.start for s in spans])
        self._readers: dict[int, pa.ipc.RecordBatchFileReader] = {}
        self._cached: tuple[int, _Window, np.ndarray] | None = None

    def _reader(self, shard: int) -> pa.ipc.RecordBatchFileReader:
        if shard not in self._readers:
            if len(self._readers) >= 8:  # bound open memory maps; order is random anyway
                self._readers.pop(next(iter(self._readers)))
            self._readers[shard] = open_shard(self.index.paths[shard])
        return self._readers[shard]

    def _read_span(self, span: Span, lo: int, hi: int) -> _Segment | None:
        unit = self.index.units[span.unit]
        path = self.index.paths[unit.shard]
        try:
            batch = self._reader(unit.shard).get_batch(unit.batch)
            check_schema(batch.schema, path)
            cols = [c for c in ("key", "image", "caption", "source", "concepts") if c in batch.schema.names]
            return _Segment(batch.select(cols).slice(span.start + lo, hi - lo))  # zero-copy view of the mmap
        except (pa.ArrowInvalid, OSError, ValueError) as e:
            if self.on_error == "raise":
                raise ValueError(f"{path}: record batch {unit.batch} unreadable: {e}") from e
            return None

    def _window(self, w: int) -> tuple[_Window, np.ndarray]:
        """Window ``w`` (rows in storage order) and the permutation it is emitted in."""
        if self._cached is not None and self._cached[0] == w:
            return self._cached[1], self._cached[2]
        self._cached = None  # drop the previous window before mapping the next one
        lo, hi = w * self.buffer, min((w + 1) * self.buffer, self.num_rows)
        segments: list[tuple[_Segment | None, int]] = []
        first = int(np.searchsorted(self._starts, lo, side="right")) - 1
        for i in range(first, len(self.spans)):
            s_lo, s_hi = int(self._starts[i]), int(self._starts[i + 1])
            if s_lo >= hi:
                break
            a, b = max(lo, s_lo) - s_lo, min(hi, s_hi) - s_lo
            segments.append((self._read_span(self.spans[i], a, b), b - a))
        window = _Window(segments)
        if self.shuffle:
            perm = np.random.default_rng([*self.seed_key, w]).permutation(len(window))
        else:
            perm = np.arange(len(window))
        self._cached = (w, window, perm)
        return window, perm

    def rows(self, position: int = 0, stop: int | None = None) -> Iterator[tuple[int, dict | None]]:
        """Yield ``(position_after, row)`` for positions ``[position, stop)``; ``row`` is ``None``
        when its record batch could not be read (``on_error="skip"``)."""
        stop = self.num_rows if stop is None else min(stop, self.num_rows)
        while position < stop:
            w = position // self.buffer
            window, perm = self._window(w)
            for off in range(position - w * self.buffer, len(window)):
                if position >= stop:
                    return
                position += 1
                yield position, window.row(int(perm[off]))


class _Segment:
    """One record-batch slice of a window. Image bytes stay in the memory map (offsets + data
    buffer, sliced per row); the small text columns become Python lists on first use."""

    def __init__(self, batch: pa.RecordBatch) -> None:
        self.batch = batch
        self._cols: dict[str, list] | None = None
        images = batch.column("image")
        width = np.int64 if pa.types.is_large_binary(images.type) else np.int32
        offsets = np.frombuffer(images.buffers()[1], dtype=width)
        self._offsets = offsets[images.offset: images.offset + len(images) + 1]
        data = images.buffers()[2]
        self._data = memoryview(data) if data is not None else memoryview(b"")
        self._valid = images.is_valid().to_numpy(zero_copy_only=False) if images.null_count else None

    def row(self, off: int) -> dict:
        if self._cols is None:
            self._cols = {n: self.batch.column(n).to_pylist() for n in self.batch.schema.names if n != "image"}
        row = {name: col[off] for name, col in self._cols.items()}
        ok = self._valid is None or self._valid[off]
        row["image"] = bytes(self._data[int(self._offsets[off]): int(self._offsets[off + 1])]) if ok else b""
        return row


class _Window:
    """Rows of one shuffle window as zero-copy record-batch slices; a row's image becomes a
    Python object only when it is emitted, so a window costs mapped pages, not copied bytes."""

    def __init__(self, segments: list[tuple[_Segment | None, int]]) -> None:
        self.segments = [seg for seg, _ in segments]
        self.starts = np.cumsum([0] + [n for _, n in segments])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def row(self, j: int) -> dict | None:
        s = int(np.searchsorted(self.starts, j, side="right")) - 1
        seg = self.segments[s]
        return None if seg is None else seg.row(j - int(self.starts[s]))


def global_worker(rank: int, world_size: int, worker: int, num_workers: int) -> tuple[int, int]:
    """(g, G): the global index of (rank, worker) and the number of global workers."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    workers = max(1, num_workers)
    return rank * workers + worker, world_size * workers


def default_rank_world() -> tuple[int, int]:
    """Rank and world size from torch.distributed if initialised, else RANK/WORLD_SIZE, else (0, 1)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
