"""``ShardWriter``: append image-text pairs of one source and write them as Arrow IPC shards.

Each pair is validated before it is written (empty caption, unreadable or truncated image bytes,
missing file are rejected and counted by reason, never silently dropped). Rows are grouped into
small record batches (the unit the streaming loader splits across ranks and workers) and
record batches into shards of about ``target_shard_bytes``. A shard is written to a temporary
file in the output folder and renamed into place, so a crash never leaves a half-written shard
under a real shard name. Existing shards with the same prefix are an error unless
``overwrite=True``.
"""

from __future__ import annotations

import io
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import pyarrow as pa
from PIL import Image

from vlscale.data.schema import ARROW_SCHEMA, SHARD_SUFFIX, schema_with_metadata

ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})
REJECT_REASONS = ("empty_caption", "unreadable_image", "unsupported_format", "missing_file")


@dataclass
class WriteSummary:
    """What one writer wrote: rows, rejections by reason, and the shard files (in order)."""

    source: str
    written: int = 0
    rejected: Counter = field(default_factory=Counter)
    shards: list[str] = field(default_factory=list)
    bytes: int = 0

    def as_dict(self) -> dict:
        return {"source": self.source, "written": self.written, "rejected": dict(self.rejected),
                "shards": list(self.shards), "bytes": self.bytes}


def check_image(data: bytes, *, full_decode: bool = True) -> str | None:
    """``None`` if ``data`` is a readable JPEG/PNG/WebP image, else the rejection reason."""
    if not data:
        return "unreadable_image"
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            if full_decode:
                img.load()  # a truncated file only fails here, not in open()
            else:
                img.verify()
    except Exception:
        return "unreadable_image"
    return None if fmt in ACCEPTED_FORMATS else "unsupported_format"


def safe_prefix(source: str) -> str:
    """The shard-file prefix of a source name (characters outside [A-Za-z0-9_.-] become '_')."""
    prefix = re.sub(r"[^A-Za-z0-9_.-]+", "_", source).strip("._")
    if not prefix:
        raise ValueError(f"source name {source!r} gives an empty file prefix")
    return prefix


class ShardWriter:
    """Write the pairs of one source into ``out_dir/<prefix>-00000.arrow``, ``-00001`` ...

    ``target_shard_bytes`` bounds the encoded image bytes per shard (the shard is held in
    memory until written, so keep it in the hundreds of MiB); ``rows_per_batch`` is the
    record-batch size (small batches give the loader fine-grained work units).
    """

    def __init__(self, out_dir: str | Path, source: str, *, target_shard_bytes: int = 256 << 20,
                 rows_per_batch: int = 128, overwrite: bool = False, prefix: str | None = None,
                 full_decode: bool = True) -> None:
        if not source:
            raise ValueError("source must be a non-empty dataset name")
        if target_shard_bytes <= 0 or rows_per_batch <= 0:
            raise ValueError(f"target_shard_bytes ({target_shard_bytes}) and rows_per_batch "
                             f"({rows_per_batch}) must be positive")
        self.out_dir = Path(out_dir)
        self.source = source
        self.prefix = safe_prefix(prefix or source)
        self.target_shard_bytes = int(target_shard_bytes)
        self.rows_per_batch = int(rows_per_batch)
        self.full_decode = full_decode
        self.summary = WriteSummary(source=source)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._stale = sorted(self.out_dir.glob(f"{self.prefix}-*{SHARD_SUFFIX}"))
        if self._stale and not overwrite:
            raise FileExistsError(
                f"{self.out_dir}: {len(self._stale)} shard(s) named {self.prefix}-*{SHARD_SUFFIX} already exist "
                f"(e.g. {self._stale[0].name}); pass overwrite=True (CLI: --overwrite) to replace them")
        self._rows: dict[str, list] = {name: [] for name in ARROW_SCHEMA.names}
        self._batches: list[pa.RecordBatch] = []
        self._shard_bytes = 0
        self._closed = False

    # -- adding rows ---------------------------------------------------------------------------
    def reject(self, reason: str) -> bool:
        """Count a pair rejected before it reached the writer (e.g. its image file is missing)."""
        self.summary.rejected[reason] += 1
        return False

    def add(self, *, image_bytes: bytes, caption: str, key: str, concepts: list[str] | None = None) -> bool:
        """Validate and append one pair; ``False`` (and counted by reason) if it was rejected."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        caption = (caption or "").strip()
        if not caption:
            return self.reject("empty_caption")
        reason = check_image(image_bytes, full_decode=self.full_decode)
        if reason is not None:
            return self.reject(reason)
        for name, value in (("key", str(key)), ("image", bytes(image_bytes)), ("caption", caption),
                            ("source", self.source), ("concepts", list(concepts) if concepts is not None else None)):
            self._rows[name].append(value)
        self._shard_bytes += len(image_bytes) + len(caption)
        self.summary.written += 1
        if len(self._rows["key"]) >= self.rows_per_batch:
            self._flush_batch()
        if self._shard_bytes >= self.target_shard_bytes:
            self._flush_shard()
        return True

    def add_file(self, path: str | Path, *, caption: str, key: str | None = None,
                 concepts: list[str] | None = None) -> bool:
        """Append the image stored at ``path`` (rejected as ``missing_file`` if it does not exist)."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError:  # not found, a directory, no permission: the pair has no image
            return self.reject("missing_file")
        return self.add(image_bytes=data, caption=caption, key=key if key is not None else path.stem,
                        concepts=concepts)

    # -- writing -------------------------------------------------------------------------------
    def _flush_batch(self) -> None:
        if not self._rows["key"]:
            return
        self._batches.append(pa.RecordBatch.from_pydict(self._rows, schema=ARROW_SCHEMA))
        self._rows = {name: [] for name in ARROW_SCHEMA.names}

    def _flush_shard(self) -> None:
        self._flush_batch()
        if not self._batches:
            return
        rows = sum(b.num_rows for b in self._batches)
        path = self.out_dir / f"{self.prefix}-{len(self.summary.shards):05d}{SHARD_SUFFIX}"
        tmp = self.out_dir / f".{path.name}.tmp-{os.getpid()}"
        schema = schema_with_metadata({self.source: rows})
        try:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                for batch in self._batches:
                    writer.write_batch(batch)
            os.replace(tmp, path)  # atomic on POSIX: readers never see a partial shard
        finally:
            if tmp.exists():
                tmp.unlink()
        self.summary.shards.append(str(path))
        self.summary.bytes += path.stat().st_size
        self._batches, self._shard_bytes = [], 0

    def close(self) -> WriteSummary:
        """Write the last shard and remove stale shards of an overwritten earlier build."""
        if not self._closed:
            self._flush_shard()
            written = {Path(p).resolve() for p in self.summary.shards}
            for stale in self._stale:
                if stale.resolve() not in written and stale.exists():
                    stale.unlink()
            self._closed = True
        return self.summary

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:  # do not publish a last shard built from a failed run
            self._closed = True
