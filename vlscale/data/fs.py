"""Where shards live: a location (path, glob, folder, list, or URL) → a pyarrow filesystem + paths.

Every byte the data pipeline reads or writes outside a local memory map goes through here:

* **Schemes.** Local paths (and ``file://``) use ``pyarrow.fs.LocalFileSystem``; ``s3://`` and
  ``gs://`` the native ``pyarrow.fs.S3FileSystem`` / ``GcsFileSystem`` (range reads, multipart
  uploads); any other scheme fsspec knows (``hf://``, ``https://``, ``memory://`` …) goes through
  ``pyarrow.fs.PyFileSystem(FSSpecHandler(...))``.
* **Credentials** come only from each SDK's standard chain (``AWS_ACCESS_KEY_ID`` / ``AWS_PROFILE``
  / instance metadata; ``GOOGLE_APPLICATION_CREDENTIALS``; ``HF_TOKEN``). A URL carrying
  ``user:secret@`` is refused, so no secret reaches a config, a log line or a checkpoint. The S3
  endpoint comes from ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (MinIO, R2, a test server).
* **Retries.** The SDKs' own retries are switched off so that every retry is ours
  (:mod:`vlscale.data.retries`): transient failures are retried with backoff and counted; a
  missing (404) or refused (403) object fails at once with an error naming the URL.

Filesystem objects are created lazily per process (DataLoader workers fork or spawn after the
index is built; the AWS SDK must be initialised in the process that uses it), so everything
above this module passes plain strings around.
"""

from __future__ import annotations

import datetime
import fnmatch
import glob as globlib
import json
import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from vlscale.data.retries import (  # noqa: F401 — re-exported: the data package reaches them as fs.*
    IO_STATS,
    IOCounters,
    StorageError,
    StorageOptions,
    describe,
    is_transient,
    retry,
)

_NATIVE = ("s3", "gs", "gcs")
_MAGIC = "*?["


def storage_options(data_cfg: object) -> StorageOptions:
    """``StorageOptions`` from a ``vlscale.config.DataConfig`` (its ``io_*``/``cache_*`` fields)."""
    return StorageOptions(retries=data_cfg.io_retries, readahead=data_cfg.readahead, io_threads=data_cfg.io_threads,
                          cache_dir=data_cfg.cache_dir,
                          cache_bytes=parse_size(data_cfg.cache_size, "data.cache_size") if data_cfg.cache_dir else 1)


_UNITS = {"": 1, "b": 1, "kb": 1 << 10, "kib": 1 << 10, "mb": 1 << 20, "mib": 1 << 20, "gb": 1 << 30,
          "gib": 1 << 30, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(text: str | int, what: str = "size") -> int:
    """``"256MB"`` -> bytes (binary units: KB = KiB); ``ValueError`` naming ``what`` otherwise."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{what}: bad size {text!r}; use e.g. 512KB, 256MB, 1GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


# --------------------------------------------------------------------------- locations
def is_url(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` locations other than ``file://`` (and Windows drive letters)."""
    scheme = urlsplit(str(location)).scheme
    return len(scheme) > 1 and scheme != "file"


def join(base: str, *names: str) -> str:
    """``base/name`` for a local path or a URL."""
    if is_url(base):
        return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)])
    return str(Path(base, *names))


def parent(location: str) -> str:
    if is_url(location):
        head, _, _ = location.rstrip("/").rpartition("/")
        return head
    return str(Path(location).parent)


def basename(location: str) -> str:
    return location.rstrip("/").rpartition("/")[2] if is_url(location) else Path(location).name


def _check_no_secret(url: str) -> None:
    parts = urlsplit(url)
    if parts.username or parts.password:
        safe = parts._replace(netloc=parts.hostname or "").geturl()
        raise ValueError(f"{safe}: credentials in a URL are refused (they would end up in configs, logs and "
                         "checkpoints); vlscale reads them from the standard chain (AWS_ACCESS_KEY_ID / "
                         "AWS_PROFILE / instance metadata, GOOGLE_APPLICATION_CREDENTIALS, HF_TOKEN)")


