"""The versioned on-disk schema of vlscale's Arrow shards, and the checks that enforce it.

A shard is one Arrow IPC *file* (random access to every record batch through the footer, so a
reader can jump straight to the record batches assigned to it). Columns:

=========  =====================  ==========================================================
column     Arrow type             meaning
=========  =====================  ==========================================================
key        string                 unique id of the pair inside its source
image      binary                 the encoded image (JPEG / PNG / WebP bytes, as stored)
caption    string                 the text paired with the image (never empty)
source     string                 name of the dataset the pair comes from
concepts   list<string> (null ok) optional visual concepts for ViCHA (null when not mined)
=========  =====================  ==========================================================

Schema-level metadata (bytes keys, JSON values) lives under the ``vlscale.`` prefix:
``vlscale.schema_version`` (``"1"``), ``vlscale.num_rows``, ``vlscale.counts`` (rows per source,
a JSON object) and ``vlscale.created_by``.

Footer metadata (the IPC file footer's custom metadata, written with the last byte of the file)
carries the integrity data: ``vlscale.batch_rows`` (rows per record batch), ``vlscale.batch_crc32``
(CRC-32 of each record batch's bytes as stored, the exact range the footer's block points at) and
``vlscale.row_crc32`` (per record batch, the base64 of little-endian uint32 CRC-32s of each row's
key + image + caption, so a damaged batch can be traced to its keys). Shards written before these
existed simply lack them.
"""

from __future__ import annotations

import base64
import json
import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow as pa

SCHEMA_VERSION = 1
REQUIRED_COLUMNS = ("key", "image", "caption", "source")
OPTIONAL_COLUMNS = ("concepts",)
SHARD_SUFFIX = ".arrow"

_META_VERSION = b"vlscale.schema_version"
_META_ROWS = b"vlscale.num_rows"
_META_COUNTS = b"vlscale.counts"
_META_CREATED = b"vlscale.created_by"
_FOOT_ROWS = b"vlscale.batch_rows"
_FOOT_CRC = b"vlscale.batch_crc32"
_FOOT_ROW_CRC = b"vlscale.row_crc32"
IPC_MAGIC = b"ARROW1"

ARROW_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("concepts", pa.list_(pa.string()), nullable=True),
    ]
)

# Accepted physical types per column: large_* variants appear in tables written by other tools.
_ACCEPTED = {
    "key": (pa.string(), pa.large_string()),
    "image": (pa.binary(), pa.large_binary()),
    "caption": (pa.string(), pa.large_string()),
    "source": (pa.string(), pa.large_string()),
}


def schema_with_metadata(counts: Mapping[str, int], created_by: str = "vlscale") -> pa.Schema:
    """The shard schema carrying the file-level metadata for a shard holding ``counts`` rows."""
    meta = {
        _META_VERSION: str(SCHEMA_VERSION).encode(),
        _META_ROWS: str(int(sum(counts.values()))).encode(),
        _META_COUNTS: json.dumps(dict(sorted(counts.items()))).encode(),
        _META_CREATED: created_by.encode(),
    }
    return ARROW_SCHEMA.with_metadata(meta)


def read_metadata(schema: pa.Schema) -> dict:
    """Decode vlscale's file-level metadata; empty dict for a table written by another tool."""
    meta = schema.metadata or {}
    if _META_VERSION not in meta:
        return {}
    return {
        "schema_version": int(meta[_META_VERSION]),
        "num_rows": int(meta.get(_META_ROWS, b"0")),
        "counts": json.loads(meta.get(_META_COUNTS, b"{}")),
        "created_by": meta.get(_META_CREATED, b"").decode(),
    }


def check_schema(schema: pa.Schema, path: str | Path) -> None:
    """Raise ``ValueError`` naming ``path`` if a required column is missing or has the wrong type,
    or if the file declares a newer schema version than this code understands."""
    names = set(schema.names)
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; a vlscale shard needs {list(REQUIRED_COLUMNS)}")
    for name, accepted in _ACCEPTED.items():
        typ = schema.field(name).type
        if typ not in accepted:
            raise ValueError(f"{path}: column {name!r} has type {typ}, expected one of {[str(a) for a in accepted]}")
    if "concepts" in names:
        typ = schema.field("concepts").type
        if pa.types.is_null(typ):  # all-null column inferred by another tool: no concepts
            return _check_version(schema, path)
        if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)) or not pa.types.is_string(typ.value_type):
            raise ValueError(f"{path}: column 'concepts' has type {typ}, expected list<string>")
    _check_version(schema, path)


def _check_version(schema: pa.Schema, path: str | Path) -> None:
    version = read_metadata(schema).get("schema_version", SCHEMA_VERSION)
    if version > SCHEMA_VERSION:
        raise ValueError(f"{path}: schema version {version} is newer than supported ({SCHEMA_VERSION}); upgrade vlscale")


# --------------------------------------------------------------------------- footer: integrity + offsets
def row_crc32(key: str, image: bytes, caption: str) -> int:
    """CRC-32 of one row's key, image bytes and caption (what ``vlscale shards verify`` traces)."""
    return zlib.crc32(caption.encode(), zlib.crc32(image, zlib.crc32(key.encode())))


