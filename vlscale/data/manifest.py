"""``manifest.json``: the index of a shard folder, so a loader starts with one object read.

Without it, a loader opens every shard's footer at start-up (with 40,000 remote shards, 40,000+
round trips per rank before the first step). ``vlscale shards build`` writes it beside the
shards; ``vlscale shards index DIR_OR_URL`` writes one for shards built elsewhere and merges the
part manifests of a multi-machine build. Format (JSON, paths relative to the manifest's folder)::

    {"format": "vlscale.manifest", "version": 1, "rows": 12345, "counts": {"coco": 12345},
     "schemas": ["<base64 Arrow schema>"],
     "shards": [{"path": "coco-00000-0000.arrow", "bytes": 4194304, "rows": 1024,
                 "counts": {"coco": 1024}, "concepts": false, "schema": 0,
                 "batches": [[offset, length, rows, crc32], ...],      # one per record batch
                 "batch_sources": ["coco", ...]}]}                    # only for mixed-source shards

``batches`` are the byte ranges the file footer points at, so a reader fetches one record batch
with one range request, and their CRC-32s (``null`` when the shard carries none), which
``vlscale shards verify`` checks and remote reads are validated against. About 40 bytes per
record batch: 400M pairs in 128-row batches make a ~120 MB manifest (use larger record batches
for such sets).
"""

from __future__ import annotations

import base64
import json
import logging
import zlib
from dataclasses import dataclass, field

import pyarrow as pa

from vlscale.data import fs
from vlscale.data.schema import (
    SHARD_SUFFIX,
    check_schema,
    footer_span,
    message_rows,
    parse_footer,
    read_footer_metadata,
    read_metadata,
)

log = logging.getLogger(__name__)
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "vlscale.manifest"
MANIFEST_VERSION = 1
_TAIL = 64 << 10  # one range read usually holds the whole footer


@dataclass
class ShardEntry:
    """One shard as the loader needs it: size, rows, record-batch ranges, checksums and sources."""

    path: str
    bytes: int
    rows: int
    counts: dict[str, int]
    batches: list[tuple[int, int, int, int | None]]  # (offset, length, rows, crc32)
    schema: pa.Schema
    concepts: bool = False
    batch_sources: list[str | None] | None = None  # None: every batch is the shard's one source
    row_crc32: list[list[int]] | None = field(default=None, repr=False)  # only read by `verify`

    def source_of(self, i: int) -> str | None:
        if self.batch_sources is not None:
            return self.batch_sources[i]
        return next(iter(self.counts)) if len(self.counts) == 1 else None

    def to_json(self, schema_id: int) -> dict:
        out = {"path": self.path, "bytes": self.bytes, "rows": self.rows, "counts": self.counts,
               "concepts": self.concepts, "schema": schema_id, "batches": [list(b) for b in self.batches]}
        if self.batch_sources is not None:
            out["batch_sources"] = self.batch_sources
        return out


def _schema_to_text(schema: pa.Schema) -> str:
    return base64.b64encode(schema.remove_metadata().serialize().to_pybytes()).decode()


def _schema_from_text(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def manifest_json(entries: list[ShardEntry], extra: dict | None = None) -> dict:
    """The manifest document for ``entries`` (in the order given: the loader's shard order)."""
    schemas: list[str] = []
    shards = []
    counts: dict[str, int] = {}
    for e in entries:
        text = _schema_to_text(e.schema)
        if text not in schemas:
            schemas.append(text)
        shards.append(e.to_json(schemas.index(text)))
        for k, v in e.counts.items():
            counts[k] = counts.get(k, 0) + v
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "rows": sum(e.rows for e in entries),
            "counts": dict(sorted(counts.items())), **(extra or {}), "schemas": schemas, "shards": shards}


def entries_from_json(doc: dict, where: str) -> list[ShardEntry]:
    if doc.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{where}: not a vlscale manifest (format {doc.get('format')!r})")
    if int(doc.get("version", 0)) > MANIFEST_VERSION:
        raise ValueError(f"{where}: manifest version {doc['version']} is newer than supported "
                         f"({MANIFEST_VERSION}); upgrade vlscale")
    schemas = [_schema_from_text(t) for t in doc["schemas"]]
    out = []
    for s in doc["shards"]:
        out.append(ShardEntry(path=s["path"], bytes=int(s["bytes"]), rows=int(s["rows"]), counts=dict(s["counts"]),
                              batches=[tuple(b) for b in s["batches"]], schema=schemas[int(s["schema"])],
                              concepts=bool(s.get("concepts")), batch_sources=s.get("batch_sources")))
    return out


def write_manifest(location: str, entries: list[ShardEntry], extra: dict | None = None) -> str:
    """Write ``entries`` as the manifest at ``location`` (a file path or URL), atomically."""
    fs.write_bytes(location, (json.dumps(manifest_json(entries, extra), separators=(",", ":")) + "\n").encode())
    return location


