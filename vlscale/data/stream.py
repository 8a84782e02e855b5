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

import logging
import os
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from vlscale.data import fs
from vlscale.data.cache import BlockCache, ReadAhead
from vlscale.data.manifest import MANIFEST_NAME, ShardEntry, describe_shard, read_manifest
from vlscale.data.schema import SHARD_SUFFIX, check_schema

log = logging.getLogger(__name__)

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
    """Expand shard locations (folders, globs, files, URLs, or a list / comma-separated string of
    them) into shard files, each folder's ``*.arrow`` sorted by name. Manifests are not consulted."""
    out: list[str] = []
    for item in fs.split_locations(paths):
        found = [loc for loc, _ in fs.list_files(item, SHARD_SUFFIX)]
        if not found and _is_folder(item):
            raise ValueError(f"{item}: no *{SHARD_SUFFIX} shards in this folder")
        out += found or [item]
    return out


def _is_folder(location: str) -> bool:
    if fs.is_url(location):
        return not location.endswith(SHARD_SUFFIX) and not any(c in location for c in "*?[")
    return Path(location).is_dir()


def shard_refs(paths: str | Path | list[str | Path],
               options: fs.StorageOptions | None = None) -> list[tuple[str, ShardEntry | None, int | None]]:
    """``(location, manifest entry or None, size or None)`` of every shard the locations name.

    A folder (or URL prefix) with a ``manifest.json`` is read from it in one object read; a
    local manifest that disagrees with the folder's listing is ignored with a warning (stale).
    Otherwise the folder is listed and each shard's footer is read later."""
    refs: list[tuple[str, ShardEntry | None, int | None]] = []
    for item in fs.split_locations(paths):
        if fs.basename(item) == MANIFEST_NAME:
            entries = read_manifest(item, options)
            if entries is None:
                raise ValueError(f"{item}: manifest does not exist")
            refs += [(e.path, e, e.bytes) for e in entries]
            continue
        entries = read_manifest(fs.join(item, MANIFEST_NAME), options) if _is_folder(item) else None
        if entries is not None and not fs.is_url(item):
            listed = dict(fs.list_files(item, SHARD_SUFFIX))
            if listed != {e.path: e.bytes for e in entries}:
                log.warning("%s: manifest.json does not match the shards in the folder (stale); reading the "
                            "shards' footers instead — refresh it with `vlscale shards index %s`", item, item)
                entries = None
        if entries is not None:
            refs += [(e.path, e, e.bytes) for e in entries]
            continue
        found = fs.list_files(item, SHARD_SUFFIX)
        if not found and _is_folder(item):
            raise ValueError(f"{item}: no *{SHARD_SUFFIX} shards in this folder")
        refs += [(loc, None, size) for loc, size in found] or [(item, None, None)]
    if not refs:
        raise ValueError("no shard paths given")
    return refs


def open_shard(path: str) -> pa.ipc.RecordBatchFileReader:
    """Open one shard (memory-mapped when local), naming the file in any error (missing,
    truncated, not Arrow)."""
    try:
        if fs.is_url(path):
            filesystem, inner = fs.filesystem(path)
            return pa.ipc.open_file(fs.retry(lambda: filesystem.open_input_file(inner), path))
        return pa.ipc.open_file(pa.memory_map(path, "r"))
    except FileNotFoundError as e:
        raise ValueError(f"{path}: shard file does not exist") from e
    except fs.StorageError:
        raise
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: unreadable shard (truncated or not an Arrow IPC file): {e}") from e


