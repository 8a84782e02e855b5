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
"""

from __future__ import annotations

import json
from collections.abc import Mapping
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