def footer_metadata(batch_rows: Sequence[int], batch_crc: Sequence[int],
                    row_crc: Sequence[Sequence[int]]) -> dict[bytes, bytes]:
    """The footer's custom metadata for a shard of these record batches."""
    packed = [base64.b64encode(struct.pack(f"<{len(r)}I", *r)).decode() for r in row_crc]
    return {_FOOT_ROWS: json.dumps(list(batch_rows)).encode(), _FOOT_CRC: json.dumps(list(batch_crc)).encode(),
            _FOOT_ROW_CRC: json.dumps(packed).encode()}


def read_footer_metadata(meta: Mapping[bytes, bytes] | None) -> dict:
    """``{"batch_rows": [...], "batch_crc32": [...], "row_crc32": [[...], ...]}`` (the keys present)."""
    meta = meta or {}
    out: dict = {}
    if _FOOT_ROWS in meta:
        out["batch_rows"] = [int(n) for n in json.loads(meta[_FOOT_ROWS])]
    if _FOOT_CRC in meta:
        out["batch_crc32"] = [int(c) for c in json.loads(meta[_FOOT_CRC])]
    if _FOOT_ROW_CRC in meta:
        rows = []
        for text in json.loads(meta[_FOOT_ROW_CRC]):
            raw = base64.b64decode(text)
            rows.append(list(struct.unpack(f"<{len(raw) // 4}I", raw)))
        out["row_crc32"] = rows
    return out


def footer_span(tail: bytes, file_size: int) -> tuple[int, int]:
    """``(start, length)`` of the footer flatbuffer, from the file's last 10 bytes."""
    if len(tail) < 10 or tail[-6:] != IPC_MAGIC:
        raise ValueError("not an Arrow IPC file (no ARROW1 magic at the end: truncated?)")
    (length,) = struct.unpack("<i", tail[-10:-6])
    start = file_size - 10 - length
    if length <= 0 or start < 8:
        raise ValueError(f"corrupt Arrow IPC footer length {length}")
    return start, length


class _Table:
    """Just enough of a flatbuffers reader for Arrow's Footer and Message tables."""

    def __init__(self, buf: bytes, pos: int) -> None:
        self.buf, self.pos = buf, pos
        self.vtable = pos - struct.unpack_from("<i", buf, pos)[0]
        self.vt_size = struct.unpack_from("<H", buf, self.vtable)[0]

    def _field(self, i: int) -> int | None:
        slot = 4 + 2 * i
        if slot >= self.vt_size:
            return None
        off = struct.unpack_from("<H", self.buf, self.vtable + slot)[0]
        return self.pos + off if off else None

    def scalar(self, i: int, fmt: str, default: int = 0) -> int:
        pos = self._field(i)
        return default if pos is None else struct.unpack_from(fmt, self.buf, pos)[0]

    def _deref(self, pos: int) -> int:
        return pos + struct.unpack_from("<I", self.buf, pos)[0]

    def table(self, i: int) -> _Table | None:
        pos = self._field(i)
        return None if pos is None else _Table(self.buf, self._deref(pos))

    def vector(self, i: int) -> tuple[int, int]:
        """``(first element position, length)`` of vector field ``i`` (``(0, 0)`` if absent)."""
        pos = self._field(i)
        if pos is None:
            return 0, 0
        vec = self._deref(pos)
        return vec + 4, struct.unpack_from("<I", self.buf, vec)[0]

    def string(self, i: int) -> bytes:
        pos = self._field(i)
        if pos is None:
            return b""
        at = self._deref(pos)
        (n,) = struct.unpack_from("<I", self.buf, at)
        return bytes(self.buf[at + 4: at + 4 + n])


def parse_footer(footer: bytes) -> tuple[list[tuple[int, int, int]], dict[bytes, bytes]]:
    """The record-batch blocks ``(offset, metadata_length, body_length)`` and the custom metadata of
    an Arrow IPC file footer (the flatbuffer before the trailing length + ``ARROW1``).

    Arrow's ``Footer`` table: field 3 ``recordBatches`` is a vector of ``Block`` structs
    ``{offset: int64, metaDataLength: int32, (pad), bodyLength: int64}``, field 4 the
    ``custom_metadata`` key/value tables. A batch's bytes are ``[offset, offset + metadata_length
    + body_length)``. pyarrow does not expose these offsets, and they are what lets a reader fetch
    one record batch with a single range request."""
    try:
        root = _Table(footer, struct.unpack_from("<I", footer, 0)[0])
        start, n = root.vector(3)
        blocks = []
        for i in range(n):
            offset, meta_len, _pad, body_len = struct.unpack_from("<qiiq", footer, start + 24 * i)
            blocks.append((offset, meta_len, body_len))
        start, n = root.vector(4)
        meta = {}
        for i in range(n):
            at = start + 4 * i
            kv = _Table(footer, at + struct.unpack_from("<I", footer, at)[0])
            meta[kv.string(0)] = kv.string(1)
        return blocks, meta
    except (struct.error, IndexError) as e:
        raise ValueError(f"corrupt Arrow IPC footer: {e}") from e


def message_rows(metadata: bytes) -> int:
    """Rows of a record-batch message from its metadata alone (continuation marker, int32 length,
    ``Message`` flatbuffer whose header field 2 is a ``RecordBatch`` with ``length`` at field 0)."""
    try:
        skip = 8 if metadata[:4] == b"\xff\xff\xff\xff" else 4
        msg = _Table(metadata, skip + struct.unpack_from("<I", metadata, skip)[0])
        header = msg.table(2)
        if header is None:
            raise ValueError("message has no header")
        return int(header.scalar(0, "<q"))
    except (struct.error, IndexError) as e:
        raise ValueError(f"corrupt record batch metadata: {e}") from e