class BlockReader:
    """A remote shard read record batch by record batch: one range request each, at the offsets
    of its manifest entry, checked against the entry's CRC-32, through the optional local cache."""

    def __init__(self, location: str, entry: ShardEntry, options: fs.StorageOptions) -> None:
        self.location, self.entry, self.options = location, entry, options
        self.file = fs.RangeFile(location, options)
        self.cache = BlockCache.shared(options.cache_dir, options.cache_bytes) if options.cache_dir else None

    @property
    def num_record_batches(self) -> int:
        return len(self.entry.batches)

    def get_batch(self, i: int) -> pa.RecordBatch:
        offset, length, _, crc = self.entry.batches[i]
        data = self.cache.get(self.location, offset, length, crc) if self.cache else None
        if data is None:
            data = self.file.read_at(offset, length)
            if crc is not None and zlib.crc32(data) != crc:  # damaged in flight: read it once more
                fs.IO_STATS.add(io_retries=1)
                data = self.file.read_at(offset, length)
                if zlib.crc32(data) != crc:
                    raise ValueError(f"{self.location}: record batch {i} does not match its checksum: the object "
                                     "changed after manifest.json was written (rerun `vlscale shards index`) "
                                     "or is damaged (`vlscale shards verify`)")
            if self.cache:
                self.cache.put(self.location, offset, length, crc, data)
        return pa.ipc.read_record_batch(pa.py_buffer(data), self.entry.schema)


class ShardIndex:
    """Every readable shard's record batches, with per-source row counts.

    Built from ``manifest.json`` when the folder has one (no shard is opened), else from each
    shard's footer. ``on_error="raise"`` fails on an unreadable shard or a missing column with a
    ``ValueError`` naming the file; ``"skip"`` leaves the shard out and records it in ``skipped``.
    ``storage`` sets retries, read-ahead and the local cache for remote shards.
    """

    def __init__(self, paths: str | Path | list[str | Path], *, on_error: str = "raise",
                 storage: fs.StorageOptions | None = None) -> None:
        if on_error not in {"raise", "skip"}:
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.storage = storage or fs.StorageOptions()
        self.paths: list[str] = []
        self.entries: list[ShardEntry] = []
        self.units: list[Unit] = []
        self.skipped: dict[str, str] = {}
        self.has_concepts: list[bool] = []
        for path, entry, size in shard_refs(paths, self.storage):
            try:
                entry = entry or describe_shard(path, size, options=self.storage)
            except ValueError as e:
                if on_error == "raise":
                    raise
                self.skipped[path] = str(e)
                continue
            shard = len(self.paths)
            self.paths.append(path)
            self.entries.append(entry)
            self.has_concepts.append(entry.concepts)
            self.units += [Unit(shard, i, n, entry.source_of(i)) for i, (_, _, n, _) in enumerate(entry.batches)
                           if n > 0]
        if not self.units:
            raise ValueError(f"no readable rows in {len(self.paths)} shard(s); skipped: {self.skipped}")

    def open(self, shard: int) -> pa.ipc.RecordBatchFileReader | BlockReader:
        """A reader of shard ``shard`` in this process: a memory map locally, range reads remotely."""
        path = self.paths[shard]
        if fs.is_url(path):
            return BlockReader(path, self.entries[shard], self.storage)
        return open_shard(path)

    def is_remote(self, shard: int) -> bool:
        return fs.is_url(self.paths[shard])

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
        self._readers: dict[int, pa.ipc.RecordBatchFileReader | BlockReader] = {}
        self._lock = threading.Lock()  # read-ahead threads share the open readers
        self._cached: tuple[int, _Window, np.ndarray] | None = None
        self._ahead: ReadAhead | None = None
        opts = index.storage
        if opts.readahead > 0 and any(index.is_remote(index.units[s.unit].shard) for s in spans):
            # remote record batches are fetched in span order, `readahead` of them in flight
            self._ahead = ReadAhead(self._fetch, range(len(spans)), depth=opts.readahead, threads=opts.io_threads)

    def _reader(self, shard: int) -> pa.ipc.RecordBatchFileReader | BlockReader:
        with self._lock:
            if shard not in self._readers:
                if len(self._readers) >= 8:  # bound open memory maps / connections; order is random anyway
                    self._readers.pop(next(iter(self._readers)))
                self._readers[shard] = self.index.open(shard)
            return self._readers[shard]

    def _fetch(self, i: int) -> pa.RecordBatch:
        unit = self.index.units[self.spans[i].unit]
        return self._reader(unit.shard).get_batch(unit.batch)

    def _read_span(self, i: int, lo: int, hi: int) -> _Segment | None:
        span = self.spans[i]
        unit = self.index.units[span.unit]
        path = self.index.paths[unit.shard]
        try:
            batch = self._ahead.get(i) if self._ahead is not None else self._fetch(i)
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
            segments.append((self._read_span(i, a, b), b - a))
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
