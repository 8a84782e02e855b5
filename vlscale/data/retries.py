"""Remote storage errors, I/O counters and retries, for :mod:`vlscale.data.fs` and the readers above it.

The SDKs' own retries are switched off so that every retry is ours: :func:`retry` retries
transient failures (HTTP 5xx, throttling, timeouts, resets, dropped connections) with exponential
backoff and full jitter and counts them (``IO_STATS["io_retries"]``); a missing object (404) or a
refused one (403) fails at once with a :class:`StorageError` naming the URL (:func:`describe`).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import pyarrow as pa

T = TypeVar("T")


@dataclass(frozen=True)
class StorageOptions:
    """How remote shards are read: retries, read-ahead, local cache (``data.*`` config fields)."""

    retries: int = 8
    """Attempts after the first on a transient error (5xx, throttling, timeout, reset)."""
    backoff_s: float = 0.25
    """First backoff; attempt ``n`` sleeps a uniform random time in ``[0, min(backoff_max_s, backoff_s·2ⁿ)]``."""
    backoff_max_s: float = 20.0
    """Cap of one backoff sleep."""
    readahead: int = 8
    """Record batches read ahead per stream, in background threads (remote shards only)."""
    io_threads: int = 4
    """Background reader threads per process (remote shards only)."""
    cache_dir: str = ""
    """Local cache of remote record batches ('' = none): a second epoch reads locally."""
    cache_bytes: int = 64 << 30
    """Size bound of ``cache_dir``; least recently used record batches are evicted past it."""
    request_timeout_s: float = 60.0
    """Socket timeout of one request (a stalled connection becomes a retried error)."""


class IOCounters:
    """Thread-safe per-process counters of remote I/O (requests, bytes, retries, cache hits)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter = Counter()

    def add(self, **counts: int) -> None:
        with self._lock:
            self._counts.update(counts)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def since(self, before: dict[str, int]) -> dict[str, int]:
        """Counts added after ``before`` (a ``snapshot()``), without zero entries."""
        now = self.snapshot()
        return {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0)}


IO_STATS = IOCounters()


class StorageError(ValueError):
    """A remote read or write failed for good (not found, access denied, or retries exhausted)."""


_TRANSIENT = ("500", "502", "503", "504", "slowdown", "slow down", "slow_down", "throttl", "unavailable",
              "network_connection", "internal_failure", "request_timeout", "requesttimeout", "timeout",
              "timed out", "reset", "broken pipe", "connection", "curl", "empty reply", "unexpected eof",
              "temporarily", "internalerror", "serviceunavailable", "network", "transfer closed", "recv failure",
              "send failure", "premature", "incomplete")
_DENIED = ("403", "accessdenied", "access denied", "access_denied", "forbidden", "invalidaccesskeyid",
           "signaturedoesnotmatch", "invalid_access_key_id", "signature_does_not_match")
_MISSING = ("404", "nosuchkey", "no_such_key", "nosuchbucket", "no_such_bucket", "not found", "does not exist")
_PERMANENT = _DENIED + _MISSING


def is_transient(exc: BaseException) -> bool:
    """A failure worth retrying: a server or network hiccup, not a missing or forbidden object."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    text = str(exc).lower()
    if any(m in text for m in _PERMANENT):
        return False
    return isinstance(exc, (OSError, pa.ArrowException)) and any(m in text for m in _TRANSIENT)


def describe(what: str, exc: BaseException) -> str:
    """One line naming the URL and the fix for a failure that will not be retried."""
    text = str(exc)
    low = text.lower()
    if isinstance(exc, FileNotFoundError) or any(m in low for m in _MISSING):
        return f"{what}: does not exist (404)"
    if isinstance(exc, PermissionError) or any(m in low for m in _DENIED):
        return (f"{what}: access denied (403): check the credentials the standard chain finds "
                "(AWS_PROFILE / AWS_ACCESS_KEY_ID / instance role; GOOGLE_APPLICATION_CREDENTIALS) and the "
                f"bucket policy ({text.splitlines()[0][:200]})")
    return f"{what}: {text.splitlines()[0][:300] if text else type(exc).__name__}"


def retry(fn: Callable[[], T], what: str, options: StorageOptions | None = None,
          counters: IOCounters = IO_STATS) -> T:
    """``fn()`` with exponential backoff and full jitter on transient errors (each retry counted).

    Raises ``StorageError`` naming ``what`` (the URL) when the error is permanent or the retries
    run out; the original exception is chained."""
    opts = options or StorageOptions()
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise StorageError(describe(what, exc)) from exc
            if attempt >= opts.retries:
                counters.add(io_failures=1)
                raise StorageError(f"{describe(what, exc)} (gave up after {attempt + 1} attempts)") from exc
            counters.add(io_retries=1)
            time.sleep(random.uniform(0.0, min(opts.backoff_max_s, opts.backoff_s * 2 ** attempt)))
            attempt += 1
