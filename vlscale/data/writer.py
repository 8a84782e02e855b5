"""``ShardWriter``: append image-text pairs of one source and write them as Arrow IPC shards.

Each pair is validated before it is written (empty caption, unreadable or truncated image bytes,
missing file are rejected and counted by reason, never silently dropped). Rows are grouped into
small record batches (the unit the streaming loader splits across ranks and workers) and
record batches into shards of about ``target_shard_bytes``. A shard is serialised in memory with
a CRC-32 per record batch and per row in its footer, then written atomically: a temporary file
renamed into place locally, one upload (the object appears only when complete) to a URL. A
crash never leaves a half-written shard under a real shard name. Existing shards with the same
prefix are an error unless ``overwrite=True``.

Validation (``validate``): ``"full"`` decodes every image (catches any corruption; ~1–3 ms per
image); ``"fast"`` parses the header and checks the format's end marker (JPEG EOI, PNG IEND,
WebP RIFF length), which catches truncation, the common damage, at ~1 % of the cost;
``"none"`` only checks that the bytes are non-empty.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import pyarrow as pa
from PIL import Image

from vlscale.data import fs
from vlscale.data.manifest import ShardEntry
from vlscale.data.schema import (
    ARROW_SCHEMA,
    SHARD_SUFFIX,
    footer_metadata,
    footer_span,
    parse_footer,
    row_crc32,
    schema_with_metadata,
)

ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})
REJECT_REASONS = ("empty_caption", "unreadable_image", "unsupported_format", "missing_file", "duplicate_key",
                  "truncated_input")
VALIDATE_MODES = ("full", "fast", "none")


@dataclass
class WriteSummary:
    """What one writer wrote: rows, rejections by reason, and the shard files (in order)."""

    source: str
    written: int = 0
    rejected: Counter = field(default_factory=Counter)
    shards: list[str] = field(default_factory=list)
    bytes: int = 0
    entries: list[ShardEntry] = field(default_factory=list, repr=False)  # manifest entries of `shards`

    def as_dict(self) -> dict:
        return {"source": self.source, "written": self.written, "rejected": dict(self.rejected),
                "shards": list(self.shards), "bytes": self.bytes}


def _ends_well(data: bytes, fmt: str) -> bool:
    """The format's end marker is present (a truncated file loses it)."""
    if fmt == "JPEG":
        return b"\xff\xd9" in data[-64:]  # EOI (some encoders pad after it)
    if fmt == "PNG":
        return data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"
    if fmt == "WEBP":
        return len(data) >= 12 and struct.unpack("<I", data[4:8])[0] + 8 <= len(data)
    return True


def check_image(data: bytes, *, validate: str = "full") -> str | None:
    """``None`` if ``data`` is a readable JPEG/PNG/WebP image, else the rejection reason."""
    if not data:
        return "unreadable_image"
    if validate == "none":
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            if fmt in ACCEPTED_FORMATS and validate == "full":
                img.load()  # a truncated file only fails here, not in open()
    except Exception:
        return "unreadable_image"
    if fmt not in ACCEPTED_FORMATS:
        return "unsupported_format"
    return None if validate == "full" or _ends_well(data, fmt) else "unreadable_image"


def safe_prefix(source: str) -> str:
    """The shard-file prefix of a source name (characters outside [A-Za-z0-9_.-] become '_')."""
    prefix = re.sub(r"[^A-Za-z0-9_.-]+", "_", source).strip("._")
    if not prefix:
        raise ValueError(f"source name {source!r} gives an empty file prefix")
    return prefix


