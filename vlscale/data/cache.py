"""Two things that keep the GPU from waiting on object storage: a bounded read-ahead of record
batches in background threads, and an optional local LRU cache of the record batches read.

``ReadAhead`` is given the order in which a stream will need its record batches (known in
advance: the epoch's partition fixes it) and keeps up to ``depth`` of the next ones in flight on
a small per-process thread pool; memory is bounded by ``depth`` record batches per stream.

``BlockCache`` stores each remote record batch's bytes as one file under ``cache_dir``, named by
a hash of (URL, offset, length, checksum), written atomically (temp + rename) so several
DataLoader workers and ranks on one machine can share it. A hit refreshes the file's mtime;
when the folder grows past ``max_bytes`` the least recently used files are deleted down to 90 %
of the bound. Every entry is checked against the record batch's CRC-32 on the way out, so a
damaged cache file is dropped and re-read, never trained on.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import zlib
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from vlscale.data.fs import IO_STATS, write_bytes

_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    """One reader pool per process and size (created after fork, in the process that uses it)."""
    key = (os.getpid(), threads)
    with _POOL_LOCK:
        if key not in _POOLS:
            _POOLS[key] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vlscale-io")
        return _POOLS[key]


class ReadAhead:
    """Fetch ``keys[i]`` with ``fetch`` while keeping ``keys[i+1 : i+1+depth]`` in flight.

    ``get(i)`` returns ``fetch(keys[i])`` (raising what it raised). Requests may skip ahead (a
    resumed stream starts in the middle) but not go back more than what is still held."""

    def __init__(self, fetch: Callable[[Hashable], object], keys: Sequence[Hashable], *, depth: int,
                 threads: int) -> None:
        self.fetch, self.keys = fetch, list(keys)
        self.depth, self.threads = max(0, depth), max(1, threads)
        self._futures: dict[int, Future] = {}
        self._last: tuple[int, Future] | None = None  # a span cut by a window boundary is asked twice

    def get(self, i: int) -> object:
        if self._last is not None and self._last[0] == i:
            return self._last[1].result()
        for stale in [j for j in self._futures if j < i]:  # a skipped range: drop what it holds
            self._futures.pop(stale).cancel()
        pool = _pool(self.threads)
        for j in range(i, min(len(self.keys), i + 1 + self.depth)):
            if j not in self._futures:
                self._futures[j] = pool.submit(self.fetch, self.keys[j])
        self._last = (i, self._futures.pop(i))
        return self._last[1].result()

    def close(self) -> None:
        for f in self._futures.values():
            f.cancel()
        self._futures.clear()
        self._last = None


class BlockCache:
    """A size-bounded, LRU, multi-process-safe local cache of remote byte ranges.

    Use :meth:`shared` (one instance per process and folder): the bytes added since the last
    eviction pass are counted per instance, and a pass runs every 5 % of the bound."""

    _instances: dict[tuple[int, str, int], BlockCache] = {}

    @classmethod
    def shared(cls, root: str | os.PathLike, max_bytes: int) -> BlockCache:
        key = (os.getpid(), str(root), int(max_bytes))
        with _POOL_LOCK:
            if key not in cls._instances:
                cls._instances[key] = cls(root, max_bytes)
            return cls._instances[key]

    def __init__(self, root: str | os.PathLike, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"cache size bound must be positive, got {max_bytes}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self._added = 0
        self._lock = threading.Lock()
        self.evict()  # an earlier run may have left more than this bound

    def _path(self, url: str, offset: int, length: int, crc: int | None) -> Path:
        digest = hashlib.sha1(f"{url}\0{offset}\0{length}\0{crc}".encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.blk"

    def get(self, url: str, offset: int, length: int, crc: int | None) -> bytes | None:
        path = self._path(url, offset, length, crc)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if len(data) != length or (crc is not None and zlib.crc32(data) != crc):
            path.unlink(missing_ok=True)  # damaged or from an older file: read it again
            IO_STATS.add(io_cache_bad=1)
            return None
        with contextlib.suppress(OSError):  # evicted meanwhile by another process
            os.utime(path)  # mtime = last use: what the LRU eviction sorts by
        IO_STATS.add(io_cache_hits=1)
        return data

    def put(self, url: str, offset: int, length: int, crc: int | None, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        path = self._path(url, offset, length, crc)
        try:
            write_bytes(str(path), data)  # atomic; the temp file is removed on failure
        except OSError:
            return  # a full or read-only disk degrades to no cache
        with self._lock:
            self._added += len(data)
            due = self._added >= self.max_bytes // 20
            if due:
                self._added = 0
        if due:
            self.evict()

    def size(self) -> int:
        return sum(f.stat().st_size for f in self.root.glob("*/*.blk"))

    def evict(self) -> None:
        """Delete least-recently-used entries until the folder is at most 90 % of the bound."""
        files = []
        for f in self.root.glob("*/*.blk"):
            try:
                st = f.stat()
            except OSError:
                continue  # another process evicted it
            files.append((st.st_mtime, st.st_size, f))
        total = sum(s for _, s, _ in files)
        if total <= self.max_bytes:
            return
        for _, size, f in sorted(files, key=lambda x: (x[0], str(x[2]))):
            if total <= self.max_bytes * 9 // 10:
                break
            f.unlink(missing_ok=True)
            total -= size
            IO_STATS.add(io_cache_evicted=1)