def read_manifest(location: str, options: fs.StorageOptions | None = None) -> list[ShardEntry] | None:
    """The entries of the manifest at ``location`` (paths made absolute), or ``None`` if there is none."""
    try:
        data = fs.read_bytes(location, options)
    except fs.StorageError as e:
        if isinstance(e.__cause__, FileNotFoundError) or "does not exist" in str(e):
            return None
        raise
    try:
        doc = json.loads(data)
    except json.JSONDecodeError as e:
        raise ValueError(f"{location}: manifest is not valid JSON ({e}); rewrite it with `vlscale shards index`") from e
    folder = fs.parent(location)
    entries = entries_from_json(doc, location)
    for e in entries:
        if not (fs.is_url(e.path) or e.path.startswith("/")):
            e.path = fs.join(folder, e.path)
    return entries


def describe_shard(location: str, size: int | None = None, *, checksums: bool = False,
                   options: fs.StorageOptions | None = None) -> ShardEntry:
    """Read a shard's footer (and, for shards without vlscale's footer metadata, each record
    batch's header) into a ``ShardEntry``. Two range reads for a shard written by vlscale.

    ``checksums=True`` computes CRC-32s for a shard that carries none (reads every byte).
    Raises ``ValueError`` naming the file when it is missing, truncated, not Arrow, or lacks a
    required column."""
    f = fs.RangeFile(location, options)
    try:
        size = f.size() if size is None else size
        tail_at = max(0, size - _TAIL)
        tail = f.read_at(tail_at, size - tail_at)
        start, length = footer_span(tail[-10:], size)
        footer = tail[start - tail_at: start - tail_at + length] if start >= tail_at else f.read_at(start, length)
        blocks, footer_meta = parse_footer(footer)
        head_end = blocks[0][0] if blocks else start
        schema = pa.ipc.read_schema(pa.py_buffer(f.read_at(8, head_end - 8)))
    except fs.StorageError as e:
        raise ValueError(f"{location}: shard file does not exist" if "does not exist" in str(e) else str(e)) from e
    except (ValueError, pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{location}: unreadable shard (truncated or not an Arrow IPC file): {e}") from e
    check_schema(schema, location)
    integrity = read_footer_metadata(footer_meta)
    rows = integrity.get("batch_rows")
    if rows is None or len(rows) != len(blocks):
        rows = [message_rows(f.read_at(off, meta)) for off, meta, _ in blocks]
    crcs = integrity.get("batch_crc32")
    if crcs is None or len(crcs) != len(blocks):
        crcs = [zlib.crc32(f.read_at(off, m + b)) for off, m, b in blocks] if checksums else [None] * len(blocks)
    counts = read_metadata(schema).get("counts") or {}
    batch_sources = None
    if len(counts) != 1 or sum(counts.values()) != sum(rows):  # another tool's table: look at the rows
        batch_sources, counts = [], {}
        for off, m, b in blocks:
            batch = pa.ipc.read_record_batch(pa.py_buffer(f.read_at(off, m + b)), schema)
            values = batch.column("source").value_counts().to_pylist()
            for v in values:
                counts[str(v["values"])] = counts.get(str(v["values"]), 0) + int(v["counts"])
            batch_sources.append(str(values[0]["values"]) if len(values) == 1 else None)
    f.close()
    return ShardEntry(path=location, bytes=size, rows=sum(rows), counts=dict(sorted(counts.items())),
                      batches=[(off, m + b, n, c) for (off, m, b), n, c in zip(blocks, rows, crcs)],
                      schema=schema.remove_metadata(), concepts="concepts" in schema.names,
                      batch_sources=batch_sources, row_crc32=integrity.get("row_crc32"))


def relative_entries(entries: list[ShardEntry], folder: str) -> list[ShardEntry]:
    """Copies of ``entries`` whose paths inside ``folder`` are made relative (what a manifest stores)."""
    prefix = folder.rstrip("/") + "/"
    out = []
    for e in entries:
        path = e.path[len(prefix):] if e.path.startswith(prefix) else e.path
        out.append(ShardEntry(path=path, bytes=e.bytes, rows=e.rows, counts=e.counts, batches=e.batches,
                              schema=e.schema, concepts=e.concepts, batch_sources=e.batch_sources))
    return out


def index_folder(folder: str, *, checksums: bool = False, options: fs.StorageOptions | None = None,
                 known: dict[str, ShardEntry] | None = None) -> list[ShardEntry]:
    """Entries of every shard in ``folder``: from ``known`` (e.g. part manifests) where the size
    matches, else from the shard's footer."""
    known = known or {}
    out = []
    for location, size in fs.list_files(folder, SHARD_SUFFIX):
        entry = known.get(location)
        if entry is not None and entry.bytes == size and (not checksums or None not in [b[3] for b in entry.batches]):
            out.append(entry)
        else:
            out.append(describe_shard(location, size, checksums=checksums, options=options))
    return out