class ShardWriter:
    """Write the pairs of one source into ``out_dir/<prefix>-00000.arrow``, ``-00001`` ...

    ``out_dir`` is a folder or a URL (``s3://bucket/shards``). ``target_shard_bytes`` bounds the
    encoded image bytes per shard (the shard is held in memory until written, so keep it in the
    hundreds of MiB); ``rows_per_batch`` is the record-batch size (small batches give the loader
    fine-grained work units). ``on_reject(reason, key)`` is told of every rejected pair.
    """

    on_reject = None  # set to a callable(reason, key) to hear of every rejection

    def __init__(self, out_dir: str | Path, source: str, *, target_shard_bytes: int = 256 << 20,
                 rows_per_batch: int = 128, overwrite: bool = False, prefix: str | None = None,
                 validate: str = "full", storage: fs.StorageOptions | None = None, scan_existing: bool = True) -> None:
        if not source:
            raise ValueError("source must be a non-empty dataset name")
        if target_shard_bytes <= 0 or rows_per_batch <= 0:
            raise ValueError(f"target_shard_bytes ({target_shard_bytes}) and rows_per_batch "
                             f"({rows_per_batch}) must be positive")
        if validate not in VALIDATE_MODES:
            raise ValueError(f"validate must be one of {VALIDATE_MODES}, got {validate!r}")
        self.out_dir = str(out_dir) if fs.is_url(str(out_dir)) else str(Path(out_dir))
        self.source = source
        self.prefix = safe_prefix(prefix or source)
        self.target_shard_bytes = int(target_shard_bytes)
        self.rows_per_batch = int(rows_per_batch)
        self.validate, self.storage = validate, storage
        self.summary = WriteSummary(source=source)
        fs.make_dirs(self.out_dir)
        # scan_existing=False: the caller knows no other shards carry this prefix (a build task, whose
        # names are deterministic) and saves a listing of the whole output prefix per writer
        pattern = fs.join(self.out_dir, f"{self.prefix}-*{SHARD_SUFFIX}")
        self._stale = [loc for loc, _ in fs.list_files(pattern, SHARD_SUFFIX)] if scan_existing else []
        if self._stale and not overwrite:
            raise FileExistsError(
                f"{self.out_dir}: {len(self._stale)} shard(s) named {self.prefix}-*{SHARD_SUFFIX} already exist "
                f"(e.g. {fs.basename(self._stale[0])}); pass overwrite=True (CLI: --overwrite) to replace them")
        self._rows: dict[str, list] = {name: [] for name in ARROW_SCHEMA.names}
        self._row_crc: list[int] = []
        self._batches: list[tuple[pa.RecordBatch, list[int]]] = []
        self._shard_bytes = 0
        self._closed = False

    # -- adding rows ---------------------------------------------------------------------------
    def reject(self, reason: str, key: str | None = None) -> bool:
        """Count a pair rejected before it reached the writer (e.g. its image file is missing)."""
        self.summary.rejected[reason] += 1
        if self.on_reject is not None:
            self.on_reject(reason, key)
        return False

    def add(self, *, image_bytes: bytes, caption: str, key: str, concepts: list[str] | None = None) -> bool:
        """Validate and append one pair; ``False`` (and counted by reason) if it was rejected."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        caption = (caption or "").strip()
        if not caption:
            return self.reject("empty_caption", key)
        reason = check_image(image_bytes, validate=self.validate)
        if reason is not None:
            return self.reject(reason, key)
        for name, value in (("key", str(key)), ("image", bytes(image_bytes)), ("caption", caption),
                            ("source", self.source), ("concepts", list(concepts) if concepts is not None else None)):
            self._rows[name].append(value)
        self._row_crc.append(row_crc32(str(key), image_bytes, caption))
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
            return self.reject("missing_file", key if key is not None else str(path))
        return self.add(image_bytes=data, caption=caption, key=key if key is not None else path.stem,
                        concepts=concepts)

    # -- writing -------------------------------------------------------------------------------
    def _flush_batch(self) -> None:
        if not self._rows["key"]:
            return
        self._batches.append((pa.RecordBatch.from_pydict(self._rows, schema=ARROW_SCHEMA), self._row_crc))
        self._rows = {name: [] for name in ARROW_SCHEMA.names}
        self._row_crc = []

    def _flush_shard(self) -> None:
        self._flush_batch()
        if not self._batches:
            return
        rows = [b.num_rows for b, _ in self._batches]
        # a record batch's message bytes are the same serialised alone or inside the file, so the
        # checksums can go into the footer, which is written last
        crcs = [zlib.crc32(b.serialize()) for b, _ in self._batches]
        sink = pa.BufferOutputStream()
        schema = schema_with_metadata({self.source: sum(rows)})
        with pa.ipc.new_file(sink, schema, metadata=footer_metadata(rows, crcs, [c for _, c in self._batches])) as w:
            for batch, _ in self._batches:
                w.write_batch(batch)
        data = sink.getvalue()
        start, length = footer_span(data[-10:].to_pybytes(), data.size)
        blocks, _ = parse_footer(data[start: start + length].to_pybytes())
        location = fs.join(self.out_dir, f"{self.prefix}-{len(self.summary.shards):05d}{SHARD_SUFFIX}")
        fs.write_bytes(location, data, self.storage)  # atomic: readers never see a partial shard
        self.summary.shards.append(location)
        self.summary.bytes += data.size
        self.summary.entries.append(ShardEntry(
            path=location, bytes=data.size, rows=sum(rows), counts={self.source: sum(rows)},
            batches=[(off, m + b, n, c) for (off, m, b), n, c in zip(blocks, rows, crcs)],
            schema=ARROW_SCHEMA, concepts=True))
        self._batches, self._shard_bytes = [], 0

    def close(self) -> WriteSummary:
        """Write the last shard and remove stale shards of an overwritten earlier build."""
        if not self._closed:
            self._flush_shard()
            for stale in set(self._stale) - set(self.summary.shards):
                fs.delete(stale)
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