def _s3_endpoint() -> dict:
    """``endpoint_override`` / ``scheme`` from the AWS SDKs' standard endpoint variables."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not url:
        return {}
    parts = urlsplit(url if "://" in url else f"https://{url}")
    return {"endpoint_override": parts.netloc, "scheme": parts.scheme or "https"}


_FILESYSTEMS: dict[tuple, pafs.FileSystem] = {}
_FS_LOCK = threading.Lock()


def _make_filesystem(scheme: str, request_timeout_s: float) -> pafs.FileSystem:
    if scheme == "s3":
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return pafs.S3FileSystem(region=region, request_timeout=request_timeout_s, connect_timeout=10,
                                 retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=0), **_s3_endpoint())
    if scheme in ("gs", "gcs"):  # the client's own retries off (ours are counted); credentials: ADC
        return pafs.GcsFileSystem(retry_time_limit=datetime.timedelta(seconds=0))
    import fsspec  # only for the schemes pyarrow has no native client for

    try:
        return pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem(scheme)))
    except (ImportError, ValueError) as e:  # unknown scheme, or its implementation is not installed
        raise ValueError(f"{scheme}:// locations need an fsspec implementation: {e}") from e


def filesystem(location: str, *, request_timeout_s: float = 60.0) -> tuple[pafs.FileSystem, str]:
    """The (per-process, cached) filesystem of ``location`` and the path inside it."""
    if not is_url(location):
        path = urlsplit(str(location)).path if str(location).startswith("file://") else str(location)
        return pafs.LocalFileSystem(), os.path.abspath(path)
    _check_no_secret(location)
    parts = urlsplit(location)
    scheme = parts.scheme.lower()
    # a forked child must not reuse its parent's SDK client; a changed endpoint needs a new one
    key = (os.getpid(), scheme, request_timeout_s, tuple(sorted(_s3_endpoint().items())) if scheme == "s3" else ())
    with _FS_LOCK:
        if key not in _FILESYSTEMS:
            _FILESYSTEMS[key] = _make_filesystem(scheme, request_timeout_s)
        fs = _FILESYSTEMS[key]
    if scheme in _NATIVE:
        return fs, f"{parts.netloc}{parts.path}".rstrip("/")
    return fs, fs.handler.fs._strip_protocol(location)  # the fsspec filesystem's own path form


def split_locations(spec: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """One location, a JSON list (``'["a", "b"]'``), a comma-separated string, or a list → locations."""
    if isinstance(spec, (str, os.PathLike)):
        text = str(spec).strip()
        if text.startswith("["):
            items = json.loads(text)
        else:
            items = [t.strip() for t in text.split(",")] if "," in text and not os.path.exists(text) else [text]
    else:
        items = [str(s) for s in spec]
    out = [str(i) for i in items if str(i)]
    if not out:
        raise ValueError("no shard location given (a folder, a glob, a list of them, or an s3:// / gs:// URL)")
    return out


def list_files(location: str, suffix: str, *, request_timeout_s: float = 60.0) -> list[tuple[str, int]]:
    """``(location, size)`` of every non-hidden ``*suffix`` file in a folder or matching a glob
    (sorted by name), or of the one file ``location`` names. Missing → ``[]``."""
    if not is_url(location):
        if any(c in location for c in _MAGIC):
            names = sorted(p for p in globlib.glob(location) if p.endswith(suffix) or not os.path.isdir(p))
        elif os.path.isdir(location):
            names = sorted(str(p) for p in Path(location).glob(f"*{suffix}") if not p.name.startswith("."))
        else:
            return [(location, os.path.getsize(location))] if os.path.isfile(location) else []
        return [(n, os.path.getsize(n)) for n in names if os.path.isfile(n)]
    fs, path = filesystem(location, request_timeout_s=request_timeout_s)
    pattern = None
    if any(c in path for c in _MAGIC):
        head = path[: min(path.index(c) for c in _MAGIC if c in path)]
        pattern, path = path, head.rpartition("/")[0]
    info = retry(lambda: fs.get_file_info(path), f"{location}: stat")
    if info.type == pafs.FileType.File and pattern is None:
        return [(location, info.size)]
    if info.type != pafs.FileType.Directory:
        return []
    entries = retry(lambda: fs.get_file_info(pafs.FileSelector(path, recursive=pattern is not None)),
                    f"{location}: list")
    scheme = urlsplit(location).scheme
    out = []
    for e in entries:
        if e.type != pafs.FileType.File or e.base_name.startswith("."):
            continue
        if pattern is not None and not fnmatch.fnmatchcase(e.path, pattern):
            continue
        if pattern is None and not e.base_name.endswith(suffix):
            continue
        out.append((f"{scheme}://{e.path}", e.size))
    return sorted(out)


# --------------------------------------------------------------------------- whole-object I/O
def read_bytes(location: str, options: StorageOptions | None = None) -> bytes:
    """The whole object (one GET for remote locations), with retries."""
    if not is_url(location):
        try:
            return Path(location).read_bytes()
        except FileNotFoundError as e:
            raise StorageError(f"{location}: does not exist") from e
    opts = options or StorageOptions()
    fs, path = filesystem(location, request_timeout_s=opts.request_timeout_s)

    def get() -> bytes:
        with fs.open_input_stream(path) as f:
            data = f.read()
        IO_STATS.add(io_requests=1, io_bytes=len(data))
        return data

    return retry(get, location, opts)


def write_bytes(location: str, data: bytes | pa.Buffer, options: StorageOptions | None = None) -> None:
    """Write a whole object atomically: a hidden temp file renamed into place locally; one upload
    (an object appears only when complete) remotely, retried from the in-memory bytes."""
    if not is_url(location):
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        try:
            with open(tmp, "wb") as f:
                f.write(memoryview(data))
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return
    opts = options or StorageOptions()
    fs, path = filesystem(location, request_timeout_s=opts.request_timeout_s)

    def put() -> None:
        with fs.open_output_stream(path) as f:
            f.write(data)
        IO_STATS.add(io_requests=1, io_bytes_written=len(data))

    retry(put, location, opts)


def delete(location: str) -> None:
    """Remove one file / object if it exists."""
    if not is_url(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    try:
        retry(lambda: fs.delete_file(path), location)
    except StorageError as e:
        if not isinstance(e.__cause__, FileNotFoundError):
            raise


def make_dirs(location: str) -> None:
    if not is_url(location):
        Path(location).mkdir(parents=True, exist_ok=True)
        return
    if urlsplit(location).scheme.lower() in _NATIVE:
        return  # object stores have no folders; the first object creates the prefix
    fs, path = filesystem(location)
    retry(lambda: fs.create_dir(path, recursive=True), location)


class RangeFile:
    """Range reads of one file or object: opened lazily (one HEAD for an object), each
    ``read_at`` one GET with retries; counted in ``IO_STATS``."""

    def __init__(self, location: str, options: StorageOptions | None = None) -> None:
        self.location, self.options = location, options or StorageOptions()
        self._file: pa.NativeFile | None = None
        self._lock = threading.Lock()  # read-ahead threads share one handle (read_at is thread-safe)

    def _open(self) -> pa.NativeFile:
        with self._lock:
            if self._file is None:
                fs, path = filesystem(self.location, request_timeout_s=self.options.request_timeout_s)
                self._file = retry(lambda: fs.open_input_file(path), self.location, self.options)
                if is_url(self.location):
                    IO_STATS.add(io_requests=1)
            return self._file

    def size(self) -> int:
        return self._open().size()

    def read_at(self, offset: int, length: int) -> bytes:
        def get() -> bytes:
            data = self._open().read_at(length, offset)
            if len(data) != length:
                raise OSError(f"short read: {len(data)} of {length} bytes at offset {offset} (truncated?)")
            return data

        data = retry(get, self.location, self.options)
        if is_url(self.location):
            IO_STATS.add(io_requests=1, io_bytes=length)
        return data

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
